"""Patient-grouped K-fold CV of the tabular MLP: features -> SMOTE -> pmapped optax steps -> OOF + test.

`run(config, workdir)` trains one model per fold (fit on the training folds only, early stopping on the
validation fold's AUC), keeps each fold's best model in WORKDIR/checkpoints/fold_K (a rerun on the same
workdir reuses finished folds) and writes:
  oof.csv         image_name,patient_id,target,prediction,fold  (every train.csv row once, original rows)
  submission.csv  image_name,target  (mean of the fold models' probabilities, every test.csv row)
  results.json    oof_auc, fold_aucs, patient_context, wall_seconds, per-fold details, config, versions
  roc.png         the out-of-fold ROC curve
"""
import hashlib
import json
import os
import time

from absl import logging
from imblearn.over_sampling import SMOTE
import jax
import numpy as np
import optax
import pandas as pd

from melanoma_jax.data import folds as folds_lib
from melanoma_jax.data import metadata
from melanoma_jax.tabular import features
from melanoma_jax.tabular.model import MLP
from melanoma_jax.training import checkpoint as checkpoint_lib
from melanoma_jax.training import losses, metrics, steps
from melanoma_jax.training import state as state_lib
from melanoma_jax.utils import plots
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.results import write_results

# Config fields that change what a fold's checkpoint holds; a rerun with other values must not reuse it.
_MODEL_FIELDS = ("seed", "num_folds", "num_epochs", "per_device_batch_size", "global_batch_size",
                 "learning_rate", "dropout_rate", "hidden_sizes", "patient_context", "smote",
                 "smote_k_neighbors", "early_stopping_patience", "early_stopping_start_epoch",
                 "label_smoothing", "class_weights")  # calibrate: applied after, never saved.


def validate_config(config):
  """Refuses configs that cannot work, before any data is read."""
  if int(config.num_epochs) < 1:
    raise InputError(f"config.num_epochs={config.num_epochs} must be >= 1")
  if int(config.early_stopping_patience) < 1:
    raise InputError(f"config.early_stopping_patience={config.early_stopping_patience} must be >= 1")
  if int(config.per_device_batch_size) < 1:
    raise InputError(f"config.per_device_batch_size={config.per_device_batch_size} must be >= 1")
  if not 0.0 <= float(config.dropout_rate) < 1.0:
    raise InputError(f"config.dropout_rate={config.dropout_rate} must be in [0, 1)")
  if config.class_weights is not None and len(config.class_weights) != 2:
    raise InputError(f"config.class_weights={config.class_weights} must be None or (w_neg, w_pos)")
  steps.global_batch_size(config)


def load_tables(config):
  """(train_df, test_df): config.data_dir/{train,test}.csv, or the embedded real CSVs if data_dir is ''."""
  root = config.data_dir
  train_path = os.path.join(root, "train.csv") if root else metadata.EMBEDDED_TRAIN_CSV
  test_path = os.path.join(root, "test.csv") if root else metadata.EMBEDDED_TEST_CSV
  return metadata.load_metadata(train_path, "train"), metadata.load_metadata(test_path, "test")


def smote_resample(x, y, seed, k_neighbors=5):
  """SMOTE on training rows only: the originals followed by synthetic malignant rows (float32, 1:1)."""
  n_pos = int(y.sum())
  if n_pos <= k_neighbors:
    raise InputError(f"SMOTE needs more than k_neighbors={k_neighbors} malignant training rows, "
                     f"got {n_pos}; add data or set config.smote=False")
  x_s, y_s = SMOTE(k_neighbors=k_neighbors, random_state=seed).fit_resample(x, y)
  return np.asarray(x_s, np.float32), np.asarray(y_s, np.float32)


def fit_platt(logits, y):
  """(a, b) of p = sigmoid(a * logit + b) fitted by maximum likelihood (Platt scaling).

  Fitted on a fold's own original training rows: SMOTE (1:1) and class weights move the model's
  probabilities far from the real malignant rate, differently for each early-stopped fold model, so
  without it the fold models' outputs are neither probabilities nor comparable when pooled (out-of-fold
  AUC) or averaged (submission). Monotonic, so it never changes a fold's own AUC.
  """
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  model = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(logits, np.float64)[:, None], y)
  return float(model.coef_[0, 0]), float(model.intercept_[0])


def epoch_batches(x, y, global_batch, rng):
  """Every row once in a shuffled order, as sharded batches; the last one padded with mask 0."""
  order = rng.permutation(len(x))
  for start in range(0, len(x), global_batch):
    idx = order[start:start + global_batch]
    batch = steps.pad_batch({"x": x[idx], "y": y[idx]}, global_batch)
    yield steps.shard_batch(batch)


def _fingerprint(config, train_df):
  """Hash of the model-defining config fields and the training table (names, features, targets)."""
  fields = {k: config.get(k) for k in _MODEL_FIELDS}
  fields["num_devices"] = jax.local_device_count()
  table = train_df[["image_name", "patient_id", "target"] + list(features.FEATURE_COLUMNS)]
  digest = hashlib.sha256(json.dumps(fields, sort_keys=True, default=list).encode())
  digest.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
  return digest.hexdigest()[:16]


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


