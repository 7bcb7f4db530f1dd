"""Milliseconds of each convolution of the training step, ours against TensorFlow's oneDNN, on the CPU.

Every distinct convolution of InceptionResNetV2 at --size and --global_batch (found by intercepting the
model's own conv modules, so none is missed or invented) is timed twice: as the train step computes it
(`melanoma_jax.models.conv`, as --kernels says: 1x1 as dots, the im2col kernel gradient, ...) and as
Keras/TF runs it without XLA (Conv2D, Conv2DBackpropInput, Conv2DBackpropFilter: oneDNN). Forward and
backward (input and kernel gradients; no input gradient for the first layer) are timed apart, the two
sides taking turns, and checked to agree before anything is timed. Totals weight each shape by how often
the network uses it. TF runs in a worker subprocess: in one process, the idle side's thread pool took
cores from the busy one (both sides ran up to 1.6 times slower).

`--cores N` pins the process to N cores before JAX or TF start, so running it with `--cores 1` and with
all cores separates the kernels' own speed from how well they use the cores. On 2 AMD EPYC cores (299x299,
batch 8) the totals were 7593 ms ours against 7693 TF on one core and 4406 against 4436 on two (README,
Speed, also for how the two-core figures move with the way the calls are timed).

  .venv/bin/python benchmarks/conv_layers.py                  # 299x299, global batch 8, all cores
  .venv/bin/python benchmarks/conv_layers.py --cores 1 --out r.json

The last line printed is one JSON object (totals in milliseconds per training step).
"""
import argparse
import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# Importing JAX starts no thread pool (the CPU client starts at first use), so --cores still pins both.
# pylint: disable=g-import-not-at-top,wrong-import-position
import common
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from melanoma_jax.models import build_model, conv, KERNELS
from melanoma_jax.models.kernels import resolve
# pylint: enable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--global_batch", type=int, default=8)
  parser.add_argument("--cores", type=int, default=0, help="pin to this many cores (0 = all)")
  parser.add_argument("--reps", type=int, default=5,
                      help="timed calls in a row per side, part and round (2 rounds; median)")
  parser.add_argument("--kernels", choices=KERNELS, default="auto",
                      help="the XLA:CPU workarounds (models/kernels.py; auto = cpu, this being the CPU)")
  parser.add_argument("--top", type=int, default=12, help="rows of the table (largest gaps first)")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  parser.add_argument("--tf_worker", default=None, help=argparse.SUPPRESS)  # Its layers' JSON file.
  return parser.parse_args(argv)


def pin_cores(cores):
  """Restricts this process to its first `cores` allowed CPUs; JAX and TF size their pools from it."""
  allowed = sorted(os.sched_getaffinity(0))
  if cores < 0 or cores > len(allowed):
    raise SystemExit(f"--cores {cores}: this process may use {len(allowed)} cores")
  if cores:
    os.sched_setaffinity(0, allowed[:cores])
  return len(os.sched_getaffinity(0))


Layer = collections.namedtuple("Layer", "kind x_shape kernel_shape strides padding first")


def network_convs(size, global_batch):
  """{Layer: count} of every convolution InceptionResNetV2 runs on a [global_batch, size, size, 3] batch."""
  found = []

  def record(next_fun, args, kwargs, context):
    module, x = context.module, args[0] if args else None
    if context.method_name == "__call__" and isinstance(module, conv.SpatialConv):
      kernel = tuple(module.kernel_size) + (x.shape[-1], module.features)
      found.append(Layer("spatial", x.shape, kernel, tuple(module.strides), module.padding, not found))
    elif context.method_name == "__call__" and isinstance(module, conv.PointwiseConv):
      found.append(Layer("pointwise", x.shape, (1, 1, x.shape[-1], module.features), (1, 1), "SAME",
                         not found))
    return next_fun(*args, **kwargs)

  model = build_model("inception_resnet_v2")  # The classifier's head has no convolutions.
  with nn.intercept_methods(record):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                      jnp.zeros((global_batch, size, size, 3)), train=False))
  return collections.Counter(found)


