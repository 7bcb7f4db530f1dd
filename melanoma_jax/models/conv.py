"""Convolutions with the parameters of `nn.Conv`, computed the way XLA:CPU runs fastest where `kernels` says.

Both modules keep `nn.Conv`'s variables (`kernel` [kh, kw, in, out] in HWIO, optional `bias`), so a
model built from them has the same variables tree as one built from `nn.Conv`, and the same values up to
float rounding. With every `Kernels` flag off they compute what `nn.Conv` does; each flag on changes the
program XLA sees:

* `pointwise_dot`: `PointwiseConv` (1x1, stride 1) is a matrix product over channels. XLA:CPU runs it
  about twice as fast as the equivalent convolution, forward and backward: the convolution's kernel
  gradient goes through a slow [C, H, W, N] transpose of the activations that the dot does not need.
  `pointwise_grad`: its kernel gradient is x^T dy (`pointwise`), which XLA:CPU runs faster than JAX's
  (dy^T x)^T.
* `SpatialConv` is `lax.conv_general_dilated`; `im2col_grad` gives it a custom kernel gradient: im2col
  of the input (the kh*kw shifted views side by side on channels) contracted with the output gradient in
  one matrix product, instead of XLA's "batch as features" convolution, which ran at a third of the
  forward convolution's speed on the stem convolutions. The input gradient is XLA's own.
* `bf16_dots`: with a bfloat16 compute dtype, `SpatialConv` is `im2col_dot_conv`, forward and gradients as
  bfloat16 matrix products accumulated in float32: XLA:CPU runs dots, not convolutions, on the AMX and
  AVX512-BF16 units. `kernels.resolve` turns it on only on CPUs that have them. A network whose activations
  stay float32 (`activation_dtype`) gives both modules a float32 `output_dtype`; they then take float32 in,
  give bfloat16 operands to the products alone and return the float32 accumulations (`mixed_products`).

Found with jax.profiler traces of the 299x299 batch-8 training step; what each flag is worth to the whole
step is measured by benchmarks/cpu_kernels.py (figures in docs/performance.md).
"""
import functools
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen.dtypes import promote_dtype
from jax import lax

from melanoma_jax.models.kernels import Kernels, resolve

KERNEL_INIT = nn.initializers.glorot_uniform()  # Keras' default for Conv2D and Dense.
_DIMENSIONS = ("NHWC", "HWIO", "NHWC")
Padding = Union[str, Tuple[Tuple[int, int], Tuple[int, int]]]


def _explicit_padding(padding, spatial, kernel, strides):
  if isinstance(padding, str):
    return tuple(tuple(p) for p in lax.padtype_to_pads(spatial, kernel, strides, padding))
  return tuple(tuple(p) for p in padding)


def _conv(x, kernel, strides, padding):
  return lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=_DIMENSIONS)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, kernel, strides: Tuple[int, int], padding: Padding):
  """NHWC x HWIO convolution (no dilation, one group); differentiable with an im2col kernel gradient."""
  return _conv(x, kernel, strides, padding)


def _conv2d_fwd(x, kernel, strides, padding):
  return _conv(x, kernel, strides, padding), (x, kernel)


# Above this many bytes of im2col columns for the whole batch, the kernel gradient is accumulated one image
# at a time, so the columns stay in cache (the stem's and mixed_5b's kernel gradients ran 2.5 to 3 times
# faster); below about 10 MiB it makes no difference.
_PER_IMAGE_COLUMNS_BYTES = 16 * 2**20


def window_view(x, i, j, ho, wo, strides):
  """[..., ho, wo, c]: the element at offset (i, j) of each of the ho x wo windows of NHWC (or HWC) `x`
  taken with `strides` (x[..., i::sh, j::sw, :] cut to ho x wo)."""
  sh, sw = strides
  lead = x.ndim - 3
  return lax.slice(x, (0,) * lead + (i, j, 0),
                   x.shape[:lead] + (i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, x.shape[-1]),
                   (1,) * lead + (sh, sw, 1))


def _columns(x, kh, kw, ho, wo, strides):
  """[..., ho, wo, kh*kw*cin]: the kh*kw strided shifted views of padded NHWC (or HWC) `x`, on channels."""
  views = [window_view(x, i, j, ho, wo, strides) for i in range(kh) for j in range(kw)]
  return jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]


