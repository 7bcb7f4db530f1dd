"""The tasks main.py runs, by `config.task`: each a module with train(config, workdir, start_time),
predict(config, workdir) and train_table(config, workdir); and the data-only steps (`--mode=data`)."""
import importlib

from absl import logging

from melanoma_jax.data import folds
from melanoma_jax.training.results import write_results
from melanoma_jax.utils.errors import InputError

TASKS = {"image": "melanoma_jax.image.task", "tabular": "melanoma_jax.tabular.task",
         "ensemble": "melanoma_jax.ensemble.task"}


def task_module(name):
  """The module of task `name` (imported on demand: a tabular run never loads TensorFlow's image code)."""
  if name not in TASKS:
    raise InputError(f"config.task={name!r} must be one of {', '.join(repr(t) for t in TASKS)}")
  return importlib.import_module(TASKS[name])


def prepare_data(name, config, workdir):
  """Leakage check, patient-grouped folds and (image data, empty data_dir) synthetic generation; no
  training. Writes WORKDIR/data.json, not results.json: a data-only run leaves a trained run's results alone."""
  train_df = task_module(name).train_table(config, workdir)
  fold_ids = folds.assign_folds(train_df, int(config.num_folds), int(config.seed))
  summary = folds.fold_summary(train_df, fold_ids)
  logging.info("patient-grouped folds:\n%s", summary.to_string())
  return write_results(workdir, {"mode": "data", "images": len(train_df), "malignant": int(train_df["target"].sum()),
                                 "patients": int(train_df["patient_id"].nunique()),
                                 "folds": summary.reset_index().to_dict("records")}, config, name="data.json")
