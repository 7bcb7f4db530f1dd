"""Patient-grouped K-fold CV of the tabular MLP: features -> SMOTE -> the shared fit loop -> OOF + test.

`train(config, workdir)` trains one model per fold (fit on the training folds only, early stopping on the
validation fold's AUC) through `training.loop.fit`, so each fold resumes from its latest checkpoint in
WORKDIR/checkpoints/fold_K (a finished fold is reused), logs TensorBoard scalars under
WORKDIR/tensorboard/fold_K and stops with exit 3 on a non-finite loss. It writes:
  oof.csv         image_name,patient_id,target,prediction,fold  (every train.csv row once, original rows)
  submission.csv  image_name,target  (mean of the fold models' probabilities, every test.csv row)
  results.json    oof_auc, fold_aucs, patient_context, wall_seconds, per-fold details, config, versions
  roc.png         the out-of-fold ROC curve
  report.html/.json  the clinical report of the out-of-fold predictions (evaluation/clinical.py)
An empty `config.data_dir` means the real ISIC 2020 CSVs embedded in the package.
"""
import dataclasses
import os
import time

import jax
import numpy as np
import optax
import pandas as pd
from absl import logging

from melanoma_jax import models
from melanoma_jax.data import folds as folds_lib
from melanoma_jax.data import metadata, sources
from melanoma_jax.evaluation import calibration, clinical, metrics, roc
from melanoma_jax.tabular import balance, features
from melanoma_jax.training import checkpoint as checkpoint_lib
from melanoma_jax.training import distributed, identity
from melanoma_jax.training import loop, losses, predict as predict_lib, reporting, steps
from melanoma_jax.training import state as state_lib
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError
from melanoma_jax.training.results import write_results

@dataclasses.dataclass(frozen=True)
class TabularRun:
  """What one tabular run is, in plain values."""
  num_devices: int
  global_batch: int
  plan_epochs: int
  patience: int
  first_candidate_epoch: int
  seed: int
  num_folds: int


def resolve(config, num_devices=None) -> TabularRun:
  """Checks `config` and resolves it; refuses configs that cannot work, before any data is read."""
  num_devices = num_devices or jax.local_device_count()
  checks = (
      (int(config.num_epochs) >= 1, f"config.num_epochs={config.num_epochs} must be >= 1"),
      (int(config.early_stopping_patience) >= 1,
       f"config.early_stopping_patience={config.early_stopping_patience} must be >= 1"),
      (0.0 <= float(config.dropout_rate) < 1.0, f"config.dropout_rate={config.dropout_rate} must be in [0, 1)"),
      (config.class_weights is None or len(config.class_weights) == 2,
       f"config.class_weights={config.class_weights} must be None or (w_neg, w_pos)"))
  for ok, message in checks:
    if not ok:
      raise InputError(message)
  global_batch = steps.global_batch_size(config.global_batch_size, config.per_device_batch_size, num_devices)
  return TabularRun(num_devices=num_devices, global_batch=global_batch, plan_epochs=int(config.num_epochs),
                    patience=int(config.early_stopping_patience),
                    first_candidate_epoch=min(int(config.early_stopping_start_epoch), int(config.num_epochs)),
                    seed=int(config.seed), num_folds=int(config.num_folds))


def load_tables(config):
  """(train_df, test_df) of config.data_dir's CSVs (`sources.csv_paths`: the embedded real ones if '')."""
  train_path, test_path = sources.csv_paths(config.data_dir)
  return metadata.load_metadata(train_path, "train"), metadata.load_metadata(test_path, "test")


def checked_tables(config):
  """load_tables, refusing patients that are in both tables."""
  train_df, test_df = load_tables(config)
  logging.info("%s", metadata.check_leakage(train_df, test_df))
  return train_df, test_df


def train_table(config, workdir):
  """The training table of the run's data source (for `--mode=data`), leakage-checked against test.csv."""
  del workdir  # The tabular task reads its tables where they are.
  return checked_tables(config)[0]


def epoch_batches(x, y, global_batch, rng):
  """(sharded batch, None) of every row once in a shuffled order; the last batch padded with mask 0."""
  order = rng.permutation(len(x))
  return predict_lib.array_batches(x[order], global_batch, y=y[order])


