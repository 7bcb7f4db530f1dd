"""Every distinct depthwise convolution of an EfficientNet at --size and --global_batch: forward and
forward+gradient (input and kernel) of XLA's grouped convolution against `depthwise_shifts`
(melanoma_jax/models/depthwise.py), both compiled in this process and timed in alternation.

  .venv/bin/python benchmarks/depthwise.py --model efficientnet_b3 --size 300 --global_batch 8

Each layer is timed on one device's share of the batch (global_batch / devices is what a pmapped step
gives it; --global_batch is the batch of one device here). The last line printed is one JSON object:
per layer and in total (weighted by how many blocks share the shape), milliseconds and the ratio XLA /
shifts (> 1: the shifts are faster). Exits non-zero if the two disagree beyond float rounding.
"""
import argparse
import collections
import dataclasses
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position

jax, jnp, np = common.jax, common.jnp, common.np


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--model", default="efficientnet_b3")
  parser.add_argument("--size", type=int, default=300)
  parser.add_argument("--global_batch", type=int, default=8)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--reps", type=int, default=3)
  parser.add_argument("--out", default=None)
  return parser.parse_args(argv)


def block_inputs(variant, size):
  """(input height and width, BlockSpec) of each MBConv block of `variant` at `size`, in network order."""
  from melanoma_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  size = -(-size // 2)  # The stem's stride 2.
  for spec in efficientnet.blocks(variant):
    yield size, spec
    size = -(-size // spec.strides)


def layers(variant, size):
  """{(input size, channels, kernel, stride): how many blocks} of the variant's depthwise convolutions."""
  return collections.Counter((size, spec.filters, spec.kernel, spec.strides)
                             for size, spec in block_inputs(variant, size))


def main(argv=None):
  args = parse_args(argv)
  from melanoma_jax.models import depthwise, kernels as kernels_lib  # pylint: disable=g-import-not-at-top
  variants = {"xla": kernels_lib.XLA, "shifts": dataclasses.replace(kernels_lib.XLA, depthwise_shifts=True)}
  dtype = jnp.dtype(args.dtype)
  rows, total = [], collections.defaultdict(float)
  for (size, channels, kernel, stride), blocks in sorted(layers(args.model.rsplit("_", 1)[1], args.size).items()):
    x = jnp.asarray(np.random.default_rng(0).standard_normal((args.global_batch, size, size, channels)), dtype)
    w = jnp.asarray(np.random.default_rng(1).standard_normal((kernel, kernel, 1, channels)) / kernel, dtype)
    padding = "VALID" if stride == 2 else "SAME"
    if stride == 2:  # EfficientNet pads stride-2 layers itself (Keras' correct_pad), then VALID.
      x = jnp.pad(x, ((0, 0), (kernel // 2 - 1 + size % 2, kernel // 2), (kernel // 2 - 1 + size % 2, kernel // 2),
                      (0, 0)))
    compiled, outputs = {}, {}
    for name, kernels in variants.items():
      forward = jax.jit(lambda a, b, k=kernels: depthwise.depthwise(a, b, stride, padding, k))
      grad = jax.jit(jax.grad(lambda a, b, k=kernels: jnp.sum(
          jnp.sin(depthwise.depthwise(a, b, stride, padding, k).astype(jnp.float32))), argnums=(0, 1)))
      outputs[name] = [np.asarray(o, np.float32) for o in
                       (forward(x, w), *jax.block_until_ready(grad(x, w)))]
      compiled[name] = (forward, grad)
    for got, want in zip(outputs["shifts"], outputs["xla"]):
      scale = max(float(np.abs(want).max()), 1.0)
      if float(np.abs(got - want).max()) > (1e-4 if args.dtype == "float32" else 5e-2) * scale:
        raise SystemExit(f"depthwise shifts disagree with XLA at {(size, channels, kernel, stride)}")
    times = collections.defaultdict(list)
    for _ in range(args.reps):
      for name, (forward, grad) in compiled.items():
        times[f"{name}_forward"].append(common.timed(lambda: jax.block_until_ready(forward(x, w)))[0])
        times[f"{name}_grad"].append(common.timed(lambda: jax.block_until_ready(grad(x, w)))[0])
    ms = {k: round(statistics.median(v) * 1e3, 2) for k, v in times.items()}
    for k, v in ms.items():
      total[k] += v * blocks
    row = {"size": size, "channels": channels, "kernel": kernel, "stride": stride, "blocks": blocks, **ms,
           "grad_ratio": round(ms["xla_grad"] / ms["shifts_grad"], 2)}
    common.log(row)
    rows.append(row)
  result = {"name": "depthwise", "model": args.model, "size": args.size, "global_batch": args.global_batch,
            "dtype": args.dtype, "machine": common.machine(), "layers": rows,
            "total_ms": {k: round(v, 1) for k, v in total.items()},
            "forward_ratio": round(total["xla_forward"] / total["shifts_forward"], 2),
            "grad_ratio": round(total["xla_grad"] / total["shifts_grad"], 2)}
  common.emit(result, args.out)


if __name__ == "__main__":
  start = time.time()
  main()
