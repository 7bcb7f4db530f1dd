"""Images/s of one training step: our pmapped MelanomaClassifier step against the Keras 3 model it replaces.

Ours: forward, backward and Adam update of `MelanomaClassifier` (`--model`: InceptionResNetV2 or an
EfficientNet B0-B7, + the 512-256-64-16 head), `steps.p_train(steps.make_train_step(...))` over all local
devices. Keras: the same network (`keras.applications.<Backbone>(include_top=False, weights=None,
pooling='avg')` + Dense 512-256-64-16 ReLU + Dropout 0.1 + Dense(1)), Adam, `model.train_on_batch`, on the
TensorFlow backend
without and with XLA (`jit_compile`) and on the JAX backend. Each Keras backend runs in its own
subprocess (the backend is fixed per process); after both sides have compiled, ours and Keras take
turns (`--rounds` x `--steps` steps each), so both see the same machine load. The first step of each
side (compilation) is reported apart from the steady state.

  .venv/bin/python benchmarks/train_step.py                       # 299x299, global batch 8, float32
  .venv/bin/python benchmarks/train_step.py --size 512 --dtype bfloat16 --keras tf --out r.json
  .venv/bin/python benchmarks/train_step.py --model efficientnet_b3 --size 300

The last line printed is one JSON object (images/s; ratio = ours / Keras, > 1 means ours is faster).
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from melanoma_jax.models import CLASSIFIERS, DTYPES, KERNELS  # pylint: disable=g-import-not-at-top,wrong-import-position

KERAS_BACKENDS = {  # name: (KERAS_BACKEND, jit_compile)
    "tf": ("tensorflow", False),
    "tf_xla": ("tensorflow", True),
    "jax": ("jax", True),
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--model", choices=CLASSIFIERS, default="inception_resnet_v2", help="the backbone")
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--global_batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=2, help="steps per side and round")
  parser.add_argument("--rounds", type=int, default=2, help="alternations per Keras backend")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--remat", action="store_true", help="recompute residual blocks (ours)")
  parser.add_argument("--kernels", choices=KERNELS, default="auto",
                      help="the XLA:CPU workarounds (ours; models/kernels.py; auto = cpu on the CPU backend)")
  parser.add_argument("--keras", default="tf,tf_xla,jax",
                      help="comma-separated Keras backends to compare with (tf, tf_xla, jax) or 'none'")
  parser.add_argument("--malloc", choices=("keep", "default"), default="keep",
                      help="'keep': glibc keeps freed memory mapped (GLIBC_TUNABLES, both sides); "
                           "'default': the system allocator settings")
  parser.add_argument("--compile_only", action="store_true",
                      help="ours only: compile and report FLOPs and memory (e.g. 1024x1024 with and "
                           "without --remat on a machine too slow to run it)")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  parser.add_argument("--keras_worker", choices=sorted(KERAS_BACKENDS), help=argparse.SUPPRESS)
  return parser.parse_args(argv)


# ------------------------------------------------------------------------------------------- ours
class OursBench:
  """Our pmapped train step on a fixed batch; `first_step_s` includes compilation."""

  def __init__(self, args):
    from melanoma_jax.training import steps  # pylint: disable=g-import-not-at-top
    devices = common.jax.local_device_count()
    model = common.classifier(args.dtype, args.kernels, args.remat, args.model)
    self.state = common.train_state(model, args.size, args.global_batch)
    # Host arrays, as Keras gets them: the host-to-device copy is part of every step.
    self.batch = common.train_batch(args.global_batch, args.size)
    if getattr(args, "batch_on_device", False):  # As training's prefetch_to_device delivers it.
      self.batch = next(steps.prefetch_to_device([(self.batch, None)]))[0]
    self.devices = devices
    self.cpu_s = []
    # Compiled ahead of time so XLA's own cost and memory analysis of this very program can be reported.
    compiled, self.compile_s = common.compile_train_step(model, self.state, self.batch)
    self.step = compiled
    flops = common.flops(compiled)
    self.flops_per_step = flops * devices if flops is not None else None
    self.memory = common.memory(compiled)
    if args.compile_only:
      self.first_step_s = self.second_step_s = float("nan")
      return
    self.first_step_s = self.compile_s + self._one()
    self.second_step_s = self._one()

  def _one(self):
    cpu = time.process_time()
    seconds, (self.state, _) = common.timed(lambda: self.step(self.state, self.batch))
    self.cpu_s.append(time.process_time() - cpu)
    return seconds

  def run(self, steps):
    """(wall seconds, process CPU seconds) of each of `steps` steps."""
    self.cpu_s = []
    wall = [self._one() for _ in range(steps)]
    return wall, self.cpu_s


def flops_per_image(ours, args):
  """GFLOPs per image of the step: its convolutions and matrix products (jaxpr; remat's recomputation
  included when on) and XLA's cost analysis of the compiled step (which counts a loop body once)."""
  model = common.step_flops(args.size, args.global_batch, args.dtype, args.kernels, args.remat, args.model)
  xla = ours.flops_per_step
  return {"gflops_per_image": round(model / args.global_batch / 1e9, 2),
          "xla_gflops_per_image": round(xla / args.global_batch / 1e9, 2) if xla else None}