def im2col_kernel_grad(x, dy, kernel_shape, strides, padding):
  """d(loss)/d(kernel) of an NHWC x HWIO convolution given the output gradient `dy`."""
  kh, kw, cin, cout = kernel_shape
  pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
  x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  n, ho, wo, _ = dy.shape
  contract = lambda a, b, dims: lax.dot_general(a, b, ((dims, dims), ((), ())),
                                                 preferred_element_type=jnp.float32)
  if n > 1 and n * ho * wo * kh * kw * cin * x.dtype.itemsize >= _PER_IMAGE_COLUMNS_BYTES:
    # With more columns than output channels, [cout, columns] = dy^T @ columns: XLA then lays out
    # the smaller dy for the product instead of the columns (twice as fast for mixed_6a's stride-2 3x3).
    transposed = kh * kw * cin > cout
    def one_image(total, image_and_grad):
      image, d = image_and_grad
      columns = _columns(image, kh, kw, ho, wo, strides)
      return total + (contract(d, columns, (0, 1)) if transposed else contract(columns, d, (0, 1))), None
    shape = (cout, kh * kw * cin) if transposed else (kh * kw * cin, cout)
    grad, _ = lax.scan(one_image, jnp.zeros(shape, jnp.float32), (x, dy))
    grad = grad.T if transposed else grad
  else:
    grad = contract(_columns(x, kh, kw, ho, wo, strides), dy, (0, 1, 2))
  return grad.reshape(kh, kw, cin, cout)


def _conv2d_bwd(strides, padding, residuals, dy):
  x, kernel = residuals
  # The transpose of the linear map x -> conv(x, kernel), without re-tracing the forward as jax.vjp would.
  (dx,) = jax.linear_transpose(lambda x_: _conv(x_, kernel, strides, padding), x)(dy)
  dkernel = im2col_kernel_grad(x, dy, kernel.shape, strides, padding).astype(kernel.dtype)
  return dx, dkernel


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class SpatialConv(nn.Module):
  """`nn.Conv(features, kernel_size, strides, padding, use_bias=False, kernel_init=kernel_init)`, with the
  `im2col_grad` of `kernels` (a `Kernels` or one of KERNELS); computed in `dtype`, returned in
  `output_dtype` (None: `dtype`)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: str = "SAME"
  kernels: Union[str, Kernels] = "auto"
  kernel_init: nn.initializers.Initializer = KERNEL_INIT
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  output_dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    kh, kw = self.kernel_size
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features), self.param_dtype)
    kernels = resolve(self.kernels)
    if (mixed_products(self.dtype, self.output_dtype, kernels)
        and takes_products(x.shape[-1], self.dtype, self.dtype, kernels)):
      x, kernel = promote_dtype(x, kernel, dtype=self.output_dtype)
      return im2col_dot_conv(x, kernel, tuple(self.strides), self.padding)
    x, kernel = promote_dtype(x, kernel, dtype=self.dtype)
    y = spatial(x, kernel, self.strides, self.padding, kernels)
    return y if self.output_dtype is None else y.astype(self.output_dtype)


def mixed_products(dtype, output_dtype, kernels: Kernels) -> bool:
  """Whether a convolution computed in `dtype` and returned in `output_dtype` takes float32 in and gives
  float32 out with bfloat16 matrix products inside: `bf16_dots` with a bfloat16 `dtype` and float32
  activations (`activation_dtype`). Its products then return their float32 accumulations, and its
  gradients come back in float32, instead of each being rounded to bfloat16 and widened back, a conversion
  pair per product and gradient that XLA:CPU runs as a pass of its own."""
  return (kernels.bf16_dots and jnp.dtype(dtype) == jnp.bfloat16 and output_dtype is not None
          and jnp.dtype(output_dtype) == jnp.float32)


# Per layer of InceptionResNetV2 at 299 (benchmarks/bf16_convs.py), the matrix products won from 64 input
# channels up (1.2-4x) and lost below, where a few channels over a large map give long thin columns (0.45x
# for 32 -> 32 at 149x149).
BF16_DOTS_MIN_CHANNELS = 64


def spatial(x, kernel, strides, padding, kernels: Kernels):
  """The convolution `SpatialConv` computes: `im2col_dot_conv` for bfloat16 with `bf16_dots` (from
  BF16_DOTS_MIN_CHANNELS input channels), `conv2d` with `im2col_grad`, else XLA's own convolution and
  gradient."""
  if takes_products(x.shape[-1], x.dtype, kernel.dtype, kernels):
    return im2col_dot_conv(x, kernel, tuple(strides), padding)
  return (conv2d if kernels.im2col_grad else _conv)(x, kernel, tuple(strides), padding)


def takes_products(channels, x_dtype, kernel_dtype, kernels: Kernels) -> bool:
  """Whether a spatial convolution of `channels` input channels, computed on `x_dtype` and `kernel_dtype`
  operands, runs as `im2col_dot_conv`: `bf16_dots`, bfloat16 both, from BF16_DOTS_MIN_CHANNELS channels."""
  return (kernels.bf16_dots and jnp.dtype(x_dtype) == jnp.bfloat16 and jnp.dtype(kernel_dtype) == jnp.bfloat16
          and channels >= BF16_DOTS_MIN_CHANNELS)


def _im2col_forward(x, kernel, strides, padding):
  """An NHWC x HWIO convolution as im2col columns times the kernel, one bfloat16 matrix product accumulated
  in float32, returned in `x`'s dtype."""
  kh, kw, cin, cout = kernel.shape
  pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
  xp = jnp.pad(x.astype(jnp.bfloat16), ((0, 0), pads[0], pads[1], (0, 0)))
  ho = (xp.shape[1] - kh) // strides[0] + 1
  wo = (xp.shape[2] - kw) // strides[1] + 1
  columns = _columns(xp, kh, kw, ho, wo, strides)
  y = lax.dot_general(columns, kernel.astype(jnp.bfloat16).reshape(kh * kw * cin, cout),
                      (((3,), (0,)), ((), ())), preferred_element_type=jnp.float32)
  return y.astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def im2col_dot_conv(x, kernel, strides: Tuple[int, int], padding: Padding):
  """An NHWC x HWIO convolution whose forward and gradients are matrix products with bfloat16 operands and
  float32 accumulation, the shape XLA:CPU sends to the AMX / AVX512-BF16 units, which its bfloat16
  convolutions do not reach: the forward is im2col columns x kernel, the input gradient dy x kernel^T
  scattered back onto the input (col2im: the transpose of the column gather), the kernel gradient
  columns^T x dy (`im2col_kernel_grad`).

  `x` and `kernel` share one dtype, which the output and gradients come in: bfloat16 gives the plain
  bfloat16 path's values; float32 (mixed precision: `SpatialConv` with a float32 `output_dtype`) keeps the
  float32 accumulations as they are instead of rounding them to bfloat16 and widening them back."""
  if x.dtype != kernel.dtype:
    raise TypeError(f"im2col_dot_conv: x is {x.dtype} but kernel is {kernel.dtype}")
  return _im2col_forward(x, kernel, strides, padding)