class _Trainer:
  """The model, optimizer and pmapped steps, built once and reused across folds."""

  def __init__(self, config, run):
    self.config, self.run = config, run
    self.model = models.build_model("mlp", hidden_sizes=tuple(config.hidden_sizes),
                                    dropout_rate=float(config.dropout_rate))
    self.tx = optax.adam(float(config.learning_rate))
    # Every process trains the same fold models on the same rows within its own devices (the MLP is tiny):
    # no collective crosses processes, every process ends with the same outputs and process 0 writes them.
    self.devices = jax.local_devices()
    self.p_logits = steps.p_predict(steps.make_predict_step(self.model, logits=True), devices=self.devices)
    self._init = jax.jit(lambda rng, x: self.model.init({"params": rng}, x, train=False))
    self._p_train = {}  # class weights -> pmapped step (the weights are compiled in).

  def p_train(self, class_weights):
    key = tuple(round(float(w), 6) for w in class_weights)
    if key not in self._p_train:
      self._p_train[key] = steps.p_train(steps.make_train_step(
          self.model, key, label_smoothing=float(self.config.label_smoothing)), devices=self.devices)
    return self._p_train[key]

  def init_state(self, fold, num_features):
    """The fold's initial state (seeded by config.seed and the fold); compiled once per feature count."""
    rng = jax.random.fold_in(jax.random.PRNGKey(self.run.seed), fold)
    init_rng, state_rng = jax.random.split(rng)
    sample_x = np.zeros((1, num_features), np.float32)
    return state_lib.create_train_state(self.model, self.tx, state_rng, sample_x,
                                        variables=self._init(init_rng, sample_x))

  def logits(self, state, x, what):
    """Logits (float64) for every row of x."""
    return predict_lib.collect(self.p_logits, state, predict_lib.array_batches(x, self.run.global_batch),
                           what)["outputs"]

  def plan(self, fold, rows):
    return loop.Plan(num_epochs=self.run.plan_epochs, steps_per_epoch=-(-rows // self.run.global_batch),
                     global_batch=self.run.global_batch, monitor="val_auc", patience=self.run.patience,
                     first_candidate_epoch=self.run.first_candidate_epoch, label=f"fold {fold}")


def _run_fold(trainer, fold, train_df, val_df, test_df, workdir):
  """Trains (or resumes, or reuses) one fold; returns (validation probs, test probs, details)."""
  config, run = trainer.config, trainer.run
  preprocessor = features.fit(train_df, bool(config.patient_context))
  x, y = preprocessor.transform(train_df), train_df["target"].to_numpy(np.float32)
  x_val, y_val = preprocessor.transform(val_df), val_df["target"].to_numpy(np.float32)
  initial = trainer.init_state(fold, len(preprocessor.columns))
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints", f"fold_{fold}"),
                                             monitor="val_auc", max_to_keep=1)
  summaries = reporting.Summaries(os.path.join(workdir, "tensorboard", f"fold_{fold}"))
  try:
    saved = loop.finished_meta(checkpointer, run.plan_epochs)
    train_rows = len(x)
    # A finished fold is reused as saved: its metadata holds the rows it trained on and its class weights,
    # so the SMOTE that produced them need not run again.
    resumed = saved is not None
    if resumed:
      trained_rows, weights = saved["trained_rows"], tuple(saved["class_weights"])
    else:
      if config.smote:
        x, y = balance.smote_resample(x, y, run.seed + fold, int(config.smote_k_neighbors))
      trained_rows = len(x)
      weights = (tuple(config.class_weights) if config.class_weights is not None else losses.class_weights(y))
      logging.info("fold %d: %d training rows (%d malignant) -> %d trained on (SMOTE %s), "
                   "%d validation rows, %d features", fold, train_rows, int(train_df["target"].sum()),
                   trained_rows, "on" if config.smote else "off", len(x_val), len(preprocessor.columns))
    fitted = loop.fit(
        initial, trainer.plan(fold, trained_rows), checkpointer, summaries,
        train_step=lambda epoch: trainer.p_train(weights),
        batches=lambda epoch: epoch_batches(x, y, run.global_batch,
                                            np.random.default_rng([run.seed, fold, epoch])),
        evaluate=lambda state: {"val_auc": metrics.roc_auc(
            y_val, trainer.logits(state, x_val, f"fold {fold} validation rows"))},
        meta={"preprocessor": preprocessor.to_dict(), "trained_rows": trained_rows,
              "class_weights": [float(w) for w in weights]})
    state, meta = checkpointer.restore_best(initial)
  finally:
    summaries.close()
    checkpointer.close()
  details = {"fold": fold, "best_epoch": meta["best_epoch"], "epochs_run": fitted.meta["epoch"],
             "val_auc": meta["best"], "class_weights": [float(w) for w in weights],
             "rows_per_epoch": fitted.meta["history"][0]["train_rows"], "train_rows": train_rows,
             "trained_rows": trained_rows, "validation_rows": len(x_val), "fit_seconds": fitted.meta["train_seconds"],
             "stopped_early": fitted.meta["stopped_early"], "resumed": resumed,
             "preprocessor": preprocessor.to_dict()}
  if len({h["train_rows"] for h in fitted.meta["history"]}) != 1:
    raise RuntimeError(f"fold {fold}: rows per epoch changed between epochs")
  val_logits = trainer.logits(state, x_val, f"fold {fold} validation rows")
  test_logits = trainer.logits(state, preprocessor.transform(test_df), f"fold {fold} test rows")
  if config.calibrate:
    train_logits = trainer.logits(state, preprocessor.transform(train_df), f"fold {fold} training rows")
    a, b = calibration.fit_platt(train_logits, train_df["target"].to_numpy())
    details["calibration"] = {"a": a, "b": b}
    logging.info("fold %d: Platt scaling on its %d training rows: p = sigmoid(%.3f * logit %+.3f)", fold,
                 len(train_df), a, b)
    val_logits, test_logits = a * val_logits + b, a * test_logits + b
  details["feature_columns"] = list(preprocessor.columns)
  return calibration.sigmoid(val_logits), calibration.sigmoid(test_logits), details


