"""Flax EfficientNet B0-B7 == keras.applications.EfficientNetB0..B7; weight conversion from every file kind;
training mode; drop-connect; refusals.

Keras models are built once per module with random weights and randomised BatchNorm statistics, biases
and Normalization statistics (Keras initialises them to 0 and 1, behind which swapped mean and variance,
a wrong epsilon or a dropped bias would hide). Inputs are 65x65: an odd side at every stride-2 layer
(65, 33, 17, 9, 5), so Keras' `correct_pad` takes its odd-size branch everywhere; the all-variants test runs
at 32x32, even everywhere. Each jitted Flax function is compiled once and shared.
"""
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
  """Random BatchNorm gamma / beta / moving statistics, biases and Normalization mean / variance
  (`normalization` = (mean, variance) to set given ones instead)."""
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      gamma, beta, mean, var = layer.get_weights()
      layer.set_weights([rng.uniform(0.5, 1.5, gamma.shape), rng.normal(0, 0.1, beta.shape),
                         rng.normal(0, 0.1, mean.shape), rng.uniform(0.5, 1.5, var.shape)])
    elif isinstance(layer, keras.layers.Normalization):
      mean, var = normalization or (rng.uniform(0.3, 0.6, 3), rng.uniform(0.03, 0.09, 3))
      layer.set_weights([np.asarray(mean), np.asarray(var), layer.get_weights()[2]])
      layer.finalize_state()  # Keras computes with a copy of its statistics made here, not set_weights.
    elif getattr(layer, "use_bias", False):
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
  return model


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
  model = _randomise(keras, _application(keras, variant, 32, classes=3, classifier_activation=None), 5)
  x = np.random.RandomState(1).uniform(0, 255, (1, 32, 32, 3)).astype(np.float32)
  variables = load_keras_weights(model)
  assert keras_weights.backbone_name(variables) == f"efficientnet_{variant}"
  assert variables["params"]["predictions"]["kernel"].shape == (efficientnet.widths(variant)[1], 3)
  logits = backbone(f"efficientnet_{variant}", 3).apply(variables, x, train=False)
  diff = rel_diff(logits, model(x, training=False))
  print(f"parity 32x32 EfficientNet{variant.upper()} logits: max rel diff {diff:.2e}")
  assert diff <= RTOL


# ---------------------------------------------------------------------- training, drop-connect
def test_training_mode_matches_keras(keras, images):
  """Batch statistics in the forward pass and the moving averages they update, with both dropouts off."""
  from keras.src.applications.efficientnet import EfficientNet as KerasEfficientNet  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(3)
  model = _randomise(keras, KerasEfficientNet(
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

  kept = run(efficientnet.MBConv(dataclasses_replace(spec, drop_rate=0.0)), True, 0)
  branch = run(block, True, 1)
  dropped = [i for i in range(16) if np.all(branch[i] == 0)]
  scaled = [i for i in range(16) if i not in dropped]
  assert dropped and scaled and np.all(kept[dropped] != 0)
  np.testing.assert_allclose(branch[scaled], kept[scaled] / 0.5, rtol=1e-5, atol=1e-6)
  assert not np.array_equal(branch, run(block, True, 2))  # Another rng, other samples.
  evaluated = run(block, False, 1)
  np.testing.assert_array_equal(evaluated, run(block, False, 2))
  np.testing.assert_array_equal(evaluated, run(efficientnet.MBConv(dataclasses_replace(spec, drop_rate=0.0)),
                                               False, 3))


def dataclasses_replace(spec, **changes):
  import dataclasses  # pylint: disable=g-import-not-at-top
  return dataclasses.replace(spec, **changes)
