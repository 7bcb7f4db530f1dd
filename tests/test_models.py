"""Flax InceptionResNetV2 == keras.applications.InceptionResNetV2; weight conversion; classifier; the model
factory; the XLA:CPU kernels against the plain ops in the whole network.

Keras models are built once per module, with random weights and randomised BatchNorm statistics
and biases (so that swapped mean/variance, a wrong epsilon or a dropped bias cannot hide behind
Keras' zero/one initial values). Each jitted Flax function is compiled once and shared.
"""
import functools
import os
import re
import shutil

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melanoma_jax.models import build_model
from melanoma_jax.models import DTYPES
from melanoma_jax.models import Head
from melanoma_jax.models import InceptionResNetV2
from melanoma_jax.models import init_with_pretrained_backbone
from melanoma_jax.models import keras_weights
from melanoma_jax.models import KERNELS
from melanoma_jax.models import MelanomaClassifier
from melanoma_jax.models import MIN_IMAGE_SIZE
from melanoma_jax.models import with_pretrained_backbone
from melanoma_jax.models.inception_resnet_v2 import conv_bn_paths
from melanoma_jax.models.inception_resnet_v2 import materialise
from melanoma_jax.models.keras_weights import load_keras_weights
from melanoma_jax.models.mlp import MLP
from melanoma_jax.models.tiny import TinyClassifier
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

RTOL = 1e-4
FULL, NOTOP = 55_873_736, 54_336_736


def rel_diff(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.abs(got - want).max() / np.abs(want).max())


def count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def abstract_variables(model):
  return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                           jnp.zeros((1, MIN_IMAGE_SIZE, MIN_IMAGE_SIZE, 3)), train=False))


def shapes_and_dtypes(tree):
  return jax.tree.map(lambda a: (a.shape, a.dtype), tree)


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


def _randomise(keras, model, seed):
  """Random BatchNorm beta / moving statistics and biases (Keras initialises them to 0 and 1)."""
  rng = np.random.RandomState(seed)
  for layer in model.layers:
    if isinstance(layer, keras.layers.BatchNormalization):
      beta, mean, var = layer.get_weights()
      layer.set_weights([rng.normal(0, 0.1, beta.shape), rng.normal(0, 0.1, mean.shape),
                         rng.uniform(0.5, 1.5, var.shape)])
    elif getattr(layer, "use_bias", False):
      kernel, bias = layer.get_weights()
      layer.set_weights([kernel, rng.normal(0, 0.1, bias.shape)])
  return model


@pytest.fixture(scope="module")
def keras_full(keras):
  """The 1000-class model with logits out, on inputs of any size (an unsized input tensor)."""
  keras.utils.set_random_seed(0)
  model = keras.applications.InceptionResNetV2(
      weights=None, input_tensor=keras.Input((None, None, 3)), classifier_activation=None)
  return _randomise(keras, model, 1)


@pytest.fixture(scope="module")
def keras_notop(keras):
  keras.utils.set_random_seed(0)
  model = keras.applications.InceptionResNetV2(weights=None, include_top=False, pooling="avg")
  return _randomise(keras, model, 2)


@pytest.fixture(scope="module")
def files(keras_full, keras_notop, tmp_path_factory):
  """The full model saved in each file kind, and the no-top model as legacy weights (ImageNet's)."""
  from keras.src.legacy.saving import legacy_h5_format  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("keras_files")
  paths = {"legacy_full": str(root / "full.h5"), "legacy_weights": str(root / "weights.h5"),
           "keras3": str(root / "model.weights.h5"), "notop": str(root / "notop.h5")}
  keras_full.save(paths["legacy_full"])
  keras_full.save_weights(paths["keras3"])
  for kind, model in (("legacy_weights", keras_full), ("notop", keras_notop)):
    with h5py.File(paths[kind], "w") as f:
      legacy_h5_format.save_weights_to_hdf5_group(f, model)
  yield paths
  shutil.rmtree(root, ignore_errors=True)  # ~900 MB


