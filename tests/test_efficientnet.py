"""Flax EfficientNet B0-B7 == keras.applications.EfficientNetB0..B7; weight conversion from every file kind;
training mode; drop-connect; refusals.

Keras models are built once per module with random weights and randomised BatchNorm statistics, biases
and Normalization statistics (Keras initialises them to 0 and 1, behind which swapped mean and variance,
a wrong epsilon or a dropped bias would hide). Inputs are 65x65: an odd side at every stride-2 layer
(65, 33, 17, 9, 5), so Keras' `correct_pad` takes its odd-size branch everywhere; the all-variants test runs
at 32x32, even everywhere. Each jitted Flax function is compiled once and shared.
"""
import dataclasses
import functools
import shutil

import flax.traverse_util
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melanoma_jax.models import backbone
from melanoma_jax.models import BACKBONES
from melanoma_jax.models import EfficientNet
from melanoma_jax.models import InceptionResNetV2
from melanoma_jax.models import efficientnet
from melanoma_jax.models import efficientnet_keras
from melanoma_jax.models import keras_weights
from melanoma_jax.models.keras_weights import load_keras_weights
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

RTOL = 1e-4
SIZE = 65
CLASSES = 10
PARITY_VARIANTS = ("b0", "b3")
KINDS = ("legacy_full", "legacy_weights", "keras3", "live")


def rel_diff(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def keras():
  tf()
  import keras as keras_module  # pylint: disable=g-import-not-at-top
  return keras_module


def _randomise(keras, model, seed, normalization=None):
  """Random BatchNorm gamma / beta, biases and Normalization mean / variance (`normalization` =
  (mean, variance) to set given ones instead), and BatchNorm moving statistics measured on random images.

  Measured statistics keep every activation of order one: with arbitrary ones the activations of a
  randomly initialised EfficientNet vanish or saturate, and its output hardly depends on its input (a
  wrong normalisation of the input then changed the logits by 1e-3 only).
  """
  rng = np.random.RandomState(seed)
  batch_norms = []
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, _, _ = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                         np.zeros_like(beta), np.ones_like(beta)])
      batch_norms.append(layer)
    elif isinstance(layer, keras.layers.Normalization):
      mean, var = normalization or (rng.uniform(0.3, 0.6, 3), rng.uniform(0.03, 0.09, 3))
      layer.set_weights([np.asarray(mean), np.asarray(var), layer.get_weights()[2]])
      layer.finalize_state()  # Keras computes with a copy of its statistics made here, not set_weights.
    elif getattr(layer, "use_bias", False):
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
  # One training-mode pass with momentum 0 and the dropouts off sets each moving statistic to the
  # batch's: the statistics of the inference-mode network on those images.
  dropouts = [layer for layer in model.layers if isinstance(layer, keras.layers.Dropout)]
  saved = [layer.momentum for layer in batch_norms], [layer.rate for layer in dropouts]
  for layer in batch_norms:
    layer.momentum = 0.0
  for layer in dropouts:
    layer.rate = 0.0
  size = model.input_shape[1]  # At least ~128 values per channel where the map is 1x1.
  model(rng.uniform(0, 255, (max(32, 2**17 // size**2), size, size, 3)).astype(np.float32), training=True)
  for layer, momentum in zip(batch_norms, saved[0]):
    layer.momentum = momentum
  for layer, rate in zip(dropouts, saved[1]):
    layer.rate = rate
  return model


def _keras_efficientnet():
  """Keras' own EfficientNet builder, which takes the width, depth and drop-connect rate."""
  from keras.src.applications import efficientnet as keras_efficientnet  # pylint: disable=g-import-not-at-top
  return keras_efficientnet.EfficientNet


def _application(keras, variant, size, **kwargs):
  return getattr(keras.applications, f"EfficientNet{variant.upper()}")(
      weights=None, input_shape=(size, size, 3), **kwargs)


@pytest.fixture(scope="module")
def keras_models(keras):
  """{variant: (full model with logits, no-top model with pooled features)} at SIZE x SIZE."""
  models = {}
  for i, variant in enumerate(PARITY_VARIANTS):
    keras.utils.set_random_seed(i)
    full = _application(keras, variant, SIZE, classes=CLASSES, classifier_activation=None)
    notop = _application(keras, variant, SIZE, include_top=False, pooling="avg")
    models[variant] = (_randomise(keras, full, 10 + i), _randomise(keras, notop, 20 + i))
  return models


def _save_legacy_weights(model, path):
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  with h5py.File(path, "w") as f:
    legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="module")
def files(keras_models, tmp_path_factory):
  """{variant: {kind: path}}: each full model in each file kind, the no-top one as legacy weights."""
  root = tmp_path_factory.mktemp("efficientnet_files")
  paths = {}
  for variant, (full, notop) in keras_models.items():
    p = {"legacy_full": str(root / f"{variant}_full.h5"),
         "legacy_weights": str(root / f"{variant}_weights.h5"),
         "keras3": str(root / f"{variant}.weights.h5"), "notop": str(root / f"{variant}_notop.h5")}
    full.save(p["legacy_full"])
    full.save_weights(p["keras3"])
    _save_legacy_weights(full, p["legacy_weights"])
    _save_legacy_weights(notop, p["notop"])
    paths[variant] = p
  yield paths
  shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def images():
  rng = np.random.RandomState(0)
  return rng.uniform(0, 255, (2, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def keras_outputs(keras_models, images):
  return {v: (np.asarray(full(images, training=False)), np.asarray(notop(images, training=False)))
          for v, (full, notop) in keras_models.items()}


@functools.lru_cache(maxsize=None)
def jitted_apply(variant, num_classes):
  return jax.jit(lambda v, x: backbone(f"efficientnet_{variant}", num_classes).apply(v, x, train=False))


# ------------------------------------------------------------------------- architecture parity
@pytest.mark.parametrize("variant", tuple(efficientnet.VARIANTS))
def test_converter_shapes_are_the_modules(variant):
  """The converter's table (efficientnet_keras.units) and the module agree on every variable."""
  model = EfficientNet(variant=variant, num_classes=CLASSES)
  abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)),
                                               train=False))
  shapes = {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract).items()}
  assert shapes == efficientnet_keras.flax_shapes(variant, CLASSES)


