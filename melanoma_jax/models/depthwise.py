"""Depthwise convolution with `nn.Conv(features=C, feature_group_count=C)`'s variables, computed the way
XLA:CPU runs fastest where `kernels.depthwise_shifts` says.

XLA:CPU runs a grouped convolution with one channel per group through a generic loop, and its gradients
(the kernel gradient a batch-grouped convolution, the input gradient a transposed one) slower still: at
EfficientNet-B3's 300x300 shapes the gradient of one depthwise layer took 1.5 to 9 s for a batch of 8
(`benchmarks/depthwise.py`). A depthwise convolution is a sum over the kh*kw kernel taps of a shifted,
strided view of the input times that tap's per-channel weights: elementwise work that XLA fuses into one
loop. `depthwise` computes it that way with its own gradient of the same form: the input gradient is the same
shifted sum over the output gradient (spread onto the stride grid) with the kernel flipped, and the
kernel gradient one fused multiply-and-reduce per tap. Values equal `lax.conv_general_dilated` up to float
rounding (tests/test_conv.py), so the switch changes speed, never the model.
"""
import functools
from typing import Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from melanoma_jax.models.kernels import Kernels, resolve

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def _taps(xp, kernel, stride):
  """VALID depthwise correlation of the padded input xp [N, H, W, C] with kernel [kh, kw, C], as a sum
  of strided views."""
  kh, kw, _ = kernel.shape
  n, height, width, channels = xp.shape
  out_h, out_w = (height - kh) // stride + 1, (width - kw) // stride + 1
  out = None
  for i in range(kh):
    for j in range(kw):
      view = lax.slice(xp, (0, i, j, 0), (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
                       (1, stride, stride, 1))
      term = view * kernel[i, j]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _shifted(xp, kernel, stride):
  return _taps(xp, kernel, stride)


def _shifted_fwd(xp, kernel, stride):
  return _taps(xp, kernel, stride), (xp, kernel)


def _shifted_bwd(stride, residuals, dy):
  xp, kernel = residuals
  kh, kw, _ = kernel.shape
  n, height, width, channels = xp.shape
  out_h, out_w = dy.shape[1:3]
  # d kernel[i, j] = sum over batch and positions of the tap's view times dy: one fused reduce per tap.
  taps = []
  for i in range(kh):
    for j in range(kw):
      view = lax.slice(xp, (0, i, j, 0), (n, i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1, channels),
                       (1, stride, stride, 1))
      taps.append(jnp.sum((view * dy).astype(jnp.float32), axis=(0, 1, 2)))
  d_kernel = jnp.stack(taps).reshape(kh, kw, channels).astype(kernel.dtype)
  # d xp[p] = sum over taps i of dy at (p - i) / stride: dy spread onto the stride grid, padded by the kernel
  # size less one, correlated with the flipped kernel.
  zero = jnp.zeros((), dy.dtype)
  spread = lax.pad(dy, zero, ((0, 0, 0), (kh - 1, height - (out_h - 1) * stride - 1, stride - 1),
                              (kw - 1, width - (out_w - 1) * stride - 1, stride - 1), (0, 0, 0)))
  d_xp = _taps(spread, kernel[::-1, ::-1], 1)
  return d_xp, d_kernel


_shifted.defvjp(_shifted_fwd, _shifted_bwd)


def _pads(size, kernel, stride, padding):
  return lax.padtype_to_pads((size,), (kernel,), (stride,), padding)[0]


def depthwise(x, kernel, stride: int, padding: str, kernels: Kernels):
  """Depthwise convolution of x [N, H, W, C] with kernel [kh, kw, 1, C] (`nn.Conv`'s, groups = C) at
  `stride` with "SAME" or "VALID" `padding`: the shifted sum when `kernels.depthwise_shifts`, else XLA's
  grouped convolution."""
  if not kernels.depthwise_shifts:
    return lax.conv_general_dilated(x, kernel, (stride, stride), padding, dimension_numbers=_DIMENSIONS,
                                    feature_group_count=x.shape[-1])
  kh, kw = kernel.shape[:2]
  pads = (_pads(x.shape[1], kh, stride, padding), _pads(x.shape[2], kw, stride, padding))
  if any(p for pair in pads for p in pair):
    x = jnp.pad(x, ((0, 0),) + pads + ((0, 0),))
  return _shifted(x, kernel[:, :, 0, :], stride)


class DepthwiseConv(nn.Module):
  """`nn.Conv(C, kernel_size, strides, padding, feature_group_count=C, use_bias=False)` for C input
  channels, with the `depthwise_shifts` of `kernels` (a `Kernels` or one of KERNELS)."""
  kernel_size: Sequence[int]
  strides: int = 1
  padding: str = "SAME"
  kernels: Union[str, Kernels] = "auto"
  kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, x.shape[-1]), self.param_dtype)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    return depthwise(x, kernel, int(self.strides), self.padding, resolve(self.kernels))