@pytest.fixture
def big_tmp(tmp_path):
  """tmp_path, emptied after the test: the copies made there are ~225 MB each."""
  yield tmp_path
  shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.fixture(scope="module")
def images():
  rng = np.random.RandomState(0)
  return {n: rng.uniform(-1, 1, (b, n, n, 3)).astype(np.float32) for n, b in ((75, 2), (299, 2))}


@pytest.fixture(scope="module")
def train_images():
  return np.random.RandomState(1).uniform(-1, 1, (8, 75, 75, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def keras_logits_75(keras_full, images):
  return np.asarray(keras_full([images[75]], training=False))


@pytest.fixture(scope="module")
def full_variables(keras_full):
  return load_keras_weights(keras_full, num_classes=1000)


@pytest.fixture(scope="module")
def notop_variables(files):
  return load_keras_weights(files["notop"], num_classes=None)


@pytest.fixture(scope="module")
def full_apply():
  return jax.jit(lambda v, x: InceptionResNetV2(num_classes=1000).apply(v, x, train=False))


@pytest.fixture(scope="module")
def notop_apply():
  return jax.jit(lambda v, x: InceptionResNetV2(num_classes=None).apply(v, x, train=False))


@pytest.fixture(scope="module")
def single_device_train(full_variables, train_images):
  """(logits, updated batch_stats) of one training-mode forward on the global batch of 8."""
  fn = jax.jit(lambda v, x: InceptionResNetV2(num_classes=1000).apply(
      v, x, train=True, mutable=["batch_stats"]))
  logits, updated = fn(full_variables, train_images)
  return np.asarray(logits), jax.device_get(updated["batch_stats"])


@pytest.fixture(scope="module")
def classifier_shapes():
  """jax.eval_shape of MelanomaClassifier variables (the same tree for any dtype and remat)."""
  return abstract_variables(build_model("inception_resnet_v2"))


# ------------------------------------------------------------------------- architecture parity
def test_parameter_counts_equal_keras(keras_full, keras_notop):
  full = abstract_variables(InceptionResNetV2(num_classes=1000))
  notop = abstract_variables(InceptionResNetV2(num_classes=None))
  assert count(full) == keras_full.count_params() == FULL
  assert count(notop) == keras_notop.count_params() == NOTOP
  assert count(full["params"]) == sum(int(np.prod(w.shape)) for w in keras_full.trainable_weights)
  assert "predictions" not in notop["params"] and len(conv_bn_paths()) == 203


@pytest.mark.parametrize("kind", ["legacy_full", "legacy_weights", "keras3", "live"])
def test_full_model_matches_keras_at_75(kind, files, keras_full, images, keras_logits_75,
                                        full_apply):
  source = keras_full if kind == "live" else files[kind]
  variables = load_keras_weights(source, num_classes=1000)
  logits = full_apply(variables, images[75])
  assert logits.shape == (2, 1000)
  diff = rel_diff(logits, keras_logits_75)
  print(f"parity 75x75 full model from {kind}: max rel diff {diff:.2e}")
  assert diff <= RTOL


def test_full_model_matches_keras_at_299(keras_full, images, files, full_apply):
  variables = load_keras_weights(files["legacy_weights"])  # num_classes="auto": keeps the top
  want = np.asarray(keras_full([images[299]], training=False))
  diff = rel_diff(full_apply(variables, images[299]), want)
  print(f"parity 299x299 full model: max rel diff {diff:.2e}")
  assert diff <= RTOL


def test_no_top_features_match_keras(keras_notop, images, notop_variables, notop_apply):
  assert "predictions" not in notop_variables["params"]
  features = notop_apply(notop_variables, images[75])
  assert features.shape == (2, 1536)
  diff = rel_diff(features, keras_notop(images[75], training=False))
  print(f"parity 75x75 no-top features: max rel diff {diff:.2e}")
  assert diff <= RTOL


def test_dropping_the_top_keeps_the_backbone(files, full_variables):
  backbone = load_keras_weights(files["legacy_full"], num_classes=None)
  assert "predictions" not in backbone["params"]
  full_params = dict(full_variables["params"])
  full_params.pop("predictions")
  assert_trees_equal(backbone, {"params": full_params,
                                "batch_stats": full_variables["batch_stats"]})


def test_training_mode_matches_keras(keras_full, train_images, single_device_train):
  logits, batch_stats = single_device_train
  saved = keras_full.get_weights()
  try:
    want = np.asarray(keras_full([train_images], training=True))  # also updates moving stats
    updated = load_keras_weights(keras_full, num_classes=1000)["batch_stats"]
  finally:
    keras_full.set_weights(saved)
  diff = rel_diff(logits, want)
  print(f"parity 75x75 training mode: max rel diff {diff:.2e}")
  assert diff <= RTOL
  for got, expected in zip(jax.tree.leaves(batch_stats), jax.tree.leaves(updated)):
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=RTOL)


def test_pmap_averages_batch_stats_across_devices(full_variables, train_images,
                                                 single_device_train):
  assert jax.local_device_count() == 8
  model = InceptionResNetV2(num_classes=1000, bn_axis_name="batch")
  step = jax.pmap(lambda v, x: model.apply(v, x, train=True, mutable=["batch_stats"]),
                  axis_name="batch", in_axes=(None, 0))
  logits, updated = step(full_variables, train_images.reshape(8, 1, 75, 75, 3))
  want_logits, want_stats = single_device_train
  assert rel_diff(np.asarray(logits).reshape(8, 1000), want_logits) <= RTOL
  for got, want in zip(jax.tree.leaves(updated["batch_stats"]), jax.tree.leaves(want_stats)):
    got = np.asarray(got)
    assert got.shape == (8,) + want.shape
    np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=RTOL, atol=1e-5)