@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_parameter_counts_equal_keras(variant, keras_models):
  full, notop = keras_models[variant]
  for model, num_classes in ((full, CLASSES), (notop, None)):
    shapes = efficientnet_keras.flax_shapes(variant, num_classes)
    # Keras' Normalization also counts the images it was adapted on (one integer we do not keep).
    assert sum(int(np.prod(s)) for s in shapes.values()) == model.count_params() - 1
  trainable = sum(int(np.prod(w.shape)) for w in full.trainable_weights)
  assert sum(int(np.prod(s)) for k, s in efficientnet_keras.flax_shapes(variant, CLASSES).items()
             if k[0] == "params") == trainable


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_logits_match_keras(variant, kind, keras_models, files, images, keras_outputs):
  source = keras_models[variant][0] if kind == "live" else files[variant][kind]
  variables = load_keras_weights(source, num_classes=CLASSES)
  assert keras_weights.backbone_name(variables) == f"efficientnet_{variant}"
  logits = jitted_apply(variant, CLASSES)(variables, images)
  assert logits.shape == (2, CLASSES)
  diff = rel_diff(logits, keras_outputs[variant][0])
  print(f"parity {SIZE}x{SIZE} EfficientNet{variant.upper()} logits from {kind}: max rel diff {diff:.2e}")
  assert diff <= RTOL


@pytest.mark.parametrize("kind", ("notop", "legacy_full", "live"))
@pytest.mark.parametrize("variant", PARITY_VARIANTS)
def test_pooled_features_match_keras(variant, kind, keras_models, files, images, keras_outputs):
  """Features of the no-top model's weights, and of a full model's with its top dropped."""
  full, notop = keras_models[variant]
  source = {"notop": files[variant]["notop"], "legacy_full": files[variant]["legacy_full"],
            "live": notop}[kind]
  variables = load_keras_weights(source, num_classes=None)
  assert "predictions" not in variables["params"]
  features = jitted_apply(variant, None)(variables, images)
  want = _full_features(full, images) if kind == "legacy_full" else keras_outputs[variant][1]
  assert features.shape == want.shape == (2, efficientnet.widths(variant)[1])
  diff = rel_diff(features, want)
  print(f"parity {SIZE}x{SIZE} EfficientNet{variant.upper()} features from {kind}: max rel diff {diff:.2e}")
  assert diff <= RTOL


