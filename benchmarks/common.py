"""Helpers shared by the benchmarks: model state without a slow random init, timing, JSON output.

Benchmarks measure speed, not learning, so variables are drawn with numpy (scaled like a fan-in
initialiser, BatchNorm variances at 1) instead of `model.init`, which takes about a minute on CPU.
"""
import json
import os
import platform
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
  sys.path.insert(0, REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.extend  # ClosedJaxpr, Jaxpr (jaxpr_flops)
import jax.numpy as jnp
import numpy as np


def machine() -> str:
  """A one-line description of where the numbers come from."""
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"{os.cpu_count()}-core CPU ({platform.processor() or platform.machine()})"
  return f"{jax.local_device_count()} x {device.device_kind}"


def abstract_variables(model, size):
  """jax.eval_shape of `model.init` on one size x size image (no compute)."""
  return jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)},
                                           jnp.zeros((1, size, size, 3)), train=False))


def filled_variables(model, size, seed=0):
  """Variables of `model` with fan-in scaled normal weights, zero biases and means, unit variances."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['var']"):
      return jnp.ones(leaf.shape, leaf.dtype)
    if name.endswith("['bias']") or name.endswith("['mean']"):
      return jnp.zeros(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) or 1
    values = rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in)
    return jnp.asarray(values, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract_variables(model, size))


def classifier(dtype="float32", kernels="auto", remat=False, model="inception_resnet_v2"):
  """The MelanomaClassifier training builds (`build_model(model)`), BatchNorm synchronised over the pmap
  axis."""
  from melanoma_jax.models import build_model  # pylint: disable=g-import-not-at-top
  from melanoma_jax.training import steps  # pylint: disable=g-import-not-at-top
  return build_model(model, dtype=dtype, remat=remat, kernels=kernels, bn_axis_name=steps.AXIS)


def pmapped_train_step(model, donate=True):
  """The training step as training runs it (`steps.p_train(steps.make_train_step(...))`), classes 1:1."""
  from melanoma_jax.training import steps  # pylint: disable=g-import-not-at-top
  return steps.p_train(steps.make_train_step(model, (1.0, 1.0)), donate=donate)


def compile_train_step(model, state, batch):
  """(`pmapped_train_step(model)` compiled ahead of time for `state` and `batch`, seconds it took)."""
  start = time.perf_counter()
  compiled = pmapped_train_step(model).lower(state, batch).compile()
  return compiled, time.perf_counter() - start


def train_batch(global_batch, size):
  """A fixed training batch of host arrays split over the local devices: `random_images`, labels 0, 1, ..."""
  from melanoma_jax.training import steps  # pylint: disable=g-import-not-at-top
  labels = (np.arange(global_batch) % 2).astype(np.float32)
  return steps.shard_batch({"x": random_images(global_batch, size), "y": labels,
                            "mask": np.ones(global_batch, np.float32)})


def train_state(model, size, global_batch):
  """A TrainState (Adam) of `model` with `filled_variables`, placed as the pmapped steps return it.

  Exits with a message unless `global_batch` splits evenly over the local devices.
  """
  import optax  # pylint: disable=g-import-not-at-top
  from melanoma_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.training import steps  # pylint: disable=g-import-not-at-top
  devices = jax.local_device_count()
  if global_batch % devices:
    raise SystemExit(f"--global_batch {global_batch} is not divisible by {devices} devices")
  state = state_lib.create_train_state(model, optax.adam(1e-4), jax.random.PRNGKey(0), None,
                                       variables=filled_variables(model, size))
  return steps.replicate(state)  # As the step returns it: no second compile.


def flops(compiled):
  """FLOPs of one execution of a compiled (per-device) program, from XLA's cost analysis (None: none)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # Older JAX: one dict per program.
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


def _sub_jaxprs(params):
  for value in params.values():
    for item in (value if isinstance(value, (list, tuple)) else (value,)):
      if isinstance(item, jax.extend.core.ClosedJaxpr):
        yield item.jaxpr
      elif isinstance(item, jax.extend.core.Jaxpr):
        yield item


def _eqn_flops(eqn):
  """2 x multiply-adds of a dot_general or conv_general_dilated equation; 0 for anything else."""
  if eqn.primitive.name == "dot_general":
    lhs = eqn.invars[0].aval.shape
    (contracting, _), _ = eqn.params["dimension_numbers"]
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in contracting])
  if eqn.primitive.name == "conv_general_dilated":
    rhs = eqn.invars[1].aval.shape
    rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out features, in features, spatial...)
    per_output = rhs[rhs_spec[1]] * np.prod([rhs[d] for d in rhs_spec[2:]])
    return 2.0 * np.prod(eqn.outvars[0].aval.shape) * per_output
  return 0.0


