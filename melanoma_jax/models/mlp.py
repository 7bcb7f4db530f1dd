"""The tabular MLP: Dense-ReLU-Dropout blocks and one logit per row."""
from typing import Sequence

import flax.linen as nn


class MLP(nn.Module):
  """Dense(h)-ReLU-Dropout for each h in `hidden_sizes`, then Dense(1); `__call__` returns logits [B]."""
  hidden_sizes: Sequence[int] = (512, 256, 128, 32)
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, train):
    for size in self.hidden_sizes:
      x = nn.Dense(size)(x)
      x = nn.relu(x)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    return nn.Dense(1)(x)[..., 0]


def build(*, hidden_sizes: Sequence[int] = (512, 256, 128, 32), dropout_rate: float = 0.1) -> MLP:
  """The tabular MLP from plain values (`models.build_model`'s "mlp")."""
  return MLP(hidden_sizes=tuple(hidden_sizes), dropout_rate=float(dropout_rate))
