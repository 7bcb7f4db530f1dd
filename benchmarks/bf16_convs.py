"""Milliseconds of each spatial convolution of InceptionResNetV2's training step in bfloat16: XLA's bfloat16
convolution (today's path, with the im2col kernel gradient) against `kernels.bf16_dots` (im2col columns x
kernel as bfloat16 matrix products accumulated in float32, forward and both gradients, which XLA:CPU runs
on the AMX / AVX512-BF16 units), and float32 for reference; compiled in this process, timed in turns.

  .venv/bin/python benchmarks/bf16_convs.py --size 299 --global_batch 4

--global_batch is one device's share of the step (the global batch / devices of a pmapped step). Every
distinct spatial convolution (1x1 convolutions are dots already) is found as benchmarks/conv_layers.py finds
them and weighted by how often the network uses it. The last line printed is one JSON object: per layer
and in total, forward + backward milliseconds of each path (bf16_dots forced on every layer; bf16_step: the
products only from conv.BF16_DOTS_MIN_CHANNELS input channels, as the train step runs them) and the ratios
(> 1: the products are faster).
Exits non-zero if the paths disagree beyond bfloat16 rounding.
"""
import argparse
import collections
import dataclasses
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import conv_layers  # pylint: disable=g-import-not-at-top,wrong-import-position

jax, jnp, np = common.jax, common.jnp, common.np


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--global_batch", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default=None)
  return parser.parse_args(argv)


def step(layer, kernels, dtype):
  """jit(x, kernel, dy) -> (y, input and kernel gradients) of one convolution: as the train step runs it
  with `kernels`, or (`kernels` None) always as `im2col_dot_conv`, whatever its channels."""
  from melanoma_jax.models import conv  # pylint: disable=g-import-not-at-top
  if kernels is None:
    fn = lambda x, k: conv.im2col_dot_conv(x, k, tuple(layer.strides), layer.padding)
  else:
    fn = lambda x, k: conv.spatial(x, k, layer.strides, layer.padding, kernels)

  def both(x, k, dy):
    y, vjp = jax.vjp(fn, x, k)
    return (y,) + vjp(dy)

  return jax.jit(lambda x, k, dy: both(x.astype(dtype), k.astype(dtype), dy.astype(dtype)))


def main(argv=None):
  args = parse_args(argv)
  from melanoma_jax.models import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  today = dataclasses.replace(kernels_lib.CPU, bf16_dots=False)
  from melanoma_jax.models import conv  # pylint: disable=g-import-not-at-top
  paths = {"bf16_conv": (today, jnp.bfloat16), "bf16_dots": (None, jnp.bfloat16), "f32": (today, jnp.float32)}
  layers = {k: v for k, v in conv_layers.network_convs(args.size, args.global_batch).items()
            if k.kind == "spatial"}
  rows, total = [], collections.defaultdict(float)
  work = lambda layer: np.prod(layer.x_shape) * np.prod(layer.kernel_shape)
  for layer, count in sorted(layers.items(), key=lambda item: -work(item[0])):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(layer.x_shape), jnp.float32)
    k = jnp.asarray(rng.standard_normal(layer.kernel_shape) / np.sqrt(np.prod(layer.kernel_shape[:3])),
                    jnp.float32)
    compiled = {name: step(layer, kernels, dtype) for name, (kernels, dtype) in paths.items()}
    out = jax.eval_shape(lambda a, b: jax.lax.conv_general_dilated(
        a, b, layer.strides, layer.padding, dimension_numbers=("NHWC", "HWIO", "NHWC")), x, k)
    dy = jnp.asarray(rng.standard_normal(out.shape), jnp.float32)
    results = {name: [np.asarray(v, np.float32) for v in jax.block_until_ready(f(x, k, dy))]
               for name, f in compiled.items()}
    for got, want in zip(results["bf16_dots"], results["bf16_conv"]):
      if float(np.abs(got - want).max()) > 5e-2 * max(float(np.abs(want).max()), 1.0):
        raise SystemExit(f"bf16_dots disagrees with the bfloat16 convolution at {conv_layers.describe(layer)}")
    times = collections.defaultdict(list)
    for _ in range(args.reps):
      for name, f in compiled.items():
        times[name].append(common.timed(lambda: jax.block_until_ready(f(x, k, dy)))[0])
    ms = {name: round(statistics.median(v) * 1e3, 2) for name, v in times.items()}
    for name, value in ms.items():
      total[name] += value * count
    # What the train step runs with bf16_dots on: the products from BF16_DOTS_MIN_CHANNELS input channels.
    chosen = "bf16_dots" if layer.kernel_shape[2] >= conv.BF16_DOTS_MIN_CHANNELS else "bf16_conv"
    total["bf16_step"] += ms[chosen] * count
    row = {"layer": conv_layers.describe(layer), "count": count, **ms,
           "conv_over_dots": round(ms["bf16_conv"] / ms["bf16_dots"], 2)}
    common.log(row)
    rows.append(row)
  result = {"name": "bf16_convs", "size": args.size, "global_batch": args.global_batch,
            "machine": common.machine(), "bf16_units": kernels_lib.cpu_has_bf16_units(),
            "total_ms": {k: round(v, 1) for k, v in total.items()},
            "conv_over_dots": round(total["bf16_conv"] / total["bf16_dots"], 2),
            "conv_over_step": round(total["bf16_conv"] / total["bf16_step"], 2),
            "f32_over_step": round(total["f32"] / total["bf16_step"], 2), "layers": rows}
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