def jaxpr_flops(jaxpr) -> float:
  """FLOPs of the matrix products and convolutions of a jaxpr, sub-jaxprs (pmap, remat, ...) included.

  Backend-independent model FLOPs: XLA:GPU's cost analysis leaves out the convolutions it hands to
  cuDNN (it reported 7.6 GFLOPs per 299x299 training image against XLA:CPU's 79.5), and XLA:CPU's counts
  a loop's body once. Scan bodies count `length` times; a while loop's body once (no trip count).
  """
  total = 0.0
  for eqn in jaxpr.eqns:
    total += _eqn_flops(eqn)
    repeats = eqn.params["length"] if eqn.primitive.name == "scan" else 1  # A scan runs its body length times.
    for sub in _sub_jaxprs(eqn.params):
      total += repeats * jaxpr_flops(sub)
  return total


def step_flops(size, global_batch, dtype, kernels, remat, model="inception_resnet_v2"):
  """FLOPs of one training step (all devices): its matrix products and convolutions, from its jaxpr."""
  from melanoma_jax.training import state as state_lib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  model = classifier(dtype, kernels, remat, model)
  state = jax.eval_shape(lambda v: state_lib.create_train_state(model, optax.adam(1e-4), jax.random.PRNGKey(0),
                                                                None, variables=v),
                         abstract_variables(model, size))
  devices = jax.local_device_count()
  shard = lambda *shape: jax.ShapeDtypeStruct((devices, global_batch // devices) + shape, jnp.float32)
  batch = {"x": shard(size, size, 3), "y": shard(), "mask": shard()}
  step = pmapped_train_step(model, donate=False)
  return jaxpr_flops(jax.make_jaxpr(step)(state, batch).jaxpr) * devices


def memory(compiled):
  """GiB a compiled program needs per device: arguments, outputs (less donated aliases), temporaries."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  gib = 1024.0 ** 3
  total = (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
           + stats.temp_size_in_bytes)
  return {"total": round(total / gib, 3), "temp": round(stats.temp_size_in_bytes / gib, 3),
          "arguments": round(stats.argument_size_in_bytes / gib, 3)}


def random_images(global_batch, size, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1.0, 1.0, (global_batch, size, size, 3)).astype(np.float32)


def timed(fn):
  """(seconds, result) of fn(), the result blocked on."""
  start = time.perf_counter()
  result = jax.block_until_ready(fn())
  return time.perf_counter() - start, result


def throughput(images_per_step, step_seconds):
  """Images/s from the median step time (robust to a stray slow step on a shared machine)."""
  return images_per_step / statistics.median(step_seconds)


def emit(result, out=None):
  """Prints `result` as the last line (one JSON object) and writes it to `out` if given."""
  line = json.dumps(result, sort_keys=False)
  if out:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
      f.write(line + "\n")
  print(line, flush=True)


# glibc malloc settings that keep freed memory mapped: XLA's CPU runtime allocates its buffers for
# every execution, and by default glibc returns large ones to the kernel (mmap/munmap), so every
# step page-faults its whole working set in again (about a million faults and a fifth of the CPU
# time of a 299x299 batch-8 training step, measured with perf on 2 cores).
KEEP_MEMORY_TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1000000000000:"
                        "glibc.malloc.arena_max=1")


def reexec_with_malloc_tunables(enabled):
  """Restarts this process once with KEEP_MEMORY_TUNABLES (glibc reads them only at start).

  Subprocesses (the Keras workers) inherit them, so both sides run under the same allocator.
  """
  current = os.environ.get("GLIBC_TUNABLES", "")
  if not enabled or KEEP_MEMORY_TUNABLES in current or platform.system() != "Linux":
    return
  env = dict(os.environ, GLIBC_TUNABLES=":".join(t for t in (current, KEEP_MEMORY_TUNABLES) if t))
  os.execve(sys.executable, [sys.executable] + sys.argv, env)


# Worker subprocesses (other frameworks, other thread settings) answer on stdout, where TF and Keras also
# log: their replies are the lines that start with this prefix.
WORKER_PREFIX = "@@"


def worker_say(obj):
  """Worker side: one JSON reply line."""
  print(WORKER_PREFIX, json.dumps(obj), flush=True)


def worker_reply(lines):
  """Parent side: the next reply among `lines` (a worker's stdout), or None if it ended without one."""
  for line in lines:
    if line.startswith(WORKER_PREFIX):
      return json.loads(line[len(WORKER_PREFIX):])
  return None


def log(*args):
  print(*args, file=sys.stderr, flush=True)