# ------------------------------------------------------------------- residual chain materialised
def _longest_fused_relu_chain(keep, blocks=6):
  """Most ReLUs in one fused computation of the compiled gradient of a chain of residual blocks."""
  def loss(kernels, x):
    for kernel in kernels:
      x = keep(jax.nn.relu(x + 0.1 * jnp.dot(jax.nn.relu(x), kernel)))
    return jnp.sum(x * x)
  kernels = [jnp.full((32, 32), 0.01)] * blocks
  hlo = jax.jit(jax.grad(loss)).lower(kernels, jnp.ones((8, 16, 16, 32))).compile().as_text()
  return max(c.count(" maximum(") for c in hlo.split("\n\n") if c.lstrip("%").startswith("fused"))


def test_materialise_keeps_xla_from_recomputing_the_residual_chain():
  # Left alone, XLA fuses all six blocks' sums into one consumer (the quadratic recomputation seen in the
  # full model); materialised, each block is computed once.
  assert _longest_fused_relu_chain(lambda x: x) == 6
  assert _longest_fused_relu_chain(materialise) == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_materialise_is_the_identity_in_value_and_gradient(dtype):
  # Normal numbers only: XLA:CPU flushes subnormals to zero in every op, ReLU included.
  x = jnp.asarray([-0.0, 0.0, 2e-38, -3.5, 7e30, np.nan, 1.0 / 3.0], dtype)
  got = jax.jit(materialise)(x)
  assert got.dtype == dtype
  np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(x, np.float32))
  g = jax.grad(lambda v: jnp.sum(materialise(v) * jnp.arange(3.0)))(jnp.ones(3))
  np.testing.assert_array_equal(g, [0.0, 1.0, 2.0])