def ours(layer, kernels):
  """(forward(x, kernel), backward(x, kernel, dy)) jitted as the train step computes them with `kernels`."""
  if layer.kind == "pointwise":
    fn = lambda x, kernel: conv.conv1x1(x, kernel, kernels)
  else:
    fn = lambda x, kernel: conv.spatial(x, kernel, layer.strides, layer.padding, kernels)
  if layer.first:  # The image needs no gradient.
    backward = lambda x, kernel, dy: jax.vjp(lambda k: fn(x, k), kernel)[1](dy)
  else:
    backward = lambda x, kernel, dy: jax.vjp(fn, x, kernel)[1](dy)
  return jax.jit(fn), jax.jit(backward)


def tensorflow(layer):
  """The same two functions with TensorFlow's NHWC convolution ops (no XLA)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  strides = (1,) + tuple(layer.strides) + (1,)
  forward = tf.function(lambda x, k: tf.nn.conv2d(x, k, strides, layer.padding), jit_compile=False)

  def backward(x, kernel, dy):
    dk = tf.raw_ops.Conv2DBackpropFilter(input=x, filter_sizes=layer.kernel_shape, out_backprop=dy,
                                         strides=strides, padding=layer.padding)
    if layer.first:
      return (dk,)
    dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=layer.x_shape, filter=kernel, out_backprop=dy,
                                        strides=strides, padding=layer.padding)
    return dx, dk

  return forward, tf.function(backward, jit_compile=False)


def _max_relative_error(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))


def inputs(layer, forward, seed=0):
  """(x, kernel, dy) drawn the same way on both sides; dy has the shape of `forward`'s output."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(layer.x_shape).astype(np.float32)
  kernel = rng.standard_normal(layer.kernel_shape) / np.sqrt(np.prod(layer.kernel_shape[:3]))
  kernel = kernel.astype(np.float32)
  dy = rng.standard_normal(np.shape(forward(x, kernel))).astype(np.float32)
  return x, kernel, dy


def _seconds(fn, *args):
  start = time.perf_counter()
  result = fn(*args)
  for value in result if isinstance(result, (tuple, list)) else (result,):
    value.block_until_ready() if hasattr(value, "block_until_ready") else value.numpy()
  return time.perf_counter() - start


class Side:
  """One side's forward and backward of one layer on fixed inputs: outputs, and one timed call."""

  def __init__(self, layer, functions):
    self.forward, self.backward = functions
    self.x, self.kernel, self.dy = inputs(layer, self.forward)

  def outputs(self):
      return [np.asarray(self.forward(self.x, self.kernel))] + [
        np.asarray(g) for g in self.backward(self.x, self.kernel, self.dy)]

  def series(self, part, reps):
    """Seconds of `reps` back-to-back calls of one part, after one untimed call (a step runs its
    convolutions back to back: timing single calls between the other side's would time cold caches
    and sleeping thread pools)."""
    fn, args = ((self.forward, (self.x, self.kernel)) if part == "forward"
                else (self.backward, (self.x, self.kernel, self.dy)))
    return [_seconds(fn, *args) for _ in range(reps + 1)][1:]


