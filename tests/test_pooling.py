"""max_pool equals nn.max_pool in value and gradient, ties included, with the one-pass gradient or not."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melanoma_jax.models.kernels import CPU, XLA
from melanoma_jax.models.pooling import max_pool


def _value_and_grad(pool, x, weights):
  return jax.value_and_grad(lambda x_: jnp.sum(pool(x_).astype(jnp.float32) * weights))(x)


@pytest.mark.parametrize("shape,window,strides", [
    ((2, 11, 11, 3), (3, 3), (2, 2)),  # InceptionResNetV2's pools: every row in some window.
    ((2, 10, 9, 2), (3, 3), (2, 2)),   # Trailing rows and columns in no window get no gradient.
    ((1, 7, 8, 2), (2, 3), (1, 2)),    # Overlapping windows one way, not the other.
])
@pytest.mark.parametrize("inputs", ["distinct", "ties"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("kernels", [CPU, XLA], ids=["cpu", "xla"])
def test_max_pool_matches_nn_max_pool(shape, window, strides, inputs, dtype, kernels):
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  if inputs == "ties":  # ReLU zeros and repeated values, as after conv_2b: the first maximum wins.
    x = jnp.maximum(jnp.round(x * 2), 0)
  x = x.astype(dtype)
  reference = lambda x_: nn.max_pool(x_, window, strides=strides, padding="VALID")
  ours = lambda x_: max_pool(x_, window, strides, kernels)
  weights = jax.random.normal(jax.random.PRNGKey(1), reference(x).shape)
  y_ref, dx_ref = _value_and_grad(reference, x, weights)
  y, dx = jax.jit(lambda x_: _value_and_grad(ours, x_, weights))(x)
  assert dx.dtype == dtype
  np.testing.assert_array_equal(np.asarray(ours(x), np.float32), np.asarray(reference(x), np.float32))
  dx, dx_ref = np.asarray(dx, np.float32), np.asarray(dx_ref, np.float32)
  # The same inputs get gradient (the first maximum of each window); where windows overlap, the sums
  # may add in another order.
  np.testing.assert_array_equal(dx != 0, dx_ref != 0)
  tolerance = 1e-6 if dtype == jnp.float32 else 1e-2
  np.testing.assert_allclose(dx, dx_ref, rtol=tolerance, atol=tolerance)
  np.testing.assert_allclose(y, y_ref, rtol=tolerance)
