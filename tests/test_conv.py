"""The fast convolutions equal nn.Conv in value and gradient, with the same variables."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melanoma_jax.models import conv

CASES = [  # (input shape, kernel, strides, padding): the kinds InceptionResNetV2 has.
    ((2, 11, 11, 5), (3, 3), (1, 1), "SAME"),
    ((2, 11, 11, 5), (3, 3), (2, 2), "VALID"),
    ((2, 11, 11, 5), (3, 3), (1, 1), "VALID"),
    ((2, 9, 9, 4), (1, 7), (1, 1), "SAME"),
    ((2, 9, 9, 4), (7, 1), (1, 1), "SAME"),
    ((2, 12, 12, 3), (5, 5), (1, 1), "SAME"),
    ((2, 12, 12, 3), (3, 3), (2, 2), "SAME"),  # Asymmetric padding.
    ((2, 13, 13, 1), (2, 2), (2, 2), "VALID"),  # Fewer im2col columns (4) than outputs (6), as conv_1a.
]


def _loss_and_grads(module, variables, x):
  def loss(params, x):
    y = module.apply({"params": params}, x)
    return jnp.sum(jnp.sin(y.astype(jnp.float32))), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables["params"], x)
  return y, grads


@pytest.mark.parametrize("im2col_grad", [False, True, "per_image"])
@pytest.mark.parametrize("shape,kernel,strides,padding", CASES)
def test_spatial_conv_matches_nn_conv(shape, kernel, strides, padding, im2col_grad, monkeypatch):
  if im2col_grad == "per_image":  # The kernel gradient accumulated image by image (large columns).
    monkeypatch.setattr(conv, "_PER_IMAGE_COLUMNS_BYTES", 0)
    im2col_grad = True
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  reference = nn.Conv(6, kernel, strides=strides, padding=padding, use_bias=False)
  ours = conv.SpatialConv(6, kernel, strides=strides, padding=padding, im2col_grad=im2col_grad)
  variables = reference.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, variables)
  y_ref, (dp_ref, dx_ref) = _loss_and_grads(reference, variables, x)
  y, (dp, dx) = _loss_and_grads(ours, variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dp["kernel"], dp_ref["kernel"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_conv_matches_nn_conv(use_bias):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 7))
  reference = nn.Conv(4, (1, 1), use_bias=use_bias)
  ours = conv.PointwiseConv(4, use_bias=use_bias)
  variables = reference.init(jax.random.PRNGKey(1), x)
  if use_bias:
    variables = jax.tree.map(lambda v: v + 0.5, variables)  # A non-zero bias, so it is checked.
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, variables)
  y_ref, (dp_ref, dx_ref) = _loss_and_grads(reference, variables, x)
  y, (dp, dx) = _loss_and_grads(ours, variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  for name in dp_ref:
    np.testing.assert_allclose(dp[name], dp_ref[name], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("im2col_grad", [False, True])
def test_bfloat16_compute_keeps_float32_parameters_and_gradients(im2col_grad):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 4))
  ours = conv.SpatialConv(6, (3, 3), dtype=jnp.bfloat16, im2col_grad=im2col_grad)
  variables = ours.init(jax.random.PRNGKey(1), x)
  y, (dp, _) = _loss_and_grads(ours, variables, x)
  assert variables["params"]["kernel"].dtype == jnp.float32 and dp["kernel"].dtype == jnp.float32
  assert y.dtype == jnp.bfloat16
  reference = nn.Conv(6, (3, 3), use_bias=False)
  _, (dp_ref, _) = _loss_and_grads(reference, variables, x)
  scale = float(jnp.abs(dp_ref["kernel"]).max())
  assert float(jnp.abs(dp["kernel"] - dp_ref["kernel"]).max()) < 0.05 * scale


def test_kernel_gradient_choice_follows_the_backend_unless_named():
  from melanoma_jax.models import inception_resnet_v2 as irv2  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  assert irv2.use_im2col_grad("auto") == (jax.default_backend() == "cpu")
  assert irv2.use_im2col_grad("im2col") and not irv2.use_im2col_grad("xla")
  with pytest.raises(InputError, match="kernel_grad='cudnn' must be one of auto, im2col, xla"):
    irv2.use_im2col_grad("cudnn")