def _full_features(full, images):
  from keras import Model  # pylint: disable=g-import-not-at-top
  return np.asarray(Model(full.input, full.get_layer("avg_pool").output)(images, training=False))


@pytest.mark.parametrize("variant", tuple(efficientnet.VARIANTS))
def test_every_variant_converts_from_keras_and_matches_it(variant, keras):
  """B0-B7 from a live Keras model at 32x32 (the smallest Keras allows): recognised, and equal."""
  keras.utils.set_random_seed(0)
  model = _randomise(keras, _application(keras, variant, 32, classes=CLASSES, classifier_activation=None), 5)
  x = np.random.RandomState(1).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
  variables = load_keras_weights(model)
  assert keras_weights.backbone_name(variables) == f"efficientnet_{variant}"
  assert variables["params"]["predictions"]["kernel"].shape == (efficientnet.widths(variant)[1], CLASSES)
  logits = jitted_apply(variant, CLASSES)(variables, x)  # Compiled: eager dispatch of B7 took 4x longer.
  diff = rel_diff(logits, model(x, training=False))
  print(f"parity 32x32 EfficientNet{variant.upper()} logits: max rel diff {diff:.2e}")
  assert diff <= RTOL


# ---------------------------------------------------------------------- training, drop-connect
def test_training_mode_matches_keras(keras, images):
  """Batch statistics in the forward pass and the moving averages they update, with both dropouts off."""
  keras.utils.set_random_seed(3)
  model = _randomise(keras, _keras_efficientnet()(
      1.0, 1.0, 224, dropout_rate=0.0, drop_connect_rate=0.0, weights=None,
      input_shape=(SIZE, SIZE, 3), classes=CLASSES, classifier_activation=None), 7)
  variables = load_keras_weights(model)
  flax_model = EfficientNet(variant="b0", num_classes=CLASSES, drop_connect_rate=0.0, dropout_rate=0.0)
  logits, updated = jax.jit(lambda v, x: flax_model.apply(v, x, train=True, mutable=["batch_stats"]))(
      variables, images)
  want = np.asarray(model(images, training=True))  # Also updates Keras' moving statistics.
  diff = rel_diff(logits, want)
  print(f"parity {SIZE}x{SIZE} EfficientNetB0 training mode: max rel diff {diff:.2e}")
  assert diff <= RTOL
  assert rel_diff(logits, jitted_apply("b0", CLASSES)(variables, images)) > 1e-2  # Batch stats used.
  keras_updated = load_keras_weights(model)["batch_stats"]
  assert_trees_equal(updated["batch_stats"]["normalization"], variables["batch_stats"]["normalization"])
  for got, expected in zip(jax.tree.leaves(updated["batch_stats"]), jax.tree.leaves(keras_updated)):
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL)


def test_drop_connect_rates_are_keras(keras_models):
  """The blocks that drop their residual branch, and at which rates, are Keras' `<block>_drop` layers."""
  full, _ = keras_models["b3"]
  want = {layer.name[:-len("_drop")]: layer.rate for layer in full.layers if layer.name.endswith("_drop")}
  got = {b.name: b.drop_rate for b in efficientnet.blocks("b3") if b.residual and b.drop_rate > 0}
  assert got.keys() == want.keys() and len(got) > 10
  for name, rate in got.items():
    assert rate == pytest.approx(want[name], rel=1e-12)


