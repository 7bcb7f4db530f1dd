"""Patient-grouped, target-stratified K folds: no patient in two folds, malignant rate balanced."""
import numpy as np
import pandas as pd

from melanoma_jax.utils.errors import InputError


def assign_folds(df, num_folds=5, seed=0):
  """Returns an int array (one fold id per row of df) from grouped, stratified K-fold.

  Patients are dealt to folds greedily, largest first (ties broken by a seeded shuffle), each going to the
  fold that keeps both its image count and its malignant count closest to the target share. This keeps
  every fold's malignant rate within a small tolerance of the whole, and is deterministic for a seed.
  """
  if num_folds < 2:
    raise InputError(f"num_folds must be >= 2, got {num_folds}")
  patients = df.groupby("patient_id", sort=True)["target"].agg(["size", "sum"])
  if len(patients) < num_folds:
    raise InputError(f"{len(patients)} patient(s) cannot fill {num_folds} folds")
  rng = np.random.default_rng(seed)
  order = rng.permutation(len(patients))
  patients = patients.iloc[order]
  # Patients with malignant lesions first (by malignant count), then the rest by size: the scarce class is
  # spread before the bulk fills the gaps.
  patients = patients.sort_values(["sum", "size"], ascending=False, kind="stable")
  total_images, total_pos = float(len(df)), float(df["target"].sum())
  images = np.zeros(num_folds)
  positives = np.zeros(num_folds)
  fold_of = {}
  for patient_id, (size, pos) in zip(patients.index, patients.to_numpy()):
    # Deficit of each fold relative to an equal share, weighting the scarce positives like the images.
    cost = (images + size) / max(total_images, 1) + (positives + pos) / max(total_pos, 1)
    fold = int(np.argmin(cost))
    fold_of[patient_id] = fold
    images[fold] += size
    positives[fold] += pos
  return df["patient_id"].map(fold_of).to_numpy(dtype=np.int64)


def check_folds_have_both_classes(df, fold_ids, folds):
  """Raises InputError unless each fold of `folds` and the rest of `df` hold both classes (AUC needs them)."""
  targets = df["target"].to_numpy()
  for fold in folds:
    in_fold = fold_ids == fold
    for name, part in (("validation", targets[in_fold]), ("training", targets[~in_fold])):
      malignant = int(part.sum())
      if malignant in (0, len(part)):
        raise InputError(f"{df.attrs.get('path', 'train.csv')}: fold {fold} of {int(fold_ids.max()) + 1} leaves "
                         f"the {name} split with only one class ({len(part)} images, {malignant} malignant); "
                         "AUC needs both (use fewer folds or more data)")


def fold_summary(df, folds):
  """A small table per fold: images, patients, malignant, malignant rate."""
  frame = pd.DataFrame({"fold": folds, "patient_id": df["patient_id"].to_numpy(),
                        "target": df["target"].to_numpy()})
  return frame.groupby("fold").agg(images=("target", "size"), patients=("patient_id", "nunique"),
                                   malignant=("target", "sum"), rate=("target", "mean"))
