"""melanoma_jax entry point.

  python main.py --config=configs/demo.py --workdir=runs/demo                 # train + predict (image)
  python main.py --config=configs/image.py --workdir=W --mode=predict         # predict with the best checkpoint
  python main.py --config=configs/tabular.py --workdir=W                      # tabular model, 5-fold CV
  python main.py --config=configs/demo.py --workdir=W --mode=data             # leakage check, folds, data only
Any config field can be overridden: --config.image_size=128 --config.synthetic.num_patients=100.
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before anything imports TensorFlow.

from absl import app, flags, logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory: checkpoints, TensorBoard logs, results.json, CSVs.")
flags.DEFINE_enum("mode", "train", ["train", "predict", "data"],
                  "train: train (resuming) then predict; predict: best checkpoint -> submission; "
                  "data: only the data steps (leakage check, folds, synthetic generation).")
flags.DEFINE_string("jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "melanoma_jax", "xla"),
                    "Persistent XLA compilation cache ('' to disable): re-runs skip recompiling.")
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


def _task(name):
  """The task module of `config.task`: train(config, workdir, start_time), predict(...), train_table(...)."""
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  if name == "image":
    from melanoma_jax.image import task  # pylint: disable=g-import-not-at-top
  elif name == "tabular":
    from melanoma_jax.tabular import task  # pylint: disable=g-import-not-at-top
  else:
    raise InputError(f"config.task={name!r} must be 'image' or 'tabular'")
  return task


def run_data_steps(task, config, workdir):
  """Leakage check, folds and (image task, empty data_dir) synthetic generation; no training."""
  from melanoma_jax.data import folds  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.results import write_results  # pylint: disable=g-import-not-at-top
  train_df = task.train_table(config, workdir)
  fold_ids = folds.assign_folds(train_df, int(config.num_folds), int(config.seed))
  summary = folds.fold_summary(train_df, fold_ids)
  logging.info("patient-grouped folds:\n%s", summary.to_string())
  # data.json, not results.json: a data-only run must leave a trained run's results alone.
  write_results(workdir, {"mode": "data", "images": len(train_df), "malignant": int(train_df["target"].sum()),
                          "patients": int(train_df["patient_id"].nunique()),
                          "folds": summary.reset_index().to_dict("records")}, config, name="data.json")


def main(argv):
  del argv
  from melanoma_jax.utils.errors import RunError  # pylint: disable=g-import-not-at-top
  start = time.time()
  config, workdir = FLAGS.config, FLAGS.workdir
  os.makedirs(workdir, exist_ok=True)
  _quiet_libraries()
  from melanoma_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  try:
    with workdir_lib.lock(workdir):
      _setup_jax(FLAGS.jax_cache_dir)
      task = _task(config.task)
      if FLAGS.mode == "data":
        run_data_steps(task, config, workdir)
      elif FLAGS.mode == "predict":
        task.predict(config, workdir)
      else:
        task.train(config, workdir, start_time=start)
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  print(f"done in {time.time() - start:.0f} s; outputs in {os.path.abspath(workdir)}")


def _parse_flags(argv):
  """absl's flag parsing, with a bad flag or config override (e.g. an unknown field) as one error line."""
  try:
    return FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks.
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    field = str(e.args[0] if e.args else e).strip("\"'")
    named = [o for o in overrides if o.split(".")[-1] == field]
    print(f"error: {named[0] if named else field}: no such config field", file=sys.stderr)
  except (flags.Error, TypeError, ValueError) as e:
    message = str(e).strip().splitlines()
    print(f"error: {message[0] if message else type(e).__name__}", file=sys.stderr)
  sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
