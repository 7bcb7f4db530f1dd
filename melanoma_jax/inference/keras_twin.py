"""A trained Flax model's Keras twin: the same network as a Keras 3 (TensorFlow backend) model with the run's
weights, which Keras' own ONNX export (tf2onnx over a plain TF graph) turns into ONNX.

`twin(trained)` -> keras.Model: float32 [B, S, S, 3] model inputs (NHWC, in [-1, 1], as the predict command's
Reader makes them) -> float32 [B] probabilities of melanoma (sigmoid of the one logit, or the MEL column of a
diagnosis softmax: `models.melanoma_probability`), BatchNorm in inference mode, dropout off, and the mean over
the run's TTA views (`training.steps.tta_views`), as `training.steps.make_predict_step` computes them.

* "inception_resnet_v2": `keras.applications.InceptionResNetV2(include_top=False, pooling="avg")` plus Dense
  layers of the head's sizes. Its weights are put in through the converter's own layer mapping
  (`models.inception_resnet_v2_keras.map_layers`, which proves the two networks equal layer for layer and is
  tested against Keras): each Keras variable is handed to it as a placeholder array, and the placeholder it
  returns for a Flax path names the Keras variable that path fills. So there is one mapping, not two.
* "efficientnet_b0" .. "efficientnet_b7": `keras.applications.EfficientNetB<n>(include_top=False, weights=None,
  pooling="avg")` after a Rescaling from model inputs to its [0, 255] pixels, plus the head's Dense layers. Its
  weights are put in through the converter's own list of Keras layers and Flax paths
  (`models.efficientnet_keras.units`), read backwards: one mapping, not two. Built without ImageNet weights,
  Keras adds no ImageNet `Rescaling`, so the Flax normalisation statistics (that rescaling already folded in)
  go into its `Normalization` as they are.
* "tiny": Conv2D(3x3, stride 2, "same", no bias) + BatchNormalization + ReLU twice, global average pool,
  Dense(1): `models.tiny` layer for layer.

Any other model is refused with one line. The caller checks the twin against the JAX path on real images.
"""
import os

import numpy as np

from melanoma_jax.image import setup
from melanoma_jax.models import backbones
from melanoma_jax.models import efficientnet_keras
from melanoma_jax.models import inception_resnet_v2_keras as irv2_keras
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

MODELS = backbones.BACKBONES + ("tiny",)
_BN_EPSILON = 1e-3  # models.tiny's and InceptionResNetV2's BatchNorm epsilon, as Keras'.


def keras():
  """Keras on the TensorFlow backend (TensorFlow first, with its GPUs hidden); InputError on another one."""
  tf()
  os.environ.setdefault("KERAS_BACKEND", "tensorflow")
  import keras as keras_module  # pylint: disable=g-import-not-at-top
  if keras_module.backend.backend() != "tensorflow":
    raise InputError(f"the ONNX export needs Keras on TensorFlow; KERAS_BACKEND is {keras_module.backend.backend()}")
  return keras_module


class _Placeholder:
  """A Keras layer as `map_layers` reads it (`name`, `weights` {role: array}, `kind`, `shapes()`), its arrays
  zeros whose identity leads back to the Keras variable."""

  def __init__(self, layer):
    self.name = layer.name
    self.variables = _keras_variables(layer)
    self.weights = {role: np.zeros(tuple(v.shape), np.float32) for role, v in self.variables.items()}
    kernel = self.weights.get("kernel")
    self.kind = ("bn" if "moving_mean" in self.weights else "conv" if kernel is not None and kernel.ndim == 4
                 else "dense" if kernel is not None and kernel.ndim == 2 else "other")

  def shapes(self):
    return {role: a.shape for role, a in self.weights.items()}


def _fill_inception_resnet_v2(backbone, variables):
  """Assigns the Flax backbone's variables to the Keras InceptionResNetV2 `backbone` (see the module doc)."""
  placeholders = [_Placeholder(layer) for layer in backbone.layers if layer.weights]
  owner = {id(a): p.variables[role] for p in placeholders for role, a in p.weights.items()}
  mapped = irv2_keras.map_layers(placeholders, None, "the Keras twin")
  for (collection, *path), placeholder in mapped.items():
    owner[id(placeholder)].assign(np.asarray(variables[collection]["backbone"][tuple(path)], np.float32))
  if len(mapped) != len(owner):
    raise InputError(f"the Keras twin: {len(owner) - len(mapped)} Keras variable(s) were not filled")


def _keras_variables(layer):
  """{role: Keras variable} of `layer` (role: the variable's own name, e.g. 'kernel', 'moving_mean')."""
  return {v.name.split("/")[-1].split(":")[0]: v for v in layer.weights}


def _fill_efficientnet(backbone, variant, flat):
  """Assigns the Flax EfficientNet's `flat` variables ({(collection, *path): array}) to the Keras EfficientNet
  `backbone` (see the module doc)."""
  layers = {layer.name: layer for layer in backbone.layers if layer.weights}
  for name, layer in list(layers.items()):
    if set(_keras_variables(layer)) == {"mean", "variance", "count"}:  # Matched by its weights, as the converter does.
      layers[efficientnet_keras.NORMALIZATION] = layers.pop(name)
  flat = dict(flat)
  for unit in efficientnet_keras.units(variant, None):
    layer = layers.pop(unit.layer, None)
    if layer is None:
      raise InputError(f"the Keras twin: EfficientNet{variant.upper()} has no layer '{unit.layer}'")
    keras_variables = _keras_variables(layer)
    for role, (path, shape) in unit.targets.items():
      if path is not None:  # Flax's depthwise kernel [k, k, 1, C] is Keras' [k, k, C, 1]: the same values in order.
        keras_variables[role].assign(np.asarray(flat.pop(path), np.float32).reshape(shape))
    if unit.layer == efficientnet_keras.NORMALIZATION:
      # Keras' Normalization computes with tensors it took from its variables when it was built (zeros and ones
      # here), which the ONNX converter would also turn into model inputs: numpy constants of the values instead.
      for attribute, role in (("mean", "mean"), ("variance", "variance")):
        setattr(layer, attribute, np.asarray(keras_variables[role].numpy(), np.float32).reshape(1, 1, 1, -1))
  if layers or flat:
    raise InputError(f"the Keras twin: {len(layers)} Keras layer(s) and {len(flat)} Flax variable(s) of "
                     f"EfficientNet{variant.upper()} were not matched")