class _Trainer:
  """The model, optimizer and pmapped steps, built once and reused across folds."""

  def __init__(self, config):
    self.config = config
    self.model = MLP(hidden_sizes=tuple(config.hidden_sizes), dropout_rate=float(config.dropout_rate))
    self.tx = optax.adam(float(config.learning_rate))
    self.global_batch = steps.global_batch_size(config)
    self.p_eval = steps.p_eval(steps.make_eval_step(self.model))
    self._init = jax.jit(lambda rng, x: self.model.init({"params": rng}, x, train=False))
    self._p_train = {}  # class weights -> pmapped step (the weights are compiled in).

  def p_train(self, class_weights):
    key = tuple(round(float(w), 6) for w in class_weights)
    if key not in self._p_train:
      self._p_train[key] = steps.p_train(steps.make_train_step(
          self.model, key, label_smoothing=float(self.config.label_smoothing)))
    return self._p_train[key]

  def init_state(self, fold, num_features):
    """The fold's initial state (seeded by config.seed and the fold); compiled once per feature count."""
    rng = jax.random.fold_in(jax.random.PRNGKey(int(self.config.seed)), fold)
    init_rng, state_rng = jax.random.split(rng)
    sample_x = np.zeros((1, num_features), np.float32)
    return state_lib.create_train_state(self.model, self.tx, state_rng, sample_x,
                                        variables=self._init(init_rng, sample_x))

  def logits(self, state, x):
    """Logits (float64) for every row of x."""
    return steps.predict(self.p_eval, state, x, self.global_batch).astype(np.float64)

  def predict(self, state, x):
    """Probabilities (float64) for every row of x."""
    return _sigmoid(self.logits(state, x))

  def fit(self, fold, state, x, y, x_val, y_val):
    """Trains `state` with early stopping on validation AUC; returns (best host state, details dict)."""
    config = self.config
    weights = (tuple(config.class_weights) if config.class_weights is not None
               else losses.class_weights(y))
    p_train = self.p_train(weights)
    rng = np.random.default_rng([int(config.seed), fold])
    best_auc, best_state, best_epoch, bad_epochs, rows_per_epoch = -1.0, None, 0, 0, []
    start_epoch = min(int(config.early_stopping_start_epoch), int(config.num_epochs))
    epoch = 0
    for epoch in range(1, int(config.num_epochs) + 1):
      counts = []
      for batch in epoch_batches(x, y, self.global_batch, rng):
        state, step_metrics = p_train(state, batch)
        counts.append(step_metrics["count"])
      rows_per_epoch.append(int(round(float(np.sum(jax.device_get(counts))))))
      auc = metrics.roc_auc(y_val, self.predict(state, x_val))
      if epoch < start_epoch:
        pass  # Warm-up: not a candidate, no patience spent (as Keras' EarlyStopping start_from_epoch).
      elif auc > best_auc:
        best_auc, best_state, best_epoch, bad_epochs = auc, jax.device_get(state), epoch, 0
      else:
        bad_epochs += 1
      logging.info("fold %d epoch %d: validation AUC %.4f (best %.4f at epoch %d)", fold, epoch, auc,
                   best_auc, best_epoch)
      if bad_epochs >= int(config.early_stopping_patience):
        break
    details = {"best_epoch": best_epoch, "epochs_run": epoch, "val_auc": best_auc,
               "class_weights": [float(w) for w in weights], "rows_per_epoch": rows_per_epoch[0]}
    if len(set(rows_per_epoch)) != 1:
      raise RuntimeError(f"fold {fold}: rows per epoch changed between epochs: {rows_per_epoch}")
    return best_state, details


