"""Which of the model's XLA:CPU workarounds are on: one switch for the whole network.

Each workaround computes the same function as the plain op it replaces (`nn.Conv`, `nn.max_pool`, a plain
residual sum), with the same variables, and its gradient up to float rounding; the tests in
tests/test_conv.py, tests/test_pooling.py and tests/test_models.py prove each one, and the whole network
with all of them on and off. They are tuned for XLA:CPU; on accelerators the plain ops leave XLA (cuDNN on a
GPU) free to choose. What each one gains on the CPU is measured, one at a time against all of them, by
`benchmarks/cpu_kernels.py`.
"""
import dataclasses
from typing import Optional, Union

import jax

from melanoma_jax.utils.errors import InputError

KERNELS = ("auto", "cpu", "xla")


@dataclasses.dataclass(frozen=True)
class Kernels:
  """One flag per workaround; off = the plain op.

  Attributes:
    pointwise_dot: 1x1 stride-1 convolutions as matrix products over channels (`conv.PointwiseConv`).
    pointwise_grad: with `pointwise_dot`, their kernel gradient as x^T dy (`conv.pointwise`).
    im2col_grad: the kernel gradient of the other convolutions as one im2col matrix product, image by
      image when the columns are large (`conv.conv2d`); worth most where the output is large and the
      channels few, as in the stem.
    pool_grad: max pooling's gradient in one elementwise pass (`pooling.one_pass_max_pool`).
    materialise: each residual block's output computed once (`inception_resnet_v2.materialise`).
    depthwise_shifts: depthwise convolutions (EfficientNet's) as sums of shifted views, with a gradient of
      the same form (`depthwise.depthwise`).
  """
  pointwise_dot: bool
  pointwise_grad: bool
  im2col_grad: bool
  pool_grad: bool
  materialise: bool
  depthwise_shifts: bool


CPU = Kernels(pointwise_dot=True, pointwise_grad=True, im2col_grad=True, pool_grad=True, materialise=True,
              depthwise_shifts=True)
XLA = Kernels(pointwise_dot=False, pointwise_grad=False, im2col_grad=False, pool_grad=False, materialise=False,
              depthwise_shifts=False)


def check(choice: Union[str, Kernels]) -> None:
  """Raises InputError unless `choice` is a `Kernels` or one of KERNELS."""
  if not isinstance(choice, Kernels) and choice not in KERNELS:
    raise InputError(f"kernels={choice!r} must be one of {', '.join(KERNELS)}")


def resolve(choice: Union[str, Kernels], backend: Optional[str] = None) -> Kernels:
  """The `Kernels` of `choice`: "cpu" = all on, "xla" = all off, "auto" = "cpu" on the CPU backend (`backend`,
  default jax.default_backend()), else "xla"; a `Kernels` is returned as it is."""
  check(choice)
  if isinstance(choice, Kernels):
    return choice
  if choice == "auto":
    choice = "cpu" if (backend or jax.default_backend()) == "cpu" else "xla"
  return CPU if choice == "cpu" else XLA