def _flat(tree):
  import flax.traverse_util  # pylint: disable=g-import-not-at-top
  return flax.traverse_util.flatten_dict(tree)


def _dense(keras_, params, activation=None):
  layer = keras_.layers.Dense(params["kernel"].shape[1], activation=activation)
  return layer, [np.asarray(params["kernel"], np.float32), np.asarray(params["bias"], np.float32)]


def _melanoma_probability(keras_, logits):
  """p(malignant) [B, 1] of logits [B, K], as `models.melanoma_probability`: the sigmoid of one logit, or the
  MEL column (class 0) of a diagnosis softmax."""
  if logits.shape[-1] == 1:
    return keras_.layers.Activation("sigmoid")(logits)
  return keras_.layers.Softmax()(logits)[:, :1]


def _views(keras_, x, tta):
  """The `tta` views of `x` as `training.steps.tta_views` makes them: 1 the images, 2 with the horizontal flip,
  3 with the vertical flip too, 8 every flip and transpose (True/False: 3/1, as older runs recorded them)."""
  count = setup.tta_views(tta)
  flip = keras_.ops.flip
  flips = [x, flip(x, axis=2), flip(x, axis=1), flip(flip(x, axis=1), axis=2)]
  if count in (1, 2, 3):
    return flips[:count]
  if count == 8:
    return flips + [keras_.ops.transpose(v, (0, 2, 1, 3)) for v in flips]
  raise InputError(f"tta={tta!r}: the ONNX export takes 1, 2, 3 or 8 TTA views")


def _core(keras_, model_name, variables, size):
  """The network without TTA: model inputs -> probabilities [B, 1], and the weights to set once it is built."""
  inputs = keras_.Input((size, size, 3), dtype="float32")
  pending = []
  if model_name in backbones.BACKBONES:
    backbone_variables = {"params": {"backbone": _flat(variables["params"]["backbone"])},
                          "batch_stats": {"backbone": _flat(variables["batch_stats"]["backbone"])}}
    if model_name == backbones.INCEPTION_RESNET_V2:
      backbone = keras_.applications.InceptionResNetV2(include_top=False, weights=None,
                                                       input_shape=(size, size, 3), pooling="avg")
      _fill_inception_resnet_v2(backbone, backbone_variables)
      x = backbone(inputs)
    else:
      variant = model_name.rsplit("_", 1)[1]
      backbone = getattr(keras_.applications, backbones.display_name(model_name))(
          include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
      _fill_efficientnet(backbone, variant, {(c, *path): a for c, tree in backbone_variables.items()
                                             for path, a in tree["backbone"].items()})
      x = backbone(keras_.layers.Rescaling(127.5, offset=127.5)(inputs))  # backbones.from_model_input
    head = variables["params"]["head"]
    hidden = sorted((k for k in head if k.startswith("dense_")), key=lambda k: int(k.split("_")[1]))
    for name in hidden + ["logit"]:
      layer, weights = _dense(keras_, head[name], "relu" if name != "logit" else None)
      x = layer(x)
      pending.append((layer, weights))
    x = _melanoma_probability(keras_, x)
  elif model_name == "tiny":
    params, stats = variables["params"]["backbone"], variables["batch_stats"]["backbone"]
    x = inputs
    for i in range(2):
      conv = keras_.layers.Conv2D(params[f"conv{i}"]["kernel"].shape[-1], 3, strides=2, padding="same", use_bias=False)
      bn = keras_.layers.BatchNormalization(epsilon=_BN_EPSILON)
      x = keras_.layers.ReLU()(bn(conv(x)))
      pending.append((conv, [np.asarray(params[f"conv{i}"]["kernel"], np.float32)]))
      pending.append((bn, [np.asarray(a, np.float32) for a in (params[f"bn{i}"]["scale"], params[f"bn{i}"]["bias"],
                                                               stats[f"bn{i}"]["mean"], stats[f"bn{i}"]["var"])]))
    x = keras_.layers.GlobalAveragePooling2D()(x)
    layer, weights = _dense(keras_, variables["params"]["head"])
    x = _melanoma_probability(keras_, layer(x))
    pending.append((layer, weights))
  else:
    raise InputError(f"model {model_name!r} has no ONNX export (those that have: {', '.join(MODELS)})")
  model = keras_.Model(inputs, x)
  for layer, weights in pending:
    layer.set_weights(weights)
  return model


def twin(model_name, variables, image_size, tta):
  """The Keras twin of model `model_name` (one of MODELS) with Flax `variables` ({'params', 'batch_stats'}) for
  `image_size` pixels a side, averaged over `tta` views (a number, or True/False); see the module doc."""
  keras_ = keras()
  size = int(image_size)
  core = _core(keras_, model_name, variables, size)
  inputs = keras_.Input((size, size, 3), dtype="float32", name="image")
  views = _views(keras_, inputs, tta)
  probability = keras_.layers.Average()([core(v) for v in views]) if len(views) > 1 else core(inputs)
  return keras_.Model(inputs, keras_.ops.reshape(probability, (-1,)), name="melanoma_jax")
