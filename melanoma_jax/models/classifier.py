"""The melanoma classifier: a backbone's pooled features + the seed's dense head, one logit per image.

The backbone is InceptionResNetV2 (the seed's) or an EfficientNet B0-B7 (`backbones.BACKBONES`). Its input
is the project's model input, NHWC in [-1, 1], whichever backbone: `backbones.from_model_input` turns it
into the backbone's own convention inside the model.

Variables: params {'backbone': <backbone(name, num_classes=None) params>, 'head': {dense_0.., logit}},
batch_stats {'backbone': ...}; pretrained backbones go in with `with_pretrained_backbone` or, skipping
the slow random init of the backbone, `init_with_pretrained_backbone`.
"""
from typing import Any, Dict, Optional, Sequence, Union

import flax.linen as nn
import flax.traverse_util
import jax
import jax.numpy as jnp

from melanoma_jax.models import backbones
from melanoma_jax.models.inception_resnet_v2 import KERNEL_INIT
from melanoma_jax.models.kernels import Kernels
from melanoma_jax.utils.errors import InputError

Variables = Dict[str, Any]
_TOP = "predictions"


class Head(nn.Module):
  """Dense(size) + ReLU + Dropout for each size, then Dense(num_classes); returns float32 logits [B] (one
  class: the malignant logit) or [B, num_classes] (a softmax's, `data.diagnosis.CLASSES`)."""
  sizes: Sequence[int] = (512, 256, 64, 16)
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  num_classes: int = 1

  @nn.compact
  def __call__(self, x, train: bool):
    dense = lambda size, name, dtype: nn.Dense(  # Keras' default initialisers, as in the seed.
        size, dtype=dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT, name=name)
    for i, size in enumerate(self.sizes):
      x = nn.relu(dense(size, f"dense_{i}", self.dtype)(x))
      x = nn.Dropout(self.dropout_rate, deterministic=not train, name=f"dropout_{i}")(x)
    logits = dense(self.num_classes, "logit", jnp.float32)(x)
    return logits[:, 0] if self.num_classes == 1 else logits


class MelanomaClassifier(nn.Module):
  """A backbone without top, global average pooled, then `Head`.

  Attributes:
    backbone_name: one of `backbones.BACKBONES` (its submodule is named "backbone" whichever it is).
    head_sizes: widths of the hidden Dense layers of the head.
    dropout_rate: dropout after each hidden Dense layer (rng collection 'dropout').
    dtype: compute dtype; parameters stay float32 and logits are float32.
    remat: recompute the backbone's residual blocks in the backward pass (saves memory).
    bn_axis_name: pmap axis over which BatchNorm averages batch statistics in training.
    kernels: the backbone's XLA:CPU workarounds ("auto", "cpu", "xla" or a `Kernels`; models/kernels.py).
    num_classes: 1 (a malignant logit per image) or the classes of a diagnosis softmax (`Head`).
  """
  head_sizes: Sequence[int] = (512, 256, 64, 16)
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  remat: bool = False
  bn_axis_name: Optional[str] = None
  kernels: Union[str, Kernels] = "auto"
  backbone_name: str = backbones.INCEPTION_RESNET_V2
  num_classes: int = 1

  @nn.compact
  def __call__(self, x, train: bool, train_backbone: bool = True):
    """NHWC images in [-1, 1] -> logits [B] (or [B, num_classes]).

    `train_backbone=False` (a frozen backbone): the backbone's BatchNorm runs in inference mode whatever
    `train` is, and no gradient flows into the backbone (stop_gradient on its features); the head still
    trains (dropout included) with `train`.
    """
    backbone = backbones.backbone(self.backbone_name, None, dtype=self.dtype, remat=self.remat,
                                  bn_axis_name=self.bn_axis_name, kernels=self.kernels, name="backbone")
    features = backbone(backbones.from_model_input(self.backbone_name, x), train=train and train_backbone)
    if not train_backbone:
      features = jax.lax.stop_gradient(features)
    # The pooled backbone features, e.g. for the ensemble's patient context (`mutable=["intermediates"]`).
    self.sow("intermediates", "embedding", features)
    return Head(tuple(self.head_sizes), self.dropout_rate, self.dtype, self.num_classes, name="head")(features, train)