def _im2col_dot_fwd(x, kernel, strides, padding):
  # The bfloat16 operands are what the gradients multiply, so they are what is kept (half the bytes).
  return _im2col_forward(x, kernel, strides, padding), (x.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16))


def _im2col_dot_bwd(strides, padding, residuals, dy):
  x, kernel = residuals  # bfloat16; the output, so `dy`, came in the caller's dtype.
  dtype = dy.dtype
  kh, kw, cin, cout = kernel.shape
  pads = _explicit_padding(padding, x.shape[1:3], (kh, kw), strides)
  padded_shape = (x.shape[0], x.shape[1] + sum(pads[0]), x.shape[2] + sum(pads[1]), cin)
  _, ho, wo, _ = dy.shape
  dy = dy.astype(jnp.bfloat16)
  d_columns = lax.dot_general(dy, kernel.reshape(kh * kw * cin, cout), (((3,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32).astype(dtype)
  gather = lambda xp: _columns(xp, kh, kw, ho, wo, strides)
  (d_xp,) = jax.linear_transpose(gather, jax.ShapeDtypeStruct(padded_shape, dtype))(d_columns)
  dx = d_xp[:, pads[0][0]:pads[0][0] + x.shape[1], pads[1][0]:pads[1][0] + x.shape[2]]
  d_kernel = im2col_kernel_grad(x, dy, kernel.shape, strides, padding).astype(dtype)
  return dx, d_kernel


im2col_dot_conv.defvjp(_im2col_dot_fwd, _im2col_dot_bwd)


def activation_dtype(dtype, kernels: Kernels):
  """The dtype a network keeps its activations in between convolutions computed in `dtype`: float32 where
  `bf16_dots` runs bfloat16 products, else `dtype`. XLA:CPU has no bfloat16 arithmetic, so every
  elementwise op on bfloat16 activations (BatchNorm, ReLU, sums, pooling) converts to float32 and back:
  in InceptionResNetV2's bfloat16 train step such conversions took 28% of the op time and bfloat16 pooling
  8x float32's; keeping the activations in float32, with bfloat16 operands for the products alone, ran the
  step about 1.2x faster (docs/performance.md)."""
  return jnp.float32 if kernels.bf16_dots and jnp.dtype(dtype) == jnp.bfloat16 else dtype


class PointwiseConv(nn.Module):
  """`nn.Conv(features, (1, 1))` (optional bias), with the `pointwise_dot` and `pointwise_grad` of `kernels`
  (a `Kernels` or one of KERNELS); computed in `dtype`, returned in `output_dtype` (None: `dtype`)."""
  features: int
  use_bias: bool = False
  kernels: Union[str, Kernels] = "auto"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  output_dtype: Optional[jnp.dtype] = None

  @nn.compact
  def __call__(self, x):
    kernel = self.param("kernel", KERNEL_INIT, (1, 1, x.shape[-1], self.features), self.param_dtype)
    bias = (self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
            if self.use_bias else None)
    kernels = resolve(self.kernels)
    if mixed_products(self.dtype, self.output_dtype, kernels) and kernels.pointwise_grad:
      x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.output_dtype)
      y = pointwise(x, kernel[0, 0], jnp.bfloat16)
      return y + bias if bias is not None else y
    x, kernel, bias = promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv1x1(x, kernel, kernels)
    y = y + bias if bias is not None else y
    return y if self.output_dtype is None else y.astype(self.output_dtype)


def conv1x1(x, kernel, kernels: Kernels):
  """The convolution `PointwiseConv` computes (HWIO `kernel` [1, 1, cin, cout]): a matrix product with
  `pointwise_dot` (its kernel gradient x^T dy with `pointwise_grad`), else XLA's convolution."""
  if not kernels.pointwise_dot:
    return _conv(x, kernel, (1, 1), "VALID")
  if kernels.pointwise_grad:
    return pointwise(x, kernel[0, 0], None)
  return _pointwise(x, kernel[0, 0], None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def pointwise(x, kernel, operand_dtype):
  """[..., cin] x [cin, cout] -> [..., cout], with the kernel gradient as x^T dy.

  JAX's own gradient computes (dy^T x)^T, for which XLA:CPU transposes dy first; x^T dy runs 1.2 to 2
  times faster, whichever of x and dy has more channels. With an `operand_dtype` (bfloat16), every product
  takes its operands in that dtype and accumulates in float32; output and gradients come in `x`'s dtype.
  """
  return _pointwise(x, kernel, operand_dtype)


def _dot(a, b, dims, operand_dtype, dtype):
  if operand_dtype is None:
    return lax.dot_general(a, b, (dims, ((), ())))
  return lax.dot_general(a.astype(operand_dtype), b.astype(operand_dtype), (dims, ((), ())),
                         preferred_element_type=jnp.float32).astype(dtype)


def _pointwise(x, kernel, operand_dtype):
  return _dot(x, kernel, ((x.ndim - 1,), (0,)), operand_dtype, x.dtype)


def _pointwise_fwd(x, kernel, operand_dtype):
  # With an operand dtype, what the gradients multiply is kept: half the bytes.
  residuals = (x, kernel) if operand_dtype is None else (x.astype(operand_dtype), kernel.astype(operand_dtype))
  return _pointwise(x, kernel, operand_dtype), residuals


def _pointwise_bwd(operand_dtype, residuals, dy):
  x, kernel = residuals
  dtype = dy.dtype  # The output's, which is x's and kernel's.
  dx = _dot(dy, kernel, ((dy.ndim - 1,), (1,)), operand_dtype, dtype)
  lead = tuple(range(x.ndim - 1))
  dy = dy if operand_dtype is None else dy.astype(operand_dtype)
  dkernel = lax.dot_general(x, dy, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
  return dx, dkernel.astype(dtype if operand_dtype is not None else kernel.dtype)


pointwise.defvjp(_pointwise_fwd, _pointwise_bwd)