# ----------------------------------------------------------------------------- input checking
@pytest.mark.parametrize("remat", [False, True])
def test_any_size_up_to_1024_and_remat_of_residual_blocks(remat, classifier_shapes):
  model = build_model("inception_resnet_v2", remat=remat)
  apply = lambda v, x: model.apply(v, x, train=False)
  x = jax.ShapeDtypeStruct((2, 1024, 1024, 3), jnp.float32)
  jaxpr, out = jax.make_jaxpr(apply, return_shape=True)(classifier_shapes, x)
  assert out.shape == (2,) and out.dtype == jnp.float32
  assert len(re.findall(r"= (?:remat2|checkpoint)\[", str(jaxpr))) == (40 if remat else 0)
  if not remat:
    x = jax.ShapeDtypeStruct((2, 100, 77, 3), jnp.float32)
    assert jax.eval_shape(apply, classifier_shapes, x).shape == (2,)


@pytest.mark.parametrize("shape", [(2, 75, 74, 3), (2, 75, 75, 4), (75, 75, 3), (2, 3, 75, 75)])
def test_bad_input_shapes_raise(shape):
  model = InceptionResNetV2(num_classes=None)
  with pytest.raises(InputError, match="got an array of shape " + re.escape(str(shape))):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape), train=False))


# -------------------------------------------------------------------------- conversion errors
def test_other_model_file_names_layer_and_shapes(keras, tmp_path):
  inputs = keras.Input((32, 32, 3))
  x = keras.layers.Conv2D(8, 3)(inputs)
  x = keras.layers.BatchNormalization()(x)
  outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
  small = keras.Model(inputs, outputs)
  path = str(tmp_path / "small.h5")
  small.save(path)
  conv = small.layers[1].name
  with pytest.raises(InputError, match=rf"'{conv}'.*\(3, 3, 3, 8\).*\(3, 3, 3, 32\)"):
    load_keras_weights(path)


def test_changed_shape_names_layer_and_shapes(files, keras_full, big_tmp):
  [layer] = [l for l in keras_full.layers
             if l.weights and tuple(l.weights[0].shape) == (3, 3, 256, 256)]
  path = str(big_tmp / "changed.h5")
  shutil.copy(files["legacy_weights"], path)
  with h5py.File(path, "r+") as f:
    name = f[layer.name].attrs["weight_names"][0]
    del f[layer.name][name]
    f[layer.name].create_dataset(name, data=np.zeros((3, 3, 256, 200), np.float32))
  with pytest.raises(InputError,
                     match=rf"'{layer.name}'.*mixed_6a.*\(3, 3, 256, 200\).*\(3, 3, 256, 256\)"):
    load_keras_weights(path)


def test_missing_layer_is_named(files, big_tmp):
  path = str(big_tmp / "missing.h5")
  shutil.copy(files["legacy_weights"], path)
  with h5py.File(path, "r+") as f:
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
    f.attrs["layer_names"] = [n.encode() for n in names if n != "block8_3_conv"]
    assert len(f.attrs["layer_names"]) == len(names) - 1
  with pytest.raises(InputError, match="'block8_3_conv'.*missing"):
    load_keras_weights(path)


def test_missing_and_unreadable_files(files, tmp_path):
  missing = str(tmp_path / "nowhere.h5")
  with pytest.raises(InputError, match="not found.*nowhere.h5"):
    load_keras_weights(missing)
  text = tmp_path / "text.h5"
  text.write_text("not hdf5")
  with pytest.raises(InputError, match="text.h5.*not an HDF5 file"):
    load_keras_weights(str(text))
  with pytest.raises(InputError, match="no top"):
    load_keras_weights(files["notop"], num_classes=1000)
  with pytest.raises(InputError, match=r"predictions.*\(1536, 1000\).*\(1536, 10\)"):
    load_keras_weights(files["legacy_weights"], num_classes=10)


