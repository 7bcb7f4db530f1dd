"""The fast convolutions equal nn.Conv in value and gradient, with the same variables, whichever of their
`Kernels` are on; the kernels switch itself."""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from melanoma_jax.models import conv
from melanoma_jax.models import kernels as kernels_lib
from melanoma_jax.models.kernels import CPU, XLA
from melanoma_jax.utils.errors import InputError

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


SPATIAL_KERNELS = {  # SpatialConv with and without its workaround.
    "xla": XLA,
    "im2col_grad": dataclasses.replace(XLA, im2col_grad=True),
    "cpu": CPU,
    "per_image": CPU,  # The kernel gradient accumulated image by image (large columns).
}
POINTWISE_KERNELS = {  # The convolution, the dot with JAX's gradient, the dot with x^T dy.
    "xla": XLA,
    "pointwise_dot": dataclasses.replace(XLA, pointwise_dot=True),
    "cpu": CPU,
}


@pytest.mark.parametrize("kernels", list(SPATIAL_KERNELS))
@pytest.mark.parametrize("shape,kernel,strides,padding", CASES)
def test_spatial_conv_matches_nn_conv(shape, kernel, strides, padding, kernels, monkeypatch):
  if kernels == "per_image":
    monkeypatch.setattr(conv, "_PER_IMAGE_COLUMNS_BYTES", 0)
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  reference = nn.Conv(6, kernel, strides=strides, padding=padding, use_bias=False)
  ours = conv.SpatialConv(6, kernel, strides=strides, padding=padding, kernels=SPATIAL_KERNELS[kernels])
  variables = reference.init(jax.random.PRNGKey(1), x)
  assert jax.tree.map(jnp.shape, ours.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, variables)
  y_ref, (dp_ref, dx_ref) = _loss_and_grads(reference, variables, x)
  y, (dp, dx) = _loss_and_grads(ours, variables, x)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dp["kernel"], dp_ref["kernel"], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", list(POINTWISE_KERNELS))
@pytest.mark.parametrize("use_bias", [False, True])
def test_pointwise_conv_matches_nn_conv(use_bias, kernels):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 5, 7))
  reference = nn.Conv(4, (1, 1), use_bias=use_bias)
  ours = conv.PointwiseConv(4, use_bias=use_bias, kernels=POINTWISE_KERNELS[kernels])
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


@pytest.mark.parametrize("kernels", ["xla", "cpu"])
def test_bfloat16_compute_keeps_float32_parameters_and_gradients(kernels):
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 9, 9, 4))
  ours = conv.SpatialConv(6, (3, 3), dtype=jnp.bfloat16, kernels=kernels)
  variables = ours.init(jax.random.PRNGKey(1), x)
  y, (dp, _) = _loss_and_grads(ours, variables, x)
  assert variables["params"]["kernel"].dtype == jnp.float32 and dp["kernel"].dtype == jnp.float32
  assert y.dtype == jnp.bfloat16
  reference = nn.Conv(6, (3, 3), use_bias=False)
  _, (dp_ref, _) = _loss_and_grads(reference, variables, x)
  scale = float(jnp.abs(dp_ref["kernel"]).max())
  assert float(jnp.abs(dp["kernel"] - dp_ref["kernel"]).max()) < 0.05 * scale


def test_kernels_choice_follows_the_backend_unless_named():
  fields = [f.name for f in dataclasses.fields(kernels_lib.Kernels)]
  assert all(getattr(CPU, f) for f in fields if f != "bf16_dots") and not any(getattr(XLA, f) for f in fields)
  assert kernels_lib.resolve("auto") == (CPU if jax.default_backend() == "cpu" else XLA)
  assert kernels_lib.resolve("auto", backend="gpu") == XLA and kernels_lib.resolve("auto", "cpu") == CPU
  assert kernels_lib.resolve("cpu", backend="gpu") == CPU and kernels_lib.resolve("xla", "cpu") == XLA
  one_off = dataclasses.replace(CPU, pool_grad=False)
  assert kernels_lib.resolve(one_off) is one_off and len({CPU, XLA, one_off}) == 3  # Hashable.
  with pytest.raises(InputError, match="kernels='cudnn' must be one of auto, cpu, xla"):
    kernels_lib.resolve("cudnn")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape,kernel,stride,padding", [
    ((2, 9, 9, 5), 3, 1, "SAME"), ((2, 10, 7, 4), 5, 1, "SAME"), ((2, 11, 11, 3), 3, 2, "VALID"),
    ((2, 12, 9, 6), 5, 2, "VALID"), ((2, 8, 8, 3), 3, 2, "SAME"), ((1, 7, 7, 2), 1, 1, "VALID")])