def _replace_tree(current, new, where: str):
  """`new` cast to `current`'s dtypes, after checking both have the same paths and shapes."""
  current = flax.traverse_util.flatten_dict(current, sep="/")
  new = flax.traverse_util.flatten_dict(new, sep="/")
  for path, leaf in current.items():
    if path not in new:
      raise InputError(f"pretrained backbone lacks {where}/{path}")
    if tuple(new[path].shape) != tuple(leaf.shape):
      raise InputError(f"pretrained backbone {where}/{path} has shape {tuple(new[path].shape)}, "
                       f"the classifier's backbone needs {tuple(leaf.shape)}")
  for path in new:
    if path not in current:
      raise InputError(f"pretrained backbone has {where}/{path}, which the classifier lacks")
  return flax.traverse_util.unflatten_dict(
      {path: jnp.asarray(new[path], current[path].dtype) for path in current}, sep="/")


def with_pretrained_backbone(variables: Variables, backbone_variables: Variables) -> Variables:
  """A copy of classifier `variables` with the backbone params and batch_stats replaced.

  Args:
    variables: MelanomaClassifier variables (or their jax.eval_shape).
    backbone_variables: `backbones.backbone(model's backbone_name, num_classes=None)` variables, e.g. from
      keras_weights.init_backbone_variables(source, include_top=False); a top is ignored.

  Raises:
    InputError: a path missing on either side or a shape that differs (both shapes named).
  """
  out = {collection: dict(tree) for collection, tree in variables.items()}
  for collection in ("params", "batch_stats"):
    if collection not in backbone_variables:
      raise InputError(f"pretrained backbone variables lack the '{collection}' collection")
    new = {k: v for k, v in backbone_variables[collection].items() if k != _TOP}
    out[collection]["backbone"] = _replace_tree(variables[collection]["backbone"], new,
                                                collection)
  return out


def init_with_pretrained_backbone(model: MelanomaClassifier, rng: jax.Array,
                                  backbone_variables: Variables) -> Variables:
  """Classifier variables: the given backbone plus a freshly initialised head.

  Same result as `with_pretrained_backbone(model.init(...), backbone_variables)` up to the head's
  random draw, without drawing (and compiling the draws of) 54M random backbone weights, which
  takes about a minute on a CPU.
  """
  size = backbones.min_image_size(model.backbone_name)
  abstract = jax.eval_shape(
      lambda: model.init({"params": rng, "dropout": rng}, jnp.zeros((1, size, size, 3)), train=False))
  head = Head(tuple(model.head_sizes), model.dropout_rate, model.dtype, model.num_classes).init(
      {"params": rng}, jnp.zeros((1, backbones.features(model.backbone_name)), jnp.float32), train=False)
  params = dict(abstract["params"])
  params["head"] = _replace_tree(abstract["params"]["head"], head["params"], "params/head")
  return with_pretrained_backbone({**abstract, "params": params}, backbone_variables)


def build(*, dtype: Any = jnp.float32, head_sizes: Sequence[int] = (512, 256, 64, 16), dropout_rate: float = 0.1,
          remat: bool = False, bn_axis_name: Optional[str] = None,
          kernels: Union[str, Kernels] = "auto", num_classes: int = 1,
          backbone_name: str = backbones.INCEPTION_RESNET_V2) -> MelanomaClassifier:
  """The melanoma classifier (backbone `backbone_name` + `Head`) from plain values (`models.build_model`'s
  "inception_resnet_v2" and "efficientnet_b0" ... "efficientnet_b7")."""
  return MelanomaClassifier(head_sizes=tuple(head_sizes), dropout_rate=float(dropout_rate), dtype=dtype,
                            remat=bool(remat), bn_axis_name=bn_axis_name, kernels=kernels,
                            backbone_name=backbone_name, num_classes=int(num_classes))


def melanoma_probability(outputs):
  """p(malignant) [B] of a classifier's outputs: sigmoid of a logit [B], or the MEL column (class 0,
  `data.diagnosis.MEL`) of the softmax of logits [B, K]."""
  outputs = outputs.astype(jnp.float32)
  return jax.nn.sigmoid(outputs) if outputs.ndim == 1 else jax.nn.softmax(outputs, axis=-1)[:, 0]


def melanoma_logit(outputs):
  """The malignant log-odds [B] of a classifier's outputs (what saliency explains): the logit itself, or
  log p(MEL) - log(1 - p(MEL)) of a softmax."""
  outputs = outputs.astype(jnp.float32)
  if outputs.ndim == 1:
    return outputs
  log_p = jax.nn.log_softmax(outputs, axis=-1)
  return log_p[:, 0] - jax.nn.logsumexp(log_p[:, 1:], axis=-1)
