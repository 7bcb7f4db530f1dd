"""The second stage: models on image prediction + image context + tabular features, fitted out of fold.

Every stage model is fitted by `fit_oof` on the same patient-grouped folds as the image models: the
predictions for fold k come from a model fitted on the other folds' rows only (whose image inputs are
themselves out-of-fold), so no row is ever predicted by a model that saw it. `calibrate_oof` turns the
chosen stage's out-of-fold scores into probabilities at the real malignant rate the same way (Platt scaling
fitted on the other folds), and `Stage.fit` on all rows + the calibrator on all out-of-fold scores give the
test predictions.

Inputs (columns, in this order): `image` = the image probability's logit and the image context
(context.FEATURES); `tabular` = tabular/features.py's encoding with its patient context, its preprocessor
fitted on the stage model's own training rows.
"""
import dataclasses

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from melanoma_jax.ensemble import context as context_lib
from melanoma_jax.evaluation import calibration
from melanoma_jax.tabular import features
from melanoma_jax.utils.errors import InputError

IMAGE_COLUMNS = ("image_logit",) + context_lib.FEATURES


def _hgb(seed):
  # Shallow, slow and leaf-regularised: a few hundred malignant rows (the real metadata has 584) overfit
  # deeper trees (docs/ensemble.md).
  return HistGradientBoostingClassifier(learning_rate=0.03, max_iter=300, max_depth=3, min_samples_leaf=200,
                                        l2_regularization=1.0, early_stopping=False, random_state=seed)


def _logistic(seed):
  # Unscaled: the inputs are already on unit scales (0/1 bits, scaled age, standardised contexts, logits),
  # so a scaler in front adds nothing (docs/ensemble.md).
  del seed  # Deterministic.
  return LogisticRegression(C=0.3, max_iter=3000)


# Candidate model families of every stage; the stage keeps the one with the best out-of-fold AUC.
CANDIDATES = {"hgb": _hgb, "logistic": _logistic}


@dataclasses.dataclass(frozen=True)
class Inputs:
  image: bool  # image logit + image context
  tabular: bool  # tabular features + tabular patient context


STAGES = {"tabular": Inputs(image=False, tabular=True), "image_context": Inputs(image=True, tabular=False),
          "fusion": Inputs(image=True, tabular=True)}


def image_block(probabilities, context):
  """[rows, IMAGE_COLUMNS] of image probabilities and their context frame (context.image_context)."""
  logits = calibration.logit(probabilities)
  return np.concatenate([logits[:, None], context[list(context_lib.FEATURES)].to_numpy(np.float64)], axis=1)


class Stage:
  """One stage model: its inputs, a candidate family, and (after `fit`) the fitted encoder + estimator."""

  def __init__(self, inputs, candidate, seed=0):
    if candidate not in CANDIDATES:
      raise InputError(f"fusion candidate {candidate!r} must be one of {', '.join(CANDIDATES)}")
    self.inputs, self.candidate, self.seed = inputs, candidate, seed
    self.preprocessor, self.estimator = None, None

  def _design(self, table, images):
    blocks = []
    if self.inputs.image:
      blocks.append(np.asarray(images, np.float64))
    if self.inputs.tabular:
      blocks.append(self.preprocessor.transform(table).astype(np.float64))
    return np.concatenate(blocks, axis=1)

  def fit(self, table, images, targets):
    """Fits on these rows only: the tabular encoder (if any) and the estimator."""
    if self.inputs.tabular:
      self.preprocessor = features.fit(table, patient_context=True)
    self.estimator = CANDIDATES[self.candidate](self.seed).fit(self._design(table, images), targets)
    return self

  def predict(self, table, images):
    """Probabilities [rows]; learns nothing from the rows."""
    return self.estimator.predict_proba(self._design(table, images))[:, 1]

  @property
  def width(self):
    """Number of design columns (the estimator's n_features_in_); needs the fitted encoder when tabular."""
    return (len(IMAGE_COLUMNS) if self.inputs.image else 0) + (
        len(self.preprocessor.columns) if self.inputs.tabular else 0)

  def to_dict(self):
    """All but the fitted estimator, as JSON values (ensemble/fitted.py saves the estimator apart)."""
    return {"inputs": dataclasses.asdict(self.inputs), "candidate": self.candidate, "seed": int(self.seed),
            "preprocessor": None if self.preprocessor is None else self.preprocessor.to_dict()}

  @classmethod
  def from_dict(cls, d, estimator):
    """The Stage of `to_dict`'s output with its fitted `estimator`; ValueError when a value is malformed."""
    inputs = d["inputs"]
    if set(inputs) != {"image", "tabular"} or not all(isinstance(v, bool) for v in inputs.values()):
      raise ValueError(f"stage inputs {inputs!r} must be the booleans image and tabular")
    if not isinstance(d["seed"], int) or isinstance(d["seed"], bool):
      raise ValueError(f"stage seed {d['seed']!r} must be an integer")
    stage = cls(Inputs(**inputs), d["candidate"], d["seed"])
    if stage.inputs.tabular != (d["preprocessor"] is not None):
      raise ValueError("a stage has a tabular encoder exactly when its inputs are tabular")
    if stage.inputs.tabular:
      stage.preprocessor = features.Preprocessor.from_dict(d["preprocessor"])
    stage.estimator = estimator
    return stage


def fit_oof(fit_predict, fold_ids):
  """Out-of-fold predictions: fold k's rows get fit_predict(training rows, fold k rows) (index arrays).

  The training rows of fold k are exactly the rows of the other folds: fold k's own rows never reach the
  model that predicts them.
  """
  fold_ids = np.asarray(fold_ids)
  oof = np.full(len(fold_ids), np.nan)
  for fold in np.unique(fold_ids):
    train, apply = np.flatnonzero(fold_ids != fold), np.flatnonzero(fold_ids == fold)
    oof[apply] = fit_predict(train, apply)
  return oof


def stage_oof(inputs, candidate, table, images, targets, fold_ids, seed=0):
  """Out-of-fold probabilities of a stage model (see fit_oof)."""
  def fit_predict(train, apply):
    stage = Stage(inputs, candidate, seed).fit(table.iloc[train], images[train], targets[train])
    return stage.predict(table.iloc[apply], images[apply])
  return fit_oof(fit_predict, fold_ids)


def calibrate_oof(scores, targets, fold_ids):
  """Out-of-fold calibrated probabilities: fold k's scores through a Platt calibrator fitted on the other folds."""
  return fit_oof(lambda train, apply: calibration.PlattCalibrator.fit(scores[train], targets[train])(scores[apply]),
                 fold_ids)