def test_imagenet_offline_is_one_line_input_error():
  # conftest points KERAS_HOME at an empty folder, so Keras must try (and here fail) to download.
  assert not os.path.exists(os.path.join(
      os.environ["KERAS_HOME"], "models", "inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5"))
  with pytest.raises(InputError, match="ImageNet") as error:
    load_keras_weights("imagenet", num_classes=None)
  assert "\n" not in str(error.value)


def test_keras3_file_without_layer_names_loads_through_keras(files, full_variables, big_tmp):
  path = str(big_tmp / "old.weights.h5")
  shutil.copy(files["keras3"], path)
  with h5py.File(path, "r+") as f:
    for key in f["layers"]:
      del f["layers"][key]["vars"].attrs["name"]
  assert_trees_equal(load_keras_weights(path, num_classes=1000), full_variables)


# ------------------------------------------------------------------------------- cache (CLI)
def test_cache_cli_round_trip(files, notop_variables, big_tmp, capsys):
  out = str(big_tmp / "irv2_notop")
  assert keras_weights.main(["--source", files["notop"], "--out", out, "--no-top"]) == 0
  assert "54336736 values (no top)" in capsys.readouterr().out
  assert_trees_equal(load_keras_weights(out), notop_variables)
  assert_trees_equal(keras_weights.init_backbone_variables(out, include_top=False),
                     notop_variables)
  assert keras_weights.main(["--source", files["notop"], "--out", out]) == 1
  assert "already exists" in capsys.readouterr().err
  with pytest.raises(InputError, match="without the top"):
    load_keras_weights(out, num_classes=1000)
  with pytest.raises(InputError, match="no top"):
    keras_weights.init_backbone_variables(out, include_top=True)


# -------------------------------------------------------------------------------- classifier
def test_classifier_tree_and_pretrained_backbone(notop_variables, classifier_shapes):
  model = build_model("inception_resnet_v2")
  abstract = classifier_shapes
  assert set(abstract["params"]) == {"backbone", "head"}
  assert jax.tree.structure(abstract["params"]["backbone"]) == jax.tree.structure(
      notop_variables["params"])
  assert jax.tree.structure(abstract["batch_stats"]["backbone"]) == jax.tree.structure(
      notop_variables["batch_stats"])
  assert [tuple(v["kernel"].shape) for v in abstract["params"]["head"].values()] == [
      (1536, 512), (512, 256), (256, 64), (64, 16), (16, 1)]

  variables = init_with_pretrained_backbone(model, jax.random.PRNGKey(0), notop_variables)
  assert shapes_and_dtypes(variables) == shapes_and_dtypes(abstract)
  assert_trees_equal(variables["params"]["backbone"], notop_variables["params"])
  assert_trees_equal(variables["batch_stats"]["backbone"], notop_variables["batch_stats"])
  assert all(float(jnp.abs(k).max()) > 0 for k in jax.tree.leaves(variables["params"]["head"])
             if k.ndim == 2)

  bad = jax.tree.map(lambda a: a, notop_variables)
  bad["params"]["conv_7b"]["conv"]["kernel"] = jnp.zeros((1, 1, 2080, 100))
  with pytest.raises(InputError, match=r"conv_7b/conv/kernel.*\(1, 1, 2080, 100\).*"
                     r"\(1, 1, 2080, 1536\)"):
    with_pretrained_backbone(variables, bad)


