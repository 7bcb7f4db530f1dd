"""The one place models are built, by name, from plain values (never a config): training, prediction, the
benchmarks and the tests all get the same model for the same arguments."""
from typing import Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from melanoma_jax.models import kernels as kernels_lib
from melanoma_jax.models.classifier import MelanomaClassifier
from melanoma_jax.models.mlp import MLP
from melanoma_jax.models.tiny import TinyClassifier
from melanoma_jax.utils.errors import InputError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MODELS = ("inception_resnet_v2", "tiny", "mlp")


def _check(field: str, value, allowed) -> None:
  if value not in allowed:
    raise InputError(f"{field}={value!r} must be one of {', '.join(allowed)}")


def build_model(name: str, *, dtype: str = "float32", head_sizes: Sequence[int] = (512, 256, 64, 16),
                dropout_rate: float = 0.1, remat: bool = False,
                kernels: Union[str, kernels_lib.Kernels] = "auto", bn_axis_name: Optional[str] = None,
                hidden_sizes: Sequence[int] = (512, 256, 128, 32)) -> nn.Module:
  """The model called `name`, one of MODELS:

  * "inception_resnet_v2": `MelanomaClassifier` (InceptionResNetV2 + the head of `head_sizes`), images of
    at least `inception_resnet_v2.MIN_IMAGE_SIZE` pixels a side;
  * "tiny": `TinyClassifier` (no `head_sizes` nor `remat`);
  * "mlp": the tabular `MLP` of `hidden_sizes` (float32; `dropout_rate` only of the rest).

  Arguments a model does not have are ignored. `dtype` is a name in DTYPES (compute dtype; parameters stay
  float32); `kernels` one of KERNELS or a `Kernels` (models/kernels.py), resolved against the backend when
  the model runs; `bn_axis_name` the pmap axis over which BatchNorm averages its batch statistics.

  Raises:
    InputError: an unknown model name, dtype or kernels choice (one line that names which).
  """
  _check("model", name, MODELS)
  _check("dtype", dtype, tuple(DTYPES))
  kernels_lib.check(kernels)
  if name == "mlp":
    return MLP(hidden_sizes=tuple(hidden_sizes), dropout_rate=float(dropout_rate))
  if name == "tiny":
    return TinyClassifier(dropout_rate=float(dropout_rate), dtype=DTYPES[dtype], bn_axis_name=bn_axis_name,
                          kernels=kernels)
  return MelanomaClassifier(head_sizes=tuple(head_sizes), dropout_rate=float(dropout_rate),
                            dtype=DTYPES[dtype], remat=bool(remat), bn_axis_name=bn_axis_name,
                            kernels=kernels)