def test_drop_connect_zeroes_whole_samples_in_training_only():
  spec = efficientnet.BlockSpec("block2b", 16, 16, 3, 1, 6, 0.25, drop_rate=0.5)
  block = efficientnet.MBConv(spec)
  x = np.random.RandomState(2).normal(size=(16, 6, 6, 16)).astype(np.float32)
  variables = block.init(jax.random.PRNGKey(0), x, train=False)

  def run(module, train, seed):
    out = module.apply(variables, x, train=train, rngs={"dropout": jax.random.PRNGKey(seed)},
                       mutable=["batch_stats"])[0]
    return np.asarray(out) - x  # The residual branch.

  kept = run(efficientnet.MBConv(dataclasses.replace(spec, drop_rate=0.0)), True, 0)
  branch = run(block, True, 1)
  dropped = [i for i in range(16) if np.all(branch[i] == 0)]
  scaled = [i for i in range(16) if i not in dropped]
  assert dropped and scaled and np.all(kept[dropped] != 0)
  np.testing.assert_allclose(branch[scaled], kept[scaled] / 0.5, rtol=1e-5, atol=1e-6)
  assert not np.array_equal(branch, run(block, True, 2))  # Another rng, other samples.
  evaluated = run(block, False, 1)
  np.testing.assert_array_equal(evaluated, run(block, False, 2))
  np.testing.assert_array_equal(evaluated, run(efficientnet.MBConv(dataclasses.replace(spec, drop_rate=0.0)),
                                               False, 3))


# --------------------------------------------------------------------- ImageNet's normalisation
def test_imagenet_rescaling_is_folded_into_the_variance(keras, images, tmp_path, monkeypatch):
  """Keras' weights="imagenet" model divides once more by sqrt(stddev) after its Normalization, whose
  variance the official files store as the stddev: the converted model equals that model, from the live
  model, its full .h5 and the weights-only file; a model without that Rescaling keeps its variance."""
  from keras.src.utils import file_utils  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(4)
  official = _application(keras, "b0", SIZE, include_top=False, pooling="avg")  # No Rescaling.
  weights = str(tmp_path / "efficientnetb0_notop.h5")
  _save_legacy_weights(official, weights)
  monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: weights)  # No download.
  imagenet = keras.applications.EfficientNetB0(weights="imagenet", include_top=False, pooling="avg",
                                               input_shape=(SIZE, SIZE, 3))
  _randomise(keras, imagenet, 8,
             normalization=(efficientnet.IMAGENET_MEAN_RGB, efficientnet.IMAGENET_STDDEV_RGB))
  _save_legacy_weights(imagenet, weights)  # The official file's layout and Normalization values.
  official.load_weights(weights)
  full = str(tmp_path / "imagenet_full.h5")
  imagenet.save(full)
  want = np.asarray(imagenet(images, training=False))
  assert rel_diff(official(images, training=False), want) > 1e-2  # The Rescaling matters.
  apply = jitted_apply("b0", None)
  for source in (imagenet, full, weights):
    variables = load_keras_weights(source, num_classes=None)
    np.testing.assert_allclose(variables["batch_stats"]["normalization"]["var"],
                               np.square(efficientnet.IMAGENET_STDDEV_RGB), rtol=1e-6)
    assert rel_diff(apply(variables, images), want) <= RTOL
  assert_trees_equal(load_keras_weights("imagenet:efficientnet_b0", num_classes=None),
                     load_keras_weights(imagenet, num_classes=None))
  plain = load_keras_weights(official, num_classes=None)  # Its graph has no such Rescaling.
  np.testing.assert_allclose(plain["batch_stats"]["normalization"]["var"],
                             efficientnet.IMAGENET_STDDEV_RGB, rtol=1e-6)
  assert rel_diff(apply(plain, images), official(images, training=False)) <= RTOL


def test_fresh_init_normalises_with_imagenet_statistics():
  # The whole model's variables by shape (initialising B0 for real compiles every initialiser), the
  # normalisation's own values from its module: statistics that no rng draws.
  shapes = jax.eval_shape(lambda: EfficientNet(variant="b0", num_classes=None).init(
      jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False))
  assert set(shapes["batch_stats"]["normalization"]) == {"mean", "var"}
  assert "normalization" not in shapes["params"]
  normalization = efficientnet.Normalization().init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)))
  normalization = normalization["batch_stats"]
  np.testing.assert_allclose(normalization["mean"], efficientnet.IMAGENET_MEAN_RGB, rtol=1e-6)
  np.testing.assert_allclose(normalization["var"], np.square(efficientnet.IMAGENET_STDDEV_RGB), rtol=1e-6)