def test_depthwise_shifts_match_the_grouped_convolution(shape, kernel, stride, padding, dtype):
  """`DepthwiseConv` with and without `depthwise_shifts`: nn.Conv's variables, and its values, input gradient
  and kernel gradient, at odd sizes, both strides and paddings (float32 to 1e-5; bfloat16 to its rounding)."""
  from melanoma_jax.models import depthwise  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.PRNGKey(0), shape)
  reference = nn.Conv(shape[-1], (kernel, kernel), strides=stride, padding=padding, use_bias=False,
                      feature_group_count=shape[-1], dtype=dtype)
  variables = reference.init(jax.random.PRNGKey(1), x)
  results = {}
  for name, kernels in (("xla", XLA), ("shifts", dataclasses.replace(XLA, depthwise_shifts=True))):
    module = depthwise.DepthwiseConv((kernel, kernel), strides=stride, padding=padding, kernels=kernels,
                                     dtype=dtype)
    assert jax.tree.map(jnp.shape, module.init(jax.random.PRNGKey(1), x)) == jax.tree.map(jnp.shape, variables)
    results[name] = _loss_and_grads(module, variables, x)
  y_ref, (dp_ref, dx_ref) = _loss_and_grads(reference, variables, x)
  tolerance = 1e-5 if dtype == "float32" else 3e-2
  for y, (dp, dx) in results.values():
    for got, want in ((y, y_ref), (dx, dx_ref), (dp["kernel"], dp_ref["kernel"])):
      got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
      assert got.shape == want.shape and np.abs(got - want).max() <= tolerance * max(np.abs(want).max(), 1.0)


@pytest.mark.parametrize("shape, kernel, strides, padding", [CASES[i] for i in (0, 1, 3, 6)])
def test_bfloat16_im2col_dots_equal_the_bfloat16_convolution(shape, kernel, strides, padding):
  """`bf16_dots`: forward, input and kernel gradients as bfloat16 matrix products accumulated in float32
  equal XLA's bfloat16 convolution (and its autodiff) within bfloat16 rounding."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  w = jnp.asarray(rng.normal(size=kernel + (shape[-1], 6)) / np.sqrt(np.prod(kernel) * shape[-1]), jnp.bfloat16)
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b, strides, padding).astype(jnp.float32)))
  plain = jax.value_and_grad(loss(conv._conv), argnums=(0, 1))(x, w)
  dots = jax.value_and_grad(loss(conv.im2col_dot_conv), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(conv.im2col_dot_conv(x, w, strides, padding).astype(np.float32),
                             conv._conv(x, w, strides, padding).astype(np.float32), rtol=2e-2, atol=2e-2)
  for got, want in zip(jax.tree.leaves(dots), jax.tree.leaves(plain)):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.dtype == want.dtype and got.shape == want.shape
    assert float(np.abs(got - want).max()) <= 3e-2 * max(float(np.abs(want).max()), 1.0)


@pytest.mark.parametrize("shape, kernel, strides, padding", [CASES[i] for i in (0, 6)] + [((2, 5, 5, 7), (1, 1), (1, 1), "VALID")])
def test_mixed_products_return_their_float32_accumulations(shape, kernel, strides, padding):
  """Mixed precision (float32 activations, bfloat16 products): with float32 in, `im2col_dot_conv` and
  `pointwise(..., bfloat16)` give float32 out and float32 gradients, equal to float32 arithmetic on the
  bfloat16-rounded operands (the accumulations are not rounded to bfloat16), and within bfloat16 rounding
  of the plain float32 convolution's gradients."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=kernel + (shape[-1], 6)) / np.sqrt(np.prod(kernel) * shape[-1]), jnp.float32)
  rounded = lambda a: a.astype(jnp.bfloat16).astype(jnp.float32)
  if kernel == (1, 1):
    mixed = lambda a, b, s, p: conv.pointwise(a, b[0, 0], jnp.bfloat16)
  else:
    mixed = conv.im2col_dot_conv
  y = mixed(x, w, strides, padding)
  want = conv._conv(rounded(x), rounded(w), strides, padding)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)  # bfloat16 rounding of y would be ~4e-3.
  assert float(np.abs(np.asarray(y) - np.asarray(want.astype(jnp.bfloat16), np.float32)).max()) > 1e-4
  loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b, strides, padding)))
  got = jax.grad(loss(mixed), argnums=(0, 1))(x, w)
  ref = jax.grad(loss(conv._conv), argnums=(0, 1))(x, w)
  for g, r in zip(got, ref):
    assert g.dtype == jnp.float32 and g.shape == r.shape
    assert float(np.abs(np.asarray(g) - np.asarray(r)).max()) <= 2e-2 * max(float(np.abs(r).max()), 1.0)


