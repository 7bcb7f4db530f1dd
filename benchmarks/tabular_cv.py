"""The tabular model's real numbers: 5-fold grouped CV on the embedded ISIC 2020 train.csv, both settings.

  .venv/bin/python benchmarks/tabular_cv.py --workdir=/tmp/tabular_bench [--baselines]

Runs configs/tabular.py with patient_context=True and False (fresh workdirs), prints a Markdown table
(out-of-fold AUC, fold AUCs, wall time) and exits 1 if the patient-context run misses its targets
(out-of-fold AUC >= 0.79, under 180 s). --baselines adds sklearn references on the same folds and the
same fitted features: logistic regression (balanced and unweighted) and a gradient-boosted tree.
"""
import os
import shutil
import sys
import time

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from configs import tabular as tabular_config
from melanoma_jax.tabular import task

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/tabular_bench", "Parent of the two run directories (replaced).")
flags.DEFINE_bool("baselines", False, "Also fit sklearn baselines on the same folds and features.")

TARGETS = {True: 0.79, False: 0.68}
MAX_SECONDS = 180.0


def _baselines(config):
  """{name: out-of-fold AUC} of sklearn models on the same folds and the same fitted features."""
  import numpy as np
  from sklearn.ensemble import HistGradientBoostingClassifier
  from sklearn.linear_model import LogisticRegression
  from sklearn.metrics import roc_auc_score
  from melanoma_jax.data import folds
  from melanoma_jax.tabular import features

  train_df, _ = task.load_tables(config)
  fold_ids = folds.assign_folds(train_df, config.num_folds, config.seed)
  y = train_df["target"].to_numpy()
  models = {
      "logistic regression, balanced": lambda: LogisticRegression(max_iter=3000, class_weight="balanced"),
      "logistic regression, unweighted": lambda: LogisticRegression(max_iter=3000),
      "gradient-boosted trees": lambda: HistGradientBoostingClassifier(
          max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=100, random_state=0),
  }
  out = {}
  for context in (False, True):
    split = []
    for fold in range(config.num_folds):
      rows = fold_ids != fold
      pre = features.fit(train_df[rows], patient_context=context)
      split.append((rows, pre.transform(train_df[rows]), pre.transform(train_df[~rows])))
    for name, make in models.items():
      oof = np.zeros(len(train_df))
      for rows, x_train, x_val in split:
        oof[~rows] = make().fit(x_train, y[rows]).predict_proba(x_val)[:, 1]
      out[(name, context)] = roc_auc_score(y, oof)
  return out


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  rows, failed = [], []
  for context in (True, False):
    config = tabular_config.get_config()
    config.patient_context = context
    workdir = os.path.join(FLAGS.workdir, "context" if context else "seed_features")
    shutil.rmtree(workdir, ignore_errors=True)
    start = time.time()
    results = task.train(config, workdir)
    seconds = time.time() - start
    folds = " ".join(f"{a:.4f}" for a in results["fold_aucs"])
    epochs = " ".join(f"{d['best_epoch']}/{d['epochs_run']}" for d in results["folds"])
    rows.append(f"| {'yes' if context else 'no'} | {results['num_features']} | {results['oof_auc']:.4f} | "
                f"{folds} | {epochs} | {seconds:.0f} |")
    if results["oof_auc"] < TARGETS[context]:
      failed.append(f"patient_context={context}: oof AUC {results['oof_auc']:.4f} < {TARGETS[context]}")
    if context and seconds > MAX_SECONDS:
      failed.append(f"patient_context={context}: {seconds:.0f} s > {MAX_SECONDS:.0f} s")
  print("| patient context | features | out-of-fold AUC | fold AUCs | best/run epochs | wall s |")
  print("|---|---|---|---|---|---|")
  print("\n".join(rows))
  if FLAGS.baselines:
    print("\n| sklearn baseline, same folds and features | seed features | with patient context |")
    print("|---|---|---|")
    found = _baselines(tabular_config.get_config())
    for name in dict.fromkeys(name for name, _ in found):
      print(f"| {name} | {found[(name, False)]:.4f} | {found[(name, True)]:.4f} |")
  for line in failed:
    print(f"target missed: {line}")
  # Only the patient-context targets gate the exit status: the seed-feature line is at the ceiling of three
  # columns (see README) and is reported, not enforced.
  sys.exit(1 if any(line.startswith("patient_context=True") for line in failed) else 0)


if __name__ == "__main__":
  app.run(main)