def train(config, workdir, start_time=None):
  """Patient-grouped K-fold CV; writes oof.csv, submission.csv, results.json, roc.png; returns the metrics."""
  start = start_time or time.time()
  run = resolve(config)
  os.makedirs(workdir, exist_ok=True)
  train_df, test_df = checked_tables(config)
  identity.check_or_record(workdir, identity.of_data(config, workdir, train_df.attrs["path"],
                                                     test_df.attrs["path"]))
  unknown = features.fit(train_df).unknown_categories(test_df)
  fold_ids = folds_lib.assign_folds(train_df, run.num_folds, run.seed)
  folds_lib.check_folds_have_both_classes(train_df, fold_ids, range(run.num_folds))
  logging.info("patient-grouped folds:\n%s", folds_lib.fold_summary(train_df, fold_ids).to_string())
  trainer = _Trainer(config, run)
  oof = np.full(len(train_df), np.nan)
  test_preds, fold_details, fold_aucs = [], [], []
  for fold in range(run.num_folds):
    in_fold = fold_ids == fold
    val_pred, test_pred, details = _run_fold(
        trainer, fold, train_df[~in_fold].reset_index(drop=True),
        train_df[in_fold].reset_index(drop=True), test_df, workdir)
    oof[in_fold] = val_pred
    test_preds.append(test_pred)
    feature_columns = details.pop("feature_columns")
    fold_aucs.append(metrics.roc_auc(train_df["target"].to_numpy()[in_fold], val_pred))
    fold_details.append(details)
    logging.info("fold %d: validation AUC %.4f (best epoch %d of %d run)", fold, fold_aucs[-1],
                 details["best_epoch"], details["epochs_run"])
  targets = train_df["target"].to_numpy()
  oof_auc = metrics.roc_auc(targets, oof)
  oof_table = pd.DataFrame({"image_name": train_df["image_name"], "patient_id": train_df["patient_id"],
                            "target": targets, "prediction": oof, "fold": fold_ids})
  context = "with" if config.patient_context else "without"
  report = None
  if distributed.is_primary():  # Every process computed the same; one writes.
    files.write_csv(oof_table, os.path.join(workdir, "oof.csv"))
    files.write_csv(pd.DataFrame({"image_name": test_df["image_name"], "target": np.mean(test_preds, axis=0)}),
                    os.path.join(workdir, "submission.csv"))
    roc.save_roc(targets, oof, os.path.join(workdir, "roc.png"),
                 f"Tabular MLP, out-of-fold ({context} patient context)")
    report = clinical.write_report(workdir, clinical.with_context(oof_table, train_df), {"tabular": "prediction"},
                                   f"Tabular MLP, out-of-fold ({context} patient context"
                                   f"{', Platt-calibrated' if config.calibrate else ''})")
  results = {"task": "tabular", "oof_auc": oof_auc, "fold_aucs": fold_aucs,
             "patient_context": bool(config.patient_context), "smote": bool(config.smote),
             "num_features": len(feature_columns), "feature_columns": feature_columns, "folds": fold_details,
             "train_rows": len(train_df), "test_rows": len(test_df), "unknown_test_categories": unknown,
             "report": os.path.join(workdir, "report.html"), "clinical": clinical.summary(report) if report else None,
             "wall_seconds": time.time() - start}
  write_results(workdir, results, config)
  logging.info("out-of-fold AUC %.4f (folds %s), %.0f s, %s patient context", oof_auc,
               " ".join(f"{a:.4f}" for a in fold_aucs), results["wall_seconds"], context)
  return results


def predict(config, workdir):
  """The tabular task predicts as part of its CV run; a rerun reuses the finished fold models."""
  return train(config, workdir)
