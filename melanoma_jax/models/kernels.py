"""Which of the model's XLA:CPU workarounds are on: one switch for the whole network.

Each workaround computes the same function as the plain op it replaces (`nn.Conv`, `nn.max_pool`, a plain
residual sum), with the same variables, and its gradient up to float rounding; the tests in
tests/test_conv.py, tests/test_pooling.py and tests/test_models.py prove each one, and the whole network
with all of them on and off. They are tuned for XLA:CPU; on accelerators the plain ops leave XLA (cuDNN on a
GPU) free to choose. What each one gains on the CPU is measured, one at a time against all of them, by
`benchmarks/cpu_kernels.py`.
"""
import dataclasses
import functools
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
    bf16_dots: bfloat16 spatial convolutions as im2col matrix products, forward and backward
      (`conv.im2col_dot_conv`); "auto" and "cpu" set it only where the CPU has bfloat16 matrix units
      (`cpu_has_bf16_units`), and it acts only on a bfloat16 compute dtype.
  """
  pointwise_dot: bool
  pointwise_grad: bool
  im2col_grad: bool
  pool_grad: bool
  materialise: bool
  depthwise_shifts: bool
  bf16_dots: bool = False


BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo's names of the bfloat16 matrix and vector units.


@functools.lru_cache(maxsize=None)
def cpu_has_bf16_units(cpuinfo: str = "/proc/cpuinfo") -> bool:
  """Whether this CPU has AMX-BF16 or AVX512-BF16 (read from `cpuinfo`'s flags; False where it cannot
  be read, e.g. not Linux), the units XLA:CPU's bfloat16 dots use."""
  try:
    with open(cpuinfo, encoding="utf-8", errors="replace") as f:
      flags = {word for line in f if line.startswith("flags") for word in line.split(":", 1)[1].split()}
  except OSError:
    return False
  return any(flag in flags for flag in BF16_FLAGS)


def cpu_kernels(cpuinfo: str = "/proc/cpuinfo") -> Kernels:
  """Every workaround on, `bf16_dots` only where `cpuinfo` shows bfloat16 units (today's path elsewhere)."""
  return Kernels(pointwise_dot=True, pointwise_grad=True, im2col_grad=True, pool_grad=True, materialise=True,
                 depthwise_shifts=True, bf16_dots=cpu_has_bf16_units(cpuinfo))


CPU = cpu_kernels()  # This machine's.
XLA = Kernels(pointwise_dot=False, pointwise_grad=False, im2col_grad=False, pool_grad=False, materialise=False,
              depthwise_shifts=False, bf16_dots=False)


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
