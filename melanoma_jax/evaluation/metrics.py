"""Exact ROC AUC over all examples (no binned approximation, unlike Keras' AUC metric)."""
import numpy as np
from scipy import stats


def roc_auc(targets, scores):
  """The Mann-Whitney form of ROC AUC, ties counted half; equals sklearn.metrics.roc_auc_score."""
  targets = np.asarray(targets).astype(bool).ravel()
  scores = np.asarray(scores, dtype=np.float64).ravel()
  if targets.shape != scores.shape:
    raise ValueError(f"{targets.shape[0]} targets but {scores.shape[0]} scores")
  n_pos = int(targets.sum())
  n_neg = targets.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"AUC needs both classes; got {n_neg} negative and {n_pos} positive examples")
  if not np.isfinite(scores).all():
    raise ValueError("AUC of non-finite scores")
  ranks = stats.rankdata(scores)
  return float((ranks[targets].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def auc_standard_error(auc, n_pos, n_neg):
  """Hanley and McNeil's (1982) standard error of an AUC from n_pos positive and n_neg negative examples."""
  q1, q2 = auc / (2.0 - auc), 2.0 * auc * auc / (1.0 + auc)
  variance = (auc * (1.0 - auc) + (n_pos - 1.0) * (q1 - auc * auc) + (n_neg - 1.0) * (q2 - auc * auc)) / (
      n_pos * n_neg)
  return float(np.sqrt(max(variance, 0.0)))
