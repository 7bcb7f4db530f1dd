"""melanoma_jax entry point.

  python main.py --config=configs/demo.py --workdir=runs/demo                 # train + predict (image)
  python main.py --config=configs/image.py --workdir=W --mode=predict         # predict with the best checkpoint
  python main.py --config=configs/tabular.py --workdir=W                      # tabular model, 5-fold CV
  python main.py --config=configs/demo.py --workdir=W --mode=data             # leakage check, folds, data only
Any config field can be overridden: --config.image_size=128 --config.synthetic.num_patients=100.
Several processes (machines), one run: the same command in each, plus
  --coordinator_address=HOST:PORT --num_processes=N --process_id=I    (or --distributed where JAX detects them)
"""
import os
import sys
import time
import traceback

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before anything imports TensorFlow.

from absl import app, flags, logging
from ml_collections import config_flags

from melanoma_jax.utils import cli

FLAGS = flags.FLAGS
_COORDINATOR_GRACE_S = 3.0
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard logs, results.json, CSVs.")
flags.DEFINE_enum("mode", "train", ["train", "predict", "data"],
                  "train: train (resuming) then predict; predict: best checkpoint -> submission; "
                  "data: only the data steps (leakage check, folds, synthetic generation).")
flags.DEFINE_string("jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "melanoma_jax", "xla"),
                    "Persistent XLA compilation cache ('' to disable): re-runs skip recompiling.")
flags.DEFINE_string("coordinator_address", None, "Multi-process run: HOST:PORT of process 0's coordinator "
                    "(with --num_processes and --process_id).")
flags.DEFINE_integer("num_processes", None, "Multi-process run: how many processes take part.")
flags.DEFINE_integer("process_id", None, "Multi-process run: this process's index in [0, num_processes).")
flags.DEFINE_bool("distributed", False, "Multi-process run set up by the environment JAX detects (TPU pods, "
                  "SLURM, Open MPI): jax.distributed.initialize() with no arguments.")
flags.mark_flags_as_required(["config", "workdir"])


def _quiet_libraries():
  """Keeps the console to our progress lines: libraries' INFO chatter (orbax, TF) is dropped."""
  import logging as py_logging  # pylint: disable=g-import-not-at-top

  class _OwnInfoOnly(py_logging.Filter):

    def filter(self, record):
      return record.levelno >= py_logging.WARNING or "melanoma_jax" in record.pathname or (
          record.pathname.endswith("main.py"))

  logging.get_absl_handler().addFilter(_OwnInfoOnly())
  logging.set_verbosity(logging.INFO)


def _setup_jax(cache_dir):
  import jax  # pylint: disable=g-import-not-at-top
  if cache_dir:
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
  logging.info("JAX %s: %d local device(s) %s, %d process(es)", jax.__version__, jax.local_device_count(),
               jax.local_devices()[0].platform, jax.process_count())


def main(argv):
  del argv
  from melanoma_jax.utils.errors import RunError  # pylint: disable=g-import-not-at-top
  from melanoma_jax.training import distributed  # pylint: disable=g-import-not-at-top
  start = time.time()
  config, workdir = FLAGS.config, FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  _quiet_libraries()
  from melanoma_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  multi = False
  try:
    multi = distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                                   auto=FLAGS.distributed)
    distributed.prefix_log_lines(logging.get_absl_handler())
    with workdir_lib.lock(workdir):
      _setup_jax(FLAGS.jax_cache_dir)
      from melanoma_jax import tasks  # pylint: disable=g-import-not-at-top
      task = tasks.task_module(config.task)
      if FLAGS.mode == "data":
        tasks.prepare_data(config.task, config, workdir)
      elif FLAGS.mode == "predict":
        task.predict(config, workdir)
      else:
        task.train(config, workdir, start_time=start)
  except RunError as e:
    print(f"{_error_prefix(multi)}error: {e}", file=sys.stderr)
    _exit(e.exit_code, multi)
  except BaseException as e:  # pylint: disable=broad-except
    if not multi:
      raise
    traceback.print_exc()
    print(f"{_error_prefix(multi)}error: {type(e).__name__}: {e}", file=sys.stderr)
    _exit(1, multi)
  print(f"done in {time.time() - start:.0f} s; outputs in {os.path.abspath(workdir)}")


def _error_prefix(multi):
  from melanoma_jax.training import distributed  # pylint: disable=g-import-not-at-top
  return distributed.label() + " " if multi else ""


def _exit(code, multi):
  """Exits with `code`; a process of a multi-process run leaves at once.

  A plain exit would first wait in JAX's shutdown barrier for peers that may be blocked in a collective
  with this process; leaving at once breaks their connections, so they fail (and exit) promptly too.
  Process 0 hosts JAX's coordination service, whose end aborts every peer ("another task died"), so it
  leaves a few seconds later: a peer that meets the same error (a bad config) reports it in its own words.
  """
  if not multi:
    sys.exit(code)
  sys.stdout.flush()
  sys.stderr.flush()
  from melanoma_jax.training import distributed  # pylint: disable=g-import-not-at-top
  if distributed.is_primary():
    time.sleep(_COORDINATOR_GRACE_S)
  os._exit(code)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
