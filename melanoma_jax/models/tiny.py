"""A few-layer CNN with the classifier's interface, for fast smoke runs and tests of the training machinery.

Like the Flax ImageNet example's `_ResNet1`, it exercises the same pipeline, steps, BatchNorm statistics,
dropout and checkpoints as InceptionResNetV2 at a fraction of the compile time. Not for real training.
"""
from typing import Any, Optional, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from melanoma_jax.models.conv import SpatialConv
from melanoma_jax.models.backbone_io import feature_map_hooks
from melanoma_jax.models.kernels import Kernels


class _TinyBackbone(nn.Module):
  """conv-BN-ReLU x2 and a global average pool: the part a frozen-backbone step keeps fixed."""
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  kernels: Union[str, Kernels] = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    for i, features in enumerate((8, 16)):
      x = SpatialConv(features, (3, 3), strides=(2, 2), kernels=self.kernels,
                      kernel_init=nn.linear.default_kernel_init, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not train, axis_name=self.bn_axis_name if train else None,
                       momentum=0.99, epsilon=1e-3, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.relu(x)
    x = feature_map_hooks(self, x)
    return x.mean(axis=(1, 2))


class TinyClassifier(nn.Module):
  """A "backbone" (conv-BN-ReLU x2, global average pool), dropout, one logit per image ("head").

  Its convolutions are `nn.Conv(features, (3, 3), strides=2, use_bias=False)` (same variables and
  initialiser), run as `kernels` says (models/kernels.py). Parameters are {'backbone', 'head'}, as in
  `MelanomaClassifier`, so a frozen-backbone step treats both alike.
  """
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None
  kernels: Union[str, Kernels] = "auto"
  num_classes: int = 1  # As MelanomaClassifier's: logits [B], or [B, num_classes] for a diagnosis softmax.

  @nn.compact
  def __call__(self, x, train: bool, train_backbone: bool = True):
    """NHWC images -> logits [B]; `train_backbone=False` as in `MelanomaClassifier`: the backbone's
    BatchNorm in inference mode and no gradient into it, the dropout still following `train`."""
    x = _TinyBackbone(self.dtype, self.bn_axis_name, self.kernels, name="backbone")(x, train and train_backbone)
    if not train_backbone:
      x = jax.lax.stop_gradient(x)
    self.sow("intermediates", "embedding", x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)
    return logits[..., 0] if self.num_classes == 1 else logits


def build(*, dtype: Any = jnp.float32, dropout_rate: float = 0.1, bn_axis_name: Optional[str] = None,
          kernels: Union[str, Kernels] = "auto", num_classes: int = 1) -> TinyClassifier:
  """The tiny classifier from plain values (`models.build_model`'s "tiny")."""
  return TinyClassifier(dropout_rate=float(dropout_rate), dtype=dtype, bn_axis_name=bn_axis_name, kernels=kernels,
                        num_classes=int(num_classes))