# ------------------------------------------------------------------------------------------- Keras
def keras_model(size, dtype, model="inception_resnet_v2"):
  """The Keras application of backbone `model` (no top, average pooled) + the seed's head, one logit."""
  import keras  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import backbones  # pylint: disable=g-import-not-at-top
  if dtype == "bfloat16":
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
  base = getattr(keras.applications, backbones.display_name(model))(
      include_top=False, weights=None, input_shape=(size, size, 3), pooling="avg")
  x = base.output
  for units in (512, 256, 64, 16):
    x = keras.layers.Dense(units, activation="relu")(x)
    x = keras.layers.Dropout(0.1)(x)
  logits = keras.layers.Dense(1, dtype="float32")(x)
  return keras.Model(base.input, logits)


def keras_worker(args):
  """Subprocess side: compile, report, then run `n` steps per stdin line and report the times."""
  import keras  # pylint: disable=g-import-not-at-top
  np = common.np
  _, jit_compile = KERAS_BACKENDS[args.keras_worker]
  model = keras_model(args.size, args.dtype, args.model)
  model.compile(optimizer=keras.optimizers.Adam(1e-4),
                loss=keras.losses.BinaryCrossentropy(from_logits=True), jit_compile=jit_compile)
  x = common.random_images(args.global_batch, args.size)
  y = (np.arange(args.global_batch) % 2).astype(np.float32)[:, None]

  def one():
    start, cpu = time.perf_counter(), time.process_time()
    model.train_on_batch(x, y)  # Returns host numbers: the step has finished.
    return time.perf_counter() - start, time.process_time() - cpu

  first, _ = one()
  common.worker_say({"first_step_s": first, "second_step_s": one()[0],
                     "backend": keras.backend.backend()})
  for line in sys.stdin:
    steps = int(line)
    if steps <= 0:
      break
    wall, cpu = zip(*[one() for _ in range(steps)])
    common.worker_say({"steps_s": wall, "cpu_s": cpu})


class KerasProcess:
  """A Keras worker subprocess for one backend."""

  def __init__(self, name, args):
    backend, _ = KERAS_BACKENDS[name]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="2")
    if backend == "jax":
      env.setdefault("JAX_PLATFORMS", "cpu")  # tensorflow-cpu has no GPU either: same device.
    cmd = [sys.executable, os.path.abspath(__file__), "--keras_worker", name, "--size",
           str(args.size), "--global_batch", str(args.global_batch), "--dtype", args.dtype, "--model", args.model]
    self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                 env=env)
    self.first = self._read()

  def _read(self):
    reply = common.worker_reply(self.proc.stdout)
    if reply is not None:
      return reply
    raise RuntimeError(f"Keras worker exited with {self.proc.wait()} (see its stderr above)")

  def run(self, steps):
    """(wall seconds, process CPU seconds) of each of `steps` steps."""
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    reply = self._read()
    return list(reply["steps_s"]), list(reply["cpu_s"])

  def close(self):
    try:
      self.proc.stdin.write("0\n")
      self.proc.stdin.close()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=120)


