"""Platt scaling (p = sigmoid(a * logit(score) + b), fitted by maximum likelihood) and the logit it works in.

The one calibrator of the project: the tabular folds calibrate their logits with `fit_platt`, the ensemble
calibrates its fusion scores with a `PlattCalibrator`. Monotonic, so it never changes an AUC.
"""
import dataclasses

import numpy as np

_CLIP = 1e-6  # Probabilities are clipped to [_CLIP, 1 - _CLIP] before the logit: finite for 0 and 1.


def logit(p):
  """float64 logit of probabilities `p` (clipped away from 0 and 1)."""
  p = np.clip(np.asarray(p, np.float64), _CLIP, 1 - _CLIP)
  return np.log(p / (1 - p))


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def fit_platt(logits, targets):
  """(a, b) of p = sigmoid(a * logit + b) fitted by maximum likelihood (an unregularised logistic fit)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  model = LogisticRegression(C=1e6, max_iter=1000).fit(np.asarray(logits, np.float64)[:, None], targets)
  return float(model.coef_[0, 0]), float(model.intercept_[0])


@dataclasses.dataclass(frozen=True)
class PlattCalibrator:
  """Probabilities -> calibrated probabilities: sigmoid(a * logit(score) + b)."""
  a: float
  b: float

  @classmethod
  def fit(cls, scores, targets):
    return cls(*fit_platt(logit(scores), targets))

  def __call__(self, scores):
    return sigmoid(self.a * logit(scores) + self.b)
