"""Where an EfficientNet's MBConv blocks spend a training step, part by part and layer by layer: the
expand 1x1 convolution, the depthwise convolution, squeeze-and-excitation and the project 1x1 convolution,
each forward + gradient (input and parameters) with the XLA:CPU workarounds on (`--kernels cpu`, what
`auto` picks on the CPU) and off (`xla`), compiled in this process and timed in alternation.

  .venv/bin/python benchmarks/mbconv_parts.py --model efficientnet_b3 --size 300 --global_batch 4

Each distinct block shape is timed once on --global_batch images (one device's share of a pmapped step)
and weighted by how many blocks share it. BatchNorm and swish are left out (elementwise, fused by XLA
into the neighbouring ops). `--skip_xla_depthwise` leaves out XLA's depthwise gradient, which takes
seconds per layer (benchmarks/depthwise.py measures it). The last line printed is one JSON object: per
part, total milliseconds with each setting and the ratio xla / cpu (> 1: the workarounds are faster).
Exits non-zero if the two settings disagree beyond float rounding.
"""
import argparse
import collections
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import depthwise as depthwise_bench  # pylint: disable=g-import-not-at-top,wrong-import-position

jax, jnp, np = common.jax, common.jnp, common.np
PARTS = ("expand", "depthwise", "se", "project")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--model", default="efficientnet_b3")
  parser.add_argument("--size", type=int, default=300)
  parser.add_argument("--global_batch", type=int, default=4)
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--skip_xla_depthwise", action="store_true")
  parser.add_argument("--out", default=None)
  return parser.parse_args(argv)


def shapes(variant, size):
  """{(input size, filters_in, filters, filters_se, filters_out, kernel, stride): blocks} of `variant`;
  filters_in 0: no expand convolution."""
  return collections.Counter(
      (size, s.filters_in if s.expand_ratio != 1 else 0, s.filters, s.filters_se, s.filters_out, s.kernel, s.strides)
      for size, s in depthwise_bench.block_inputs(variant, size))


def part_functions(shape, kernels):
  """{part: f(x, params) -> array} for one block shape under `kernels`, and {part: (x, params)} inputs."""
  from melanoma_jax.models import conv, depthwise  # pylint: disable=g-import-not-at-top
  size, filters_in, filters, filters_se, filters_out, kernel, stride = shape
  out_size = -(-size // stride)
  rng = np.random.default_rng(0)
  normal = lambda *s: jnp.asarray(rng.standard_normal(s) / np.sqrt(max(s[-2] if len(s) > 1 else 1, 1)), jnp.float32)
  padding = "VALID" if stride == 2 else "SAME"
  pad = ((0, 0), (kernel // 2 - 1 + size % 2, kernel // 2), (kernel // 2 - 1 + size % 2, kernel // 2), (0, 0))

  def se(x, p):
    s = jnp.mean(x, axis=(1, 2), keepdims=True)
    s = jax.nn.swish(conv.conv1x1(s, p["reduce"], kernels) + p["reduce_bias"])
    s = jax.nn.sigmoid(conv.conv1x1(s, p["expand"], kernels) + p["expand_bias"])
    return x * s

  functions = {
      "expand": lambda x, p: conv.conv1x1(x, p, kernels),
      "depthwise": lambda x, p: depthwise.depthwise(jnp.pad(x, pad) if stride == 2 else x, p, stride, padding,
                                                    kernels),
      "se": se,
      "project": lambda x, p: conv.conv1x1(x, p, kernels),
  }
  batch = lambda hw, c: normal(1, hw, hw, c)  # Tiled to the batch by the caller.
  inputs = {
      "expand": (batch(size, filters_in or 1), normal(1, 1, filters_in or 1, filters)),
      "depthwise": (batch(size, filters), normal(kernel, kernel, 1, filters)),
      "se": (batch(out_size, filters),
             {"reduce": normal(1, 1, filters, filters_se), "reduce_bias": jnp.zeros(filters_se),
              "expand": normal(1, 1, filters_se, filters), "expand_bias": jnp.zeros(filters)}),
      "project": (batch(out_size, filters), normal(1, 1, filters, filters_out)),
  }
  if not filters_in:
    del functions["expand"], inputs["expand"]
  return functions, inputs


def main(argv=None):
  args = parse_args(argv)
  from melanoma_jax.models import kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  settings = {"cpu": kernels_lib.CPU, "xla": kernels_lib.XLA}
  rows, total = [], collections.defaultdict(float)
  for shape, blocks in sorted(shapes(args.model.rsplit("_", 1)[1], args.size).items()):
    ms = {}
    for part in PARTS:
      compiled, outputs = {}, {}
      for name, kernels in settings.items():
        if part == "depthwise" and name == "xla" and args.skip_xla_depthwise:
          continue
        functions, inputs = part_functions(shape, kernels)
        if part not in functions:
          continue
        x, params = inputs[part]
        x = jnp.tile(x, (args.global_batch, 1, 1, 1))
        f = functions[part]
        grad = jax.jit(jax.value_and_grad(lambda a, p, f=f: jnp.sum(jnp.sin(f(a, p))), argnums=(0, 1)))
        outputs[name] = jax.tree_util.tree_leaves(jax.block_until_ready(grad(x, params)))
        compiled[name] = (grad, x, params)
      if len(outputs) == 2:
        for got, want in zip(outputs["cpu"], outputs["xla"]):
          got, want = np.asarray(got), np.asarray(want)
          if float(np.abs(got - want).max()) > 1e-3 * max(float(np.abs(want).max()), 1.0):
            raise SystemExit(f"{part} at {shape}: the cpu kernels disagree with XLA")
      times = collections.defaultdict(list)
      for _ in range(args.reps):
        for name, (grad, x, params) in compiled.items():
          times[name].append(common.timed(lambda: jax.block_until_ready(grad(x, params)))[0])
      for name, values in times.items():
        ms[f"{part}_{name}"] = round(statistics.median(values) * 1e3, 2)
        total[f"{part}_{name}"] += ms[f"{part}_{name}"] * blocks
    keys = ("size", "filters_in", "filters", "filters_se", "filters_out", "kernel", "stride")
    row = {**dict(zip(keys, shape)), "blocks": blocks, **ms}
    common.log(row)
    rows.append(row)
  parts = {}
  for part in PARTS:
    cpu, xla = total.get(f"{part}_cpu"), total.get(f"{part}_xla")
    parts[part] = {"cpu_ms": round(cpu, 1) if cpu else None, "xla_ms": round(xla, 1) if xla else None,
                   "ratio": round(xla / cpu, 2) if cpu and xla else None}
  result = {"name": "mbconv_parts", "model": args.model, "size": args.size, "global_batch": args.global_batch,
            "machine": common.machine(), "parts": parts, "layers": rows}
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