# ------------------------------------------------------------------------------------- refusals
def test_unknown_architecture_is_refused_naming_the_first_layer_that_does_not_fit(keras):
  """An EfficientNet of width 1.05 is none of B0-B7: it first departs from B0 (the variant it follows
  furthest) at block4a's projection, 88 filters instead of 80."""
  model = _keras_efficientnet()(1.05, 1.0, 224, weights=None, input_shape=(32, 32, 3), include_top=False)
  with pytest.raises(InputError, match=r"'block4a_project_conv'.*EfficientNetB0.*\(1, 1, 240, 88\).*"
                     r"\(1, 1, 240, 80\)") as error:
    load_keras_weights(model)
  assert "\n" not in str(error.value)


def test_missing_layer_and_wrong_top_are_named(files, tmp_path):
  path = str(tmp_path / "missing.h5")
  shutil.copy(files["b0"]["legacy_weights"], path)
  with h5py.File(path, "r+") as f:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
    f.attrs["layer_names"] = [n.encode() for n in names if n != "block6c_se_reduce"]
  with pytest.raises(InputError, match="'block6c_se_reduce' of EfficientNetB0 is missing"):
    load_keras_weights(path)
  with pytest.raises(InputError, match=rf"'predictions'.*\(1280, {CLASSES}\).*\(1280, 7\)"):
    load_keras_weights(files["b0"]["legacy_weights"], num_classes=7)
  with pytest.raises(InputError, match="no top"):
    load_keras_weights(files["b0"]["notop"], num_classes=CLASSES)


def test_backbone_names_and_input_shapes():
  assert BACKBONES == ("inception_resnet_v2",) + tuple(f"efficientnet_b{i}" for i in range(8))
  irv2 = backbone("inception_resnet_v2")
  assert isinstance(irv2, InceptionResNetV2) and irv2.num_classes is None
  b5 = backbone("efficientnet_b5", 4, remat=True)
  assert isinstance(b5, EfficientNet) and (b5.variant, b5.num_classes, b5.remat) == ("b5", 4, True)
  with pytest.raises(InputError, match="'efficientnet_b8' must be one of inception_resnet_v2, "
                     "efficientnet_b0, .*efficientnet_b7"):
    backbone("efficientnet_b8")
  with pytest.raises(InputError, match=r"got an array of shape \(1, 31, 32, 3\)"):
    EfficientNet(variant="b0").init(jax.random.PRNGKey(0), jnp.zeros((1, 31, 32, 3)), train=False)


# -------------------------------------------------------------------------------- cache, Keras 3
def test_cache_cli_round_trip_names_the_backbone(files, tmp_path, capsys):
  out = str(tmp_path / "b3_notop")
  assert keras_weights.main(["--source", files["b3"]["keras3"], "--out", out, "--no-top"]) == 0
  assert "(no top) of efficientnet_b3 to" in capsys.readouterr().out
  restored = load_keras_weights(out)
  assert keras_weights.backbone_name(restored) == "efficientnet_b3"
  assert_trees_equal(restored, load_keras_weights(files["b3"]["keras3"], num_classes=None))
  with pytest.raises(InputError, match="without the top"):
    load_keras_weights(out, num_classes=CLASSES)
  params = dict(restored["params"])
  del params["block7b"]  # No variant has B3's blocks but its last.
  changed = keras_weights.save_variables({**restored, "params": params}, str(tmp_path / "changed"))
  with pytest.raises(InputError, match=r"no EfficientNet B0-B7 \(stem_conv kernel \(3, 3, 3, 40\), 26 blocks"):
    load_keras_weights(changed)


def test_keras3_file_without_layer_names_loads_through_keras(files, tmp_path):
  path = str(tmp_path / "old.weights.h5")
  shutil.copy(files["b0"]["keras3"], path)
  with h5py.File(path, "r+") as f:
    for key in f["layers"]:
      if "vars" in f["layers"][key]:
        f["layers"][key]["vars"].attrs.pop("name", None)
  assert_trees_equal(load_keras_weights(path, num_classes=CLASSES),
                     load_keras_weights(files["b0"]["keras3"], num_classes=CLASSES))