# ------------------------------------------------------------------------------------------- main
def load():
  try:
    return float(open("/proc/loadavg").read().split()[0])
  except OSError:
    return None


def main(argv=None):
  args = parse_args(argv)
  if args.keras_worker:
    keras_worker(args)
    return
  common.reexec_with_malloc_tunables(args.malloc == "keep")
  names = [] if args.keras == "none" else [n for n in args.keras.split(",") if n]
  unknown = set(names) - set(KERAS_BACKENDS)
  if unknown:
    raise SystemExit(f"unknown Keras backend(s) {sorted(unknown)}; choose from {sorted(KERAS_BACKENDS)}")
  result = {"name": "train_step", "model": args.model, "size": args.size, "global_batch": args.global_batch,
            "dtype": args.dtype, "remat": args.remat, "malloc": args.malloc,
            "machine": common.machine(),
            "load_avg_start": load()}
  common.log(f"ours: compiling ({args.size}x{args.size}, global batch {args.global_batch}, "
             f"{args.dtype}{', remat' if args.remat else ''}) ...")
  ours = OursBench(args)
  if args.compile_only:
    result.update(devices=ours.devices, xla_compile_s=round(ours.compile_s, 1),
                  **flops_per_image(ours, args),
                  memory_gib=ours.memory)
    common.emit(result, args.out)
    return
  common.log(f"ours: first step {ours.first_step_s:.1f} s, second {ours.second_step_s:.2f} s")
  ours_all, ours_cpu, keras_results, ratios = [], [], {}, {}
  for name in names:
    common.log(f"keras/{name}: compiling ...")
    worker = KerasProcess(name, args)
    common.log(f"keras/{name}: first step {worker.first['first_step_s']:.1f} s")
    ours_here, keras_here, keras_cpu = [], [], []
    try:
      for _ in range(args.rounds):
        wall, cpu = ours.run(args.steps)
        ours_here += wall
        ours_cpu += cpu
        wall, cpu = worker.run(args.steps)
        keras_here += wall
        keras_cpu += cpu
        common.log(f"  ours {args.global_batch / statistics.median(ours_here):.3f} img/s, "
                   f"keras/{name} {args.global_batch / statistics.median(keras_here):.3f} img/s")
    finally:
      worker.close()
    ours_all += ours_here
    keras_results[name] = {"images_per_s": common.throughput(args.global_batch, keras_here),
                           "compile_s": worker.first["first_step_s"],
                           "cpu_s_per_step": statistics.median(keras_cpu)}
    # Against the ours steps taken in between: the fairest comparison on a shared machine.
    ratios[name] = (common.throughput(args.global_batch, ours_here)
                    / keras_results[name]["images_per_s"])
  if not names:
    ours_all, ours_cpu = ours.run(args.steps * args.rounds)
  result["devices"] = ours.devices
  result["ours"] = round(common.throughput(args.global_batch, ours_all), 4)
  for name in KERAS_BACKENDS:
    result[f"keras_{name}"] = (round(keras_results[name]["images_per_s"], 4)
                               if name in keras_results else None)
  result["ratio_vs_keras_jax"] = round(ratios["jax"], 3) if "jax" in ratios else None
  result["ratio_vs_keras_tf"] = round(ratios["tf"], 3) if "tf" in ratios else None
  result["ratio_vs_keras_tf_xla"] = round(ratios["tf_xla"], 3) if "tf_xla" in ratios else None
  result["compile_s"] = round(ours.first_step_s, 1)  # Compile + first execution.
  result["xla_compile_s"] = round(ours.compile_s, 1)
  result.update(flops_per_image(ours, args))
  result["memory_gib"] = ours.memory
  result["second_step_s"] = round(ours.second_step_s, 2)
  result["step_s"] = round(statistics.median(ours_all), 3)
  result["keras_compile_s"] = {n: round(r["compile_s"], 1) for n, r in keras_results.items()}
  # Process CPU seconds per step: less sensitive than wall time to other jobs on a shared machine
  # (but counts spinning worker threads).
  result["cpu_s_per_step"] = {"ours": round(statistics.median(ours_cpu), 2),
                              **{n: round(r["cpu_s_per_step"], 2) for n, r in keras_results.items()}}
  result["load_avg_end"] = load()
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