def tf_worker(layers_file):
  """Subprocess side: per stdin line "<layer index> check <file>" or "<layer index> <part> <reps>"."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")
  with open(layers_file) as f:
    layers = [Layer(*[tuple(v) if isinstance(v, list) else v for v in row]) for row in json.load(f)]
  current = None
  for line in sys.stdin:
    index, command, *rest = line.split()
    if current is None or current[0] != int(index):
      current = (int(index), Side(layers[int(index)], tensorflow(layers[int(index)])))
    if command == "check":
      np.savez(rest[0], *current[1].outputs())
      reply = {}
    else:
      reply = {"seconds": current[1].series(command, int(rest[0]))}
    common.worker_say(reply)


class TFProcess:
  """The TF worker subprocess: the same layers, on the same cores (affinity is inherited)."""

  def __init__(self, layers, workdir):
    layers_file = os.path.join(workdir, "layers.json")
    with open(layers_file, "w") as f:
      json.dump([list(layer) for layer in layers], f)
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--tf_worker", layers_file],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

  def ask(self, *words):
    self.proc.stdin.write(" ".join(str(w) for w in words) + "\n")
    self.proc.stdin.flush()
    reply = common.worker_reply(self.proc.stdout)
    if reply is not None:
      return reply
    raise SystemExit(f"TF worker exited with {self.proc.wait()} (see its stderr above)")

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def measure(index, layer, kernels, worker, workdir, reps):
  """{side: {part: ms}} for one layer, after checking that both sides compute the same."""
  side = Side(layer, ours(layer, kernels))
  path = os.path.join(workdir, f"{index}.npz")
  worker.ask(index, "check", path)
  with np.load(path) as theirs:
    errors = [_max_relative_error(a, theirs[f"arr_{i}"]) for i, a in enumerate(side.outputs())]
  if len(errors) != 3 - layer.first or max(errors) > 1e-3:
    raise SystemExit(f"{describe(layer)}: ours and TF differ (max relative errors {errors})")
  times = {"ours": collections.defaultdict(list), "tf": collections.defaultdict(list)}
  for _ in range(2):  # Two rounds, the sides taking turns, so a slow spell of the machine hits both.
    for part in ("forward", "backward"):
      times["ours"][part] += side.series(part, reps)
      times["tf"][part] += worker.ask(index, part, reps)["seconds"]
  return {name: {part: 1e3 * statistics.median(t) for part, t in parts.items()}
          for name, parts in times.items()}


def describe(layer):
  kh, kw, cin, cout = layer.kernel_shape
  stride = "" if layer.strides == (1, 1) else f"/{layer.strides[0]}"
  return f"{kh}x{kw}{stride} {cin}->{cout} at {layer.x_shape[1]}x{layer.x_shape[2]}"


def main(argv=None):
  args = parse_args(argv)
  if args.tf_worker:
    return tf_worker(args.tf_worker)
  cores = pin_cores(args.cores)
  common.reexec_with_malloc_tunables(True)
  jax.config.update("jax_platforms", "cpu")  # A CPU benchmark, on a GPU host too.
  layers = network_convs(args.size, args.global_batch)
  kernels = resolve(args.kernels)
  common.log(f"{sum(layers.values())} convolutions, {len(layers)} distinct; {cores} cores")
  rows, totals = [], {side: collections.Counter() for side in ("ours", "tf")}
  with tempfile.TemporaryDirectory() as workdir:
    worker = TFProcess(layers, workdir)
    for i, (layer, count) in enumerate(layers.items()):
      ms = measure(i, layer, kernels, worker, workdir, args.reps)
      for side in totals:
        totals[side].update({part: count * t for part, t in ms[side].items()})
      rows.append((count * (sum(ms["ours"].values()) - sum(ms["tf"].values())), layer, count, ms))
      common.log(f"[{i + 1}/{len(layers)}] {describe(layer)} x{count}: ours "
                 f"{ms['ours']['forward']:.1f} + {ms['ours']['backward']:.1f} ms, TF "
                 f"{ms['tf']['forward']:.1f} + {ms['tf']['backward']:.1f} ms")
    worker.close()
  print("\nlargest gaps (ms per training step, forward + backward, x uses):")
  for gap, layer, count, ms in sorted(rows, key=lambda r: -r[0])[:args.top]:
    print(f"  {gap:+8.1f}  {layer.kind:9s} {describe(layer):28s} x{count:<3d} ours "
          f"{sum(ms['ours'].values()):7.2f}  TF {sum(ms['tf'].values()):7.2f}")
  result = {"name": "conv_layers", "size": args.size, "global_batch": args.global_batch,
            "cores": cores, "kernels": args.kernels, "machine": common.machine(),
            "convolutions": sum(layers.values()), "distinct": len(layers)}
  for side, parts in totals.items():
    result[f"{side}_forward_ms"] = round(parts["forward"], 1)
    result[f"{side}_backward_ms"] = round(parts["backward"], 1)
    result[f"{side}_ms"] = round(sum(parts.values()), 1)
  result["ratio_ours_over_tf"] = round(result["ours_ms"] / result["tf_ms"], 3)
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