# -------------------------------------------------------------------------- pmap, remat, dtype
def test_pmap_averages_batch_stats_and_remat_keeps_values_and_gradients(files):
  variables = load_keras_weights(files["b0"]["legacy_weights"])
  x = np.random.RandomState(5).uniform(0, 255, (8, 32, 32, 3)).astype(np.float32)
  model = EfficientNet(variant="b0", num_classes=CLASSES, drop_connect_rate=0.0, dropout_rate=0.0)
  single = jax.jit(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]))(variables, x)
  sharded = jax.pmap(lambda v, x: model.clone(bn_axis_name="batch").apply(
      v, x, train=True, mutable=["batch_stats"]), axis_name="batch", in_axes=(None, 0))(
          variables, x.reshape(8, 1, 32, 32, 3))
  assert rel_diff(np.asarray(sharded[0]).reshape(8, CLASSES), single[0]) <= RTOL
  for got, want in zip(jax.tree.leaves(sharded[1]), jax.tree.leaves(single[1])):
    np.testing.assert_allclose(np.asarray(got)[0], want, rtol=RTOL, atol=RTOL)

  def loss(params, remat):
    return jnp.sum(model.clone(remat=remat).apply(
        {**variables, "params": params}, x[:2], train=False) ** 2)
  grads = [jax.jit(jax.grad(loss), static_argnums=1)(variables["params"], remat) for remat in (False, True)]
  assert jax.tree.structure(grads[1]) == jax.tree.structure(grads[0])
  for got, want in zip(jax.tree.leaves(grads[1]), jax.tree.leaves(grads[0])):
    assert rel_diff(got, want) <= RTOL


def test_top_dropout_in_training_only_and_bfloat16(files):
  """Top dropout (B0's 0.2) changes the logits in training, not the batch statistics before it; a
  bfloat16 model keeps float32 variables and stays close to the float32 one."""
  variables = load_keras_weights(files["b0"]["legacy_weights"])
  x = np.random.RandomState(6).uniform(0, 255, (2, 32, 32, 3)).astype(np.float32)
  model = EfficientNet(variant="b0", num_classes=CLASSES, drop_connect_rate=0.0)
  train = jax.jit(lambda v, x, seed: model.apply(v, x, train=True, mutable=["batch_stats"],
                                                 rngs={"dropout": jax.random.PRNGKey(seed)}))
  (first, stats_1), (second, stats_2) = train(variables, x, 0), train(variables, x, 1)
  assert rel_diff(first, second) > 1e-3
  assert_trees_equal(stats_1, stats_2)
  want = jitted_apply("b0", CLASSES)(variables, x)
  half = EfficientNet(variant="b0", num_classes=CLASSES, dtype=jnp.bfloat16)
  got = jax.jit(lambda v, x: half.apply(v, x, train=False))(variables, x)
  assert got.dtype == jnp.float32 and rel_diff(got, want) < 0.1
  shapes = jax.eval_shape(lambda: half.init(jax.random.PRNGKey(0), x, train=False))
  assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}


# ---------------------------------------------------------------------- the melanoma classifier
def test_classifier_takes_the_projects_model_input_whatever_the_backbone(files, keras_models, images):
  """`build_model("efficientnet_b0")` is the classifier on that backbone: fed the project's [-1, 1] model
  input of an image, its embedding equals Keras' EfficientNetB0 on the same image's 0-255 pixels (the
  conversion lives with the backbone), and a pretrained backbone goes in through the same path as
  InceptionResNetV2's."""
  from melanoma_jax import models  # pylint: disable=g-import-not-at-top
  model = models.build_model("efficientnet_b0", head_sizes=(8,), dropout_rate=0.0)
  backbone_variables = load_keras_weights(files["b0"]["notop"], num_classes=None)
  variables = models.init_with_pretrained_backbone(model, jax.random.PRNGKey(0), backbone_variables)
  model_input = images / 127.5 - 1.0  # What the data pipeline, predict and the SavedModel make.
  logits, state = jax.jit(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]))(
      variables, model_input)
  embedding = np.asarray(state["intermediates"]["embedding"][0])
  assert logits.shape == (2,) and np.all(np.isfinite(logits))
  assert rel_diff(embedding, np.asarray(keras_models["b0"][1](images, training=False))) <= RTOL
  assert models.min_image_size("efficientnet_b0") == efficientnet.MIN_IMAGE_SIZE
