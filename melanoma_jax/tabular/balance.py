"""Class balance of the tabular folds: SMOTE on training rows only."""
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