@pytest.mark.parametrize("name", ["inception_resnet_v2", "tiny"])
def test_frozen_backbone_gets_no_gradient_and_keeps_its_stats(name, notop_variables, train_images):
  model = build_model(name)
  if name == "tiny":
    variables = model.init({"params": jax.random.PRNGKey(0)}, train_images[:2], train=False)
  else:
    variables = init_with_pretrained_backbone(model, jax.random.PRNGKey(0), notop_variables)
  assert set(variables["params"]) == {"backbone", "head"}
  backbone = lambda params: params["backbone"]

  def loss(params, batch_stats, x):
    logits, updated = model.apply({"params": params, "batch_stats": batch_stats}, x, train=True,
                                  train_backbone=False, mutable=["batch_stats"],
                                  rngs={"dropout": jax.random.PRNGKey(1)})
    return jnp.sum(logits), (logits, updated["batch_stats"])

  grad_fn = jax.jit(jax.grad(loss, has_aux=True))
  grads, (logits, batch_stats) = grad_fn(variables["params"], variables["batch_stats"],
                                         train_images[:2])
  assert logits.shape == (2,)
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(backbone(grads)))
  assert all(float(jnp.abs(g).max()) > 0.0 for g in jax.tree.leaves(grads["head"]))
  assert_trees_equal(batch_stats, variables["batch_stats"])


def test_bfloat16_keeps_float32_params_and_close_outputs(notop_variables, notop_apply, images):
  model = build_model("inception_resnet_v2", dtype="bfloat16")
  abstract = abstract_variables(model)
  assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {jnp.dtype(jnp.float32)}
  variables = init_with_pretrained_backbone(model, jax.random.PRNGKey(0), notop_variables)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images[75])
  assert logits.dtype == jnp.float32 and logits.shape == (2,)
  features = notop_apply(notop_variables, images[75])
  want = Head().apply({"params": variables["params"]["head"]}, features, train=False)
  diff = rel_diff(logits, want)
  print(f"bfloat16 vs float32 classifier logits: max rel diff {diff:.2e}")
  assert 0 < diff <= 0.05


