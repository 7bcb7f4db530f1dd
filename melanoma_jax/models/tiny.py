"""A few-layer CNN with the classifier's interface, for fast smoke runs and tests of the training machinery.

Like the Flax ImageNet example's `_ResNet1`, it exercises the same pipeline, steps, BatchNorm statistics,
dropout and checkpoints as InceptionResNetV2 at a fraction of the compile time. Not for real training.
"""
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp


class TinyClassifier(nn.Module):
  """conv-BN-ReLU x2, global average pool, dropout, one logit per image."""
  dropout_rate: float = 0.1
  freeze_backbone: bool = False
  dtype: Any = jnp.float32
  bn_axis_name: Optional[str] = None

  @nn.compact
  def __call__(self, x, train: bool):
    bn_train = train and not self.freeze_backbone
    for i, features in enumerate((8, 16)):
      x = nn.Conv(features, (3, 3), strides=2, use_bias=False, dtype=self.dtype, name=f"conv{i}")(x)
      x = nn.BatchNorm(use_running_average=not bn_train, axis_name=self.bn_axis_name if bn_train else None,
                       momentum=0.99, epsilon=1e-3, dtype=self.dtype, name=f"bn{i}")(x)
      x = nn.relu(x)
    x = x.mean(axis=(1, 2))
    if self.freeze_backbone:
      x = jax.lax.stop_gradient(x)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(1, dtype=self.dtype, name="head")(x)[..., 0].astype(jnp.float32)
