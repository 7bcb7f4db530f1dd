"""The benchmarks' FLOP counter, which the GPU benchmark's MFU rests on, and the convolution benchmark's
harness (the benchmarks themselves are timed, so they run in `make bench`, not here)."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax import lax

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def _net(x, kernel, w):
  y = lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.jit(lambda a, b: a @ b)(y.reshape(y.shape[0], -1), w)  # A nested jaxpr.


def test_jaxpr_flops_counts_convolutions_and_matrix_products_in_nested_jaxprs():
  x, kernel, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5)), jnp.ones((320, 7))
  conv_flops = 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4)
  dot_flops = 2 * (2 * 7) * 320
  assert common.jaxpr_flops(jax.make_jaxpr(_net)(x, kernel, w).jaxpr) == conv_flops + dot_flops
  # Under pmap the count is per device; the batch is split, so 2 devices x 1 image each = half each.
  pmapped = jax.make_jaxpr(jax.pmap(_net, in_axes=(0, None, None)))(x.reshape(2, 1, 8, 8, 4), kernel, w)
  assert common.jaxpr_flops(pmapped.jaxpr) == (conv_flops + dot_flops) / 2


def test_jaxpr_flops_of_a_gradient_and_of_remat():
  x, kernel, w = jnp.ones((2, 8, 8, 4)), jnp.ones((3, 3, 4, 5)), jnp.ones((320, 7))
  forward = common.jaxpr_flops(jax.make_jaxpr(_net)(x, kernel, w).jaxpr)
  loss = lambda k, w_, net: jnp.sum(net(x, k, w_))
  grad = jax.grad(loss, argnums=(0, 1))
  plain = common.jaxpr_flops(jax.make_jaxpr(lambda k, w_: grad(k, w_, _net))(kernel, w).jaxpr)
  # Forward, plus one product for each parameter's gradient and one for the gradient flowing back
  # into the convolution's output (none into x, which is not differentiated).
  assert plain == 3 * forward - 2 * (2 * 8 * 8 * 5) * (3 * 3 * 4)
  rematted = common.jaxpr_flops(
      jax.make_jaxpr(lambda k, w_: grad(k, w_, jax.checkpoint(_net)))(kernel, w).jaxpr)
  assert rematted > plain  # The recomputed forward is counted.


def test_jaxpr_flops_counts_a_scan_body_once_per_iteration():
  w = jnp.ones((6, 5))
  step = lambda carry, x: (carry + x @ w, None)
  scanned = jax.make_jaxpr(lambda xs: jax.lax.scan(step, jnp.zeros(5), xs)[0])(jnp.ones((4, 6)))
  assert common.jaxpr_flops(scanned.jaxpr) == 4 * 2 * 6 * 5


def test_conv_layers_covers_every_convolution_and_agrees_with_tensorflow(tmp_path):
  """benchmarks/conv_layers.py at the smallest input: it finds each conv + BatchNorm unit's convolution and
  each residual block's up projection, and exits non-zero unless our forward, input and kernel gradients
  (the train step's own: dots, im2col) equal TensorFlow's for every one of its distinct shapes."""
  from melanoma_jax.models import inception_resnet_v2 as irv2  # pylint: disable=g-import-not-at-top
  out = tmp_path / "conv_layers.json"
  script = os.path.join(os.path.dirname(common.__file__), "conv_layers.py")
  run = subprocess.run([sys.executable, script, "--size", "75", "--global_batch", "2", "--reps", "1",
                        "--out", str(out)], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-2000:]
  result = json.loads(out.read_text())
  top_conv = 1  # irv2.TOP_CONV, conv_7b, is not among the Keras conv2d_bn paths.
  assert result["convolutions"] == len(irv2.conv_bn_paths()) + top_conv + len(irv2.residual_block_names())
  assert result["distinct"] == 35
  assert result["ours_backward_ms"] > 0 and result["tf_backward_ms"] > 0