def _run_fold(trainer, fold, train_df, val_df, test_df, fingerprint, workdir):
  """Trains (or restores) one fold; returns (validation probabilities, test probabilities, details)."""
  config = trainer.config
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints", f"fold_{fold}"),
                                             max_to_keep=1)
  try:
    preprocessor = features.fit(train_df, bool(config.patient_context))
    num_features = len(preprocessor.columns)
    initial = trainer.init_state(fold, num_features)
    restored = checkpointer.restore_best(initial)
    if restored is not None and restored[1].get("fingerprint") != fingerprint:
      raise InputError(f"{checkpointer.directory} holds a model from another config or data; "
                       "use a new --workdir")
    if restored is not None:
      state, details = restored
      preprocessor = features.Preprocessor.from_dict(details["preprocessor"])
      details = dict(details, resumed=True)
      logging.info("fold %d: reusing the finished model in %s", fold, checkpointer.directory)
    else:
      x = preprocessor.transform(train_df)
      y = train_df["target"].to_numpy(np.float32)
      x_val = preprocessor.transform(val_df)
      y_val = val_df["target"].to_numpy(np.float32)
      train_rows = len(x)
      if config.smote:
        x, y = smote_resample(x, y, int(config.seed) + fold, int(config.smote_k_neighbors))
      logging.info("fold %d: %d training rows (%d malignant) -> %d trained on (SMOTE %s), "
                   "%d validation rows, %d features", fold, train_rows, int(train_df["target"].sum()),
                   len(x), "on" if config.smote else "off", len(x_val), num_features)
      start = time.time()
      state, details = trainer.fit(fold, initial, x, y, x_val, y_val)
      details.update(fold=fold, train_rows=train_rows, trained_rows=len(x), validation_rows=len(x_val),
                     fit_seconds=time.time() - start, feature_columns=list(preprocessor.columns),
                     preprocessor=preprocessor.to_dict(), fingerprint=fingerprint)
      checkpointer.save(details["best_epoch"], state, details, is_best=True)
      details["resumed"] = False
  finally:
    checkpointer.close()
  val_logits = trainer.logits(state, preprocessor.transform(val_df))
  test_logits = trainer.logits(state, preprocessor.transform(test_df))
  if config.get("calibrate", False):
    a, b = fit_platt(trainer.logits(state, preprocessor.transform(train_df)), train_df["target"].to_numpy())
    details = dict(details, calibration={"a": a, "b": b})
    logging.info("fold %d: Platt scaling on its %d training rows: p = sigmoid(%.3f * logit %+.3f)", fold,
                 len(train_df), a, b)
    val_logits, test_logits = a * val_logits + b, a * test_logits + b
  return _sigmoid(val_logits), _sigmoid(test_logits), details


def run(config, workdir):
  """Patient-grouped K-fold CV; writes oof.csv, submission.csv, results.json, roc.png; returns the metrics."""
  start = time.time()
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  train_df, test_df = load_tables(config)
  logging.info("%s", metadata.check_leakage(train_df, test_df))
  unknown = features.fit(train_df).unknown_categories(test_df)
  fold_ids = folds_lib.assign_folds(train_df, int(config.num_folds), int(config.seed))
  for fold in range(int(config.num_folds)):
    positives = int(train_df["target"].to_numpy()[fold_ids == fold].sum())
    if positives in (0, int((fold_ids == fold).sum())):
      raise InputError(f"{train_df.attrs.get('path')}: validation fold {fold} has only one class "
                       f"({positives} malignant); AUC needs both (use fewer folds or more data)")
  logging.info("patient-grouped folds:\n%s", folds_lib.fold_summary(train_df, fold_ids).to_string())
  trainer = _Trainer(config)
  fingerprint = _fingerprint(config, train_df)
  oof = np.full(len(train_df), np.nan)
  test_preds, fold_details, fold_aucs = [], [], []
  for fold in range(int(config.num_folds)):
    in_fold = fold_ids == fold
    val_pred, test_pred, details = _run_fold(
        trainer, fold, train_df[~in_fold].reset_index(drop=True),
        train_df[in_fold].reset_index(drop=True), test_df, fingerprint, workdir)
    oof[in_fold] = val_pred
    test_preds.append(test_pred)
    feature_columns = details["feature_columns"]
    fold_aucs.append(metrics.roc_auc(train_df["target"].to_numpy()[in_fold], val_pred))
    fold_details.append({k: v for k, v in details.items() if k not in ("feature_columns", "fingerprint")})
    logging.info("fold %d: validation AUC %.4f (best epoch %d of %d run)", fold, fold_aucs[-1],
                 details["best_epoch"], details["epochs_run"])
  targets = train_df["target"].to_numpy()
  oof_auc = metrics.roc_auc(targets, oof)
  pd.DataFrame({"image_name": train_df["image_name"], "patient_id": train_df["patient_id"],
                "target": targets, "prediction": oof, "fold": fold_ids}).to_csv(
                    os.path.join(workdir, "oof.csv"), index=False)
  pd.DataFrame({"image_name": test_df["image_name"], "target": np.mean(test_preds, axis=0)}).to_csv(
      os.path.join(workdir, "submission.csv"), index=False)
  context = "with" if config.patient_context else "without"
  plots.save_roc(targets, oof, os.path.join(workdir, "roc.png"),
                 f"Tabular MLP, out-of-fold ({context} patient context)")
  results = {"task": "tabular", "oof_auc": oof_auc, "fold_aucs": fold_aucs,
             "patient_context": bool(config.patient_context), "smote": bool(config.smote),
             "num_features": len(feature_columns), "feature_columns": feature_columns, "folds": fold_details,
             "train_rows": len(train_df), "test_rows": len(test_df), "unknown_test_categories": unknown,
             "wall_seconds": time.time() - start}
  write_results(workdir, results, config)
  logging.info("out-of-fold AUC %.4f (folds %s), %.0f s, %s patient context", oof_auc,
               " ".join(f"{a:.4f}" for a in fold_aucs), results["wall_seconds"], context)
  return results
