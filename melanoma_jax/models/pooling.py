"""Max pooling with, where `Kernels.pool_grad` says, a gradient that XLA:CPU computes in one elementwise pass.

`nn.max_pool`'s gradient is XLA's select-and-scatter, which XLA:CPU expands into a variadic
reduce-window that materialises four int32 index arrays of the input's size, plus iotas and a scatter,
for each of InceptionResNetV2's four 3x3/2 pools. Here the gradient walks the window's offsets in order and routes each
output gradient to the first input equal to the window's maximum (the element select-and-scatter picks),
placed back with strided padding: a few elementwise ops that fuse into one loop.
"""
import functools
from typing import Tuple

import jax
import jax.numpy as jnp
from jax import lax

from melanoma_jax.models.conv import window_view
from melanoma_jax.models.kernels import Kernels


def max_pool(x, window: Tuple[int, int], strides: Tuple[int, int], kernels: Kernels):
  """'VALID' max pooling of NHWC `x`: `nn.max_pool(x, window, strides, padding="VALID")`, with the one-pass
  gradient if `kernels.pool_grad`."""
  return (one_pass_max_pool if kernels.pool_grad else _pool)(x, tuple(window), tuple(strides))


def _pool(x, window, strides):
  # A Python scalar -inf, as nn.max_pool passes: JAX then recognises the max monoid (reduce_window_max),
  # which it can differentiate; with an array init it cannot.
  return lax.reduce_window(x, -jnp.inf, lax.max, (1,) + window + (1,), (1,) + strides + (1,), "VALID")


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def one_pass_max_pool(x, window: Tuple[int, int], strides: Tuple[int, int]):
  """`_pool` (`nn.max_pool`'s computation), with the one-pass gradient."""
  return _pool(x, window, strides)


def _max_pool_fwd(x, window, strides):
  y = _pool(x, window, strides)
  return y, (x, y)


def _max_pool_bwd(window, strides, residuals, dy):
  x, y = residuals
  (kh, kw), (sh, sw) = window, strides
  h, w = x.shape[1:3]
  ho, wo = y.shape[1:3]
  dx = jnp.zeros_like(x)
  taken = jnp.zeros(y.shape, bool)
  zero = jnp.zeros((), dy.dtype)
  for i in range(kh):
    for j in range(kw):
      # Whether the input at offset (i, j) of each window is that window's first maximum.
      first = (window_view(x, i, j, ho, wo, strides) == y) & ~taken
      taken = taken | first
      # Back to the input's positions: offset (i, j), stride (sh, sw), zeros elsewhere.
      below, right = h - i - (ho - 1) * sh - 1, w - j - (wo - 1) * sw - 1
      dx = dx + lax.pad(jnp.where(first, dy, zero), zero,
                        ((0, 0, 0), (i, below, sh - 1), (j, right, sw - 1), (0, 0, 0)))
  return (dx,)


one_pass_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)
