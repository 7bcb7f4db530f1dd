"""Class balance and calibration of the tabular folds: SMOTE on training rows, Platt scaling after."""
import numpy as np
from imblearn.over_sampling import SMOTE

from melanoma_jax.utils.errors import InputError


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
