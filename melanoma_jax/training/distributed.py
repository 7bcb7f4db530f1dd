"""One run across several processes (and machines): JAX's own runtime, `jax.distributed`, and the few
cross-process operations a run needs.

Contract: after `initialize`, `jax.device_count()` counts the devices of every process and a pmapped step
(`steps.p_train`) spans all of them: its `psum`/`pmean` over the pmap axis average gradients and BatchNorm
statistics over every device of every process, while each process feeds only its local devices. The
helpers below are no-ops in a single-process run, so one code path serves both.
"""
import logging as py_logging

import jax
import numpy as np

from melanoma_jax.utils.errors import InputError


def initialize(coordinator_address=None, num_processes=None, process_id=None, auto=False):
  """Joins the run's processes; must come before anything touches a device. Returns whether it did.

  `coordinator_address` ("HOST:PORT" of process 0), `num_processes` and `process_id` go together; `auto`
  alone lets JAX detect them (TPU pods, SLURM, Open MPI). Nothing given: a single-process run.
  """
  given = [v is not None for v in (coordinator_address, num_processes, process_id)]
  if not any(given) and not auto:
    return False
  if any(given) and not all(given):
    raise InputError("--coordinator_address, --num_processes and --process_id go together (or use "
                     "--distributed alone where JAX detects them)")
  if all(given) and not 0 <= process_id < num_processes:
    raise InputError(f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
  # CPU devices of different processes exchange collectives through gloo; without it a multi-process
  # CPU run has no cross-process collectives. Other platforms ignore the setting.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if all(given):
    jax.distributed.initialize(coordinator_address, num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()
  return True


def process_index():
  return jax.process_index()


def process_count():
  return jax.process_count()


def is_primary():
  """Process 0 writes the run's shared outputs (results, CSVs, plots, TensorBoard, run.json)."""
  return jax.process_index() == 0


def label():
  """'[process i/n]', the prefix of a multi-process run's log and error lines."""
  return f"[process {jax.process_index()}/{jax.process_count()}]"


class _ProcessPrefix(py_logging.Filter):

  def __init__(self, prefix):
    super().__init__()
    self._prefix = prefix

  def filter(self, record):
    if not getattr(record, "_process_prefixed", False):
      record.msg = f"{self._prefix} {record.msg}"
      record._process_prefixed = True  # pylint: disable=protected-access
    return True


def prefix_log_lines(handler):
  """Starts every line `handler` writes with `label()` (multi-process runs only)."""
  if jax.process_count() > 1:
    handler.addFilter(_ProcessPrefix(label()))


def barrier(name):
  """Waits until every process reaches the barrier `name` (a collective over all devices)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


def all_true(flag):
  """Whether `flag` holds in every process (each process passes its own)."""
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  return bool(np.asarray(multihost_utils.process_allgather(np.array([int(bool(flag))], np.int32))).all())


def gather_rows(columns):
  """{name: array} of every process's rows, concatenated in process order (the same in every process).

  Each process passes its own rows (equal-length arrays, any count, possibly none); they travel padded to
  the longest share and come back unpadded. Floats travel as float32 and ints as int32 (JAX's default
  precision), so pass predictions as float32 and names as indices into a table every process holds.
  """
  if jax.process_count() == 1:
    return {k: np.asarray(v) for k, v in columns.items()}
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  n = len(next(iter(columns.values())))
  counts = np.asarray(multihost_utils.process_allgather(np.array([n], np.int32))).reshape(-1)
  size = max(int(counts.max()), 1)
  gathered = {}
  for name, values in columns.items():
    values = np.asarray(values)
    padded = np.zeros((size,) + values.shape[1:], values.dtype)
    padded[:n] = values
    every = np.asarray(multihost_utils.process_allgather(padded))  # [processes, size, ...]
    gathered[name] = np.concatenate([every[p, :int(c)] for p, c in enumerate(counts)])
  return gathered