def test_mixed_modules_take_float32_in_and_give_float32_out():
  """`SpatialConv` and `PointwiseConv` computed in bfloat16 with a float32 `output_dtype` and `bf16_dots`
  run their products on float32 inputs (no bfloat16 activations in the program), equal to the same modules
  without the units (bfloat16 in, rounded out) within bfloat16 rounding."""
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 9, 64)), jnp.float32)
  on = dataclasses.replace(CPU, bf16_dots=True)
  off = dataclasses.replace(CPU, bf16_dots=False)
  for make in (lambda k: conv.SpatialConv(8, (3, 3), kernels=k, dtype=jnp.bfloat16, output_dtype=jnp.float32),
               lambda k: conv.PointwiseConv(8, use_bias=True, kernels=k, dtype=jnp.bfloat16,
                                            output_dtype=jnp.float32)):
    variables = make(on).init(jax.random.PRNGKey(0), x)
    y_on, y_off = make(on).apply(variables, x), make(off).apply(variables, x)
    assert y_on.dtype == y_off.dtype == jnp.float32
    np.testing.assert_allclose(y_on, y_off, rtol=2e-2, atol=2e-2)
    program = str(jax.make_jaxpr(lambda v: make(on).apply(v, x))(variables))
    assert "dot_general" in program and "preferred_element_type=float32" in program
    # The only bfloat16 values are the products' operands: converted right before the dot.
    assert "bf16[2,9,9,8]" not in program


def test_bfloat16_dots_only_where_the_cpu_has_the_units_and_only_for_bfloat16(tmp_path):
  without, amx = tmp_path / "plain", tmp_path / "amx"
  without.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f\n")
  amx.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
  assert not kernels_lib.cpu_kernels(str(without)).bf16_dots and kernels_lib.cpu_kernels(str(amx)).bf16_dots
  assert not kernels_lib.cpu_has_bf16_units(str(tmp_path / "missing"))
  # A CPU without the units computes today's path: the same program as bf16_dots off.
  x, w = jnp.ones((1, 8, 8, 64), jnp.bfloat16), jnp.ones((3, 3, 64, 4), jnp.bfloat16)
  today = jax.make_jaxpr(lambda a, b: conv.spatial(a, b, (1, 1), "SAME", dataclasses.replace(CPU, bf16_dots=False)))
  assert "dot_general" not in str(today(x, w)) and "conv_general_dilated" in str(today(x, w))
  with_units = jax.make_jaxpr(lambda a, b: conv.spatial(a, b, (1, 1), "SAME", dataclasses.replace(CPU, bf16_dots=True)))
  assert "dot_general" in str(with_units(x, w))
  # Few input channels (where the products measured slower) and float32 never take it.
  few = jax.make_jaxpr(lambda a, b: conv.spatial(a, b, (1, 1), "SAME", dataclasses.replace(CPU, bf16_dots=True)))
  assert "conv_general_dilated" in str(few(x[..., :3], w[:, :, :3]))
  f32 = jax.make_jaxpr(lambda a, b: conv.spatial(a, b, (1, 1), "SAME", dataclasses.replace(CPU, bf16_dots=True)))
  assert "conv_general_dilated" in str(f32(x.astype(jnp.float32), w.astype(jnp.float32)))