def test_bfloat16_products_keep_float32_activations_and_the_bfloat16_networks_values(notop_variables, images):
  """With `bf16_dots` (a CPU with bfloat16 units) a bfloat16 network keeps its activations in float32 between
  bfloat16 products (`conv.activation_dtype`): its features are the plain bfloat16 network's within bfloat16
  rounding, and its features and input gradients are nearer the float32 network's than the plain bfloat16
  network's are (which round every activation, through 160 layers of backward pass)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import conv as conv_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  on = dataclasses.replace(kernels_lib.CPU, bf16_dots=True)
  off = dataclasses.replace(kernels_lib.CPU, bf16_dots=False)
  assert conv_lib.activation_dtype(jnp.bfloat16, on) == jnp.float32
  assert conv_lib.activation_dtype(jnp.bfloat16, off) == jnp.bfloat16
  assert conv_lib.activation_dtype(jnp.float32, on) == jnp.float32
  out = {}
  for name, kernels, dtype in (("on", on, jnp.bfloat16), ("off", off, jnp.bfloat16), ("f32", off, jnp.float32)):
    model = InceptionResNetV2(num_classes=None, dtype=dtype, kernels=kernels)

    def features(x, model=model):
      y, state = model.apply(notop_variables, x, train=False, capture_intermediates=True, mutable=["intermediates"])
      return y, state["intermediates"]["conv_1a"]["__call__"][0]

    def run(x, features=features):
      y, vjp = jax.vjp(lambda x_: features(x_)[0], x)
      return y, vjp(jnp.ones_like(y))[0]

    y, dx = jax.jit(run)(images[75])
    out[name] = (y, dx, jax.eval_shape(features, images[75])[1].dtype)
  assert out["on"][2] == jnp.float32 and out["off"][2] == jnp.bfloat16  # A conv + BatchNorm unit's output.
  assert rel_diff(out["on"][0], out["off"][0]) <= 0.05
  for k in (0, 1):  # Features, input gradients.
    assert rel_diff(out["on"][k], out["f32"][k]) < rel_diff(out["off"][k], out["f32"][k])
  assert float(jnp.abs(out["f32"][1]).max()) > 0


# ------------------------------------------------------------------------------ kernels, factory
def test_cpu_and_xla_kernels_give_the_same_network(full_variables, images):
  """All XLA:CPU workarounds on against all off, through the whole network: the same variables, and the
  same logits and gradients (parameters and input) up to float rounding."""
  models = {kernels: InceptionResNetV2(num_classes=1000, kernels=kernels) for kernels in ("cpu", "xla")}
  assert shapes_and_dtypes(abstract_variables(models["cpu"])) == shapes_and_dtypes(
      abstract_variables(models["xla"]))
  weights = jax.random.normal(jax.random.PRNGKey(2), (2, 1000))

  def loss(model, params, x):
    logits = model.apply({**full_variables, "params": params}, x, train=False)
    return jnp.sum(logits * weights), logits

  got, want = [jax.jit(jax.value_and_grad(functools.partial(loss, models[k]), argnums=(0, 1),
                                          has_aux=True))(full_variables["params"], images[75])
               for k in ("cpu", "xla")]
  (_, logits), grads = got
  (_, want_logits), want_grads = want
  assert rel_diff(logits, want_logits) <= RTOL
  assert jax.tree.structure(grads) == jax.tree.structure(want_grads)
  diffs = [rel_diff(g, w) for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads))]
  print(f"cpu vs xla kernels: logits {rel_diff(logits, want_logits):.2e}, gradients up to {max(diffs):.2e}")
  assert max(diffs) <= RTOL


@pytest.mark.parametrize("kernels", KERNELS)
def test_factory_builds_each_model_with_its_arguments(kernels):
  model = build_model("inception_resnet_v2", dtype="bfloat16", head_sizes=[8, 4], dropout_rate=0.2,
                      remat=True, kernels=kernels, bn_axis_name="batch")
  assert isinstance(model, MelanomaClassifier)
  assert (model.dtype, model.head_sizes, model.dropout_rate, model.remat, model.kernels,
          model.bn_axis_name) == (jnp.bfloat16, (8, 4), 0.2, True, kernels, "batch")
  tiny = build_model("tiny", dropout_rate=0.3, kernels=kernels, bn_axis_name="batch")
  assert isinstance(tiny, TinyClassifier)
  assert (tiny.dtype, tiny.dropout_rate, tiny.kernels, tiny.bn_axis_name) == (
      jnp.float32, 0.3, kernels, "batch")
  mlp = build_model("mlp", hidden_sizes=[16, 8], dropout_rate=0.5)
  assert isinstance(mlp, MLP) and (mlp.hidden_sizes, mlp.dropout_rate) == ((16, 8), 0.5)
  # The same variables whatever the kernels.
  x = jnp.zeros((1, 32, 32, 3))
  tiny_shapes = lambda k: shapes_and_dtypes(jax.eval_shape(
      lambda: build_model("tiny", kernels=k).init(jax.random.PRNGKey(0), x, train=False)))
  assert tiny_shapes(kernels) == tiny_shapes("xla")
  assert set(DTYPES) == {"float32", "bfloat16"} and MIN_IMAGE_SIZE == 75


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "resnet50"}, "model='resnet50' must be one of inception_resnet_v2, efficientnet_b0, "
                              "efficientnet_b1, efficientnet_b2, efficientnet_b3, efficientnet_b4, efficientnet_b5, "
                              "efficientnet_b6, efficientnet_b7, tiny, mlp"),
    ({"dtype": "float16"}, "dtype='float16' must be one of float32, bfloat16"),
    ({"kernels": "im2col"}, "kernels='im2col' must be one of auto, cpu, xla"),
    ({"name": "tiny", "head_sizes": (8,)}, "model 'tiny' has no argument(s) head_sizes (it takes dtype, "
     "dropout_rate, bn_axis_name, kernels, num_classes)"),
    ({"name": "mlp", "dtype": "float32"}, "model 'mlp' has no argument(s) dtype"),
])
def test_factory_refuses_unknown_names_in_one_line(kwargs, message):
  with pytest.raises(InputError, match=re.escape(message)) as error:
    build_model(**{"name": "inception_resnet_v2", **kwargs})
  assert "\n" not in str(error.value)
