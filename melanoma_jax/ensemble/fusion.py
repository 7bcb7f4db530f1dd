"""The second stage: candidate models on image prediction + image context + tabular features, fitted out of fold.

A candidate (`Candidate`) is one design and one model family: a set of image columns (`IMAGE_SETS`: the
image logit with its within-patient rank and z-score, plus the context distances of one geometry, of both, or
none), with or without the tabular features (tabular/features.py's encoding with its patient context, the
preprocessor fitted on the model's own training rows), and a family (`FAMILIES`). `candidates(...)` lists
them simplest first (fewer inputs, then logistic before boosting), the order choice.py's one-standard-error
rule prefers.

A stage is a set of candidates among which out-of-fold validation chooses (`STAGES`, by what they read):
`tabular` (metadata only), `image_context` (image + image context) and `fusion`, which may choose any candidate
at all, so that when the metadata carries nothing the fused stage keeps what the image context found instead
of diluting it.

Every candidate is fitted by `nested_oof` on the same patient-grouped folds as the image models: the outer
predictions for fold k come from a model fitted on the other folds' rows only (whose image inputs are
themselves out of fold), and the inner predictions that choose among candidates for fold k never see fold k
either. `calibrate_oof` turns the chosen scores into probabilities at the real malignant rate the same way
(Platt scaling fitted on the other folds); `Stage.fit` on all rows + the calibrator on all out-of-fold scores
give the test predictions.
"""
import dataclasses
import itertools
from typing import Tuple

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from melanoma_jax.data import folds as folds_lib
from melanoma_jax.ensemble import context as context_lib
from melanoma_jax.evaluation import calibration
from melanoma_jax.tabular import features
from melanoma_jax.utils.errors import InputError

IMAGE_COLUMNS = ("image_logit",) + context_lib.FEATURES
_BASE = ("image_logit", "pred_rank", "pred_z", "log_images")
_PRINCIPAL = tuple(c for c in context_lib.FEATURES if c.startswith("pc"))
# Image designs, simplest first: the prediction among the patient's, plus the distances of one geometry,
# plus everything (both geometries and the principal components' z-scores).
IMAGE_SETS = {
    "base": _BASE,
    "style": _BASE + tuple(f"style_{f}" for f in context_lib.DISTANCE_FEATURES),
    "embedding": _BASE + tuple(f"embedding_{f}" for f in context_lib.DISTANCE_FEATURES),
    "all": IMAGE_COLUMNS,
}


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


FAMILIES = {"logistic": _logistic, "hgb": _hgb}  # Simplest first.


@dataclasses.dataclass(frozen=True)
class Inputs:
  image: Tuple[str, ...]  # IMAGE_COLUMNS read, in that order (empty: none)
  tabular: bool  # tabular features + tabular patient context


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One design (`image_set`: a key of IMAGE_SETS or "" for none; `tabular`) and one model `family`."""
  image_set: str
  tabular: bool
  family: str

  @property
  def inputs(self):
    return Inputs(image=IMAGE_SETS[self.image_set] if self.image_set else (), tabular=self.tabular)

  @property
  def name(self):
    """e.g. 'tabular/logistic', 'style/hgb', 'all+tabular/hgb'."""
    design = "+".join(([self.image_set] if self.image_set else []) + (["tabular"] if self.tabular else []))
    return f"{design}/{self.family}"


def _reads(candidate, stage):
  image, tabular = bool(candidate.image_set), candidate.tabular
  return {"tabular": tabular and not image, "image_context": image and not tabular, "fusion": True}[stage]


STAGES = ("tabular", "image_context", "fusion")


def candidates(image_sets=tuple(IMAGE_SETS), families=tuple(FAMILIES)):
  """Every Candidate of these image sets and families, simplest first: tabular alone, then each image set
  (in IMAGE_SETS order) alone and with the tabular features; logistic before boosting within each design."""
  unknown = [s for s in image_sets if s not in IMAGE_SETS] + [f for f in families if f not in FAMILIES]
  if not image_sets or not families or unknown:
    raise InputError(f"feature sets {tuple(image_sets)} and families {tuple(families)}: at least one of each, "
                     f"sets among {', '.join(IMAGE_SETS)}, families among {', '.join(FAMILIES)}")
  designs = [("", True)] + [(s, t) for s in IMAGE_SETS if s in image_sets for t in (False, True)]
  return [Candidate(s, t, f) for s, t in designs for f in FAMILIES if f in families]


def stage_candidates(stage, all_candidates):
  """The candidates stage `stage` chooses among, in their (simplest first) order."""
  return [c for c in all_candidates if _reads(c, stage)]


def image_block(probabilities, context):
  """[rows, IMAGE_COLUMNS] of image probabilities and their context frame (context.image_context)."""
  logits = calibration.logit(probabilities)
  return np.concatenate([logits[:, None], context[list(context_lib.FEATURES)].to_numpy(np.float64)], axis=1)


_COLUMN = {c: i for i, c in enumerate(IMAGE_COLUMNS)}


class Stage:
  """One fitted model of the second stage: its inputs, its family, and (after `fit`) the fitted encoder +
  estimator. `images` arguments are full image blocks [rows, IMAGE_COLUMNS]; the stage reads its columns."""

  def __init__(self, inputs, family, seed=0):
    if family not in FAMILIES:
      raise InputError(f"fusion family {family!r} must be one of {', '.join(FAMILIES)}")
    unknown = [c for c in inputs.image if c not in _COLUMN]
    if unknown or not (inputs.image or inputs.tabular):
      raise InputError(f"fusion inputs {inputs}: image columns among {', '.join(IMAGE_COLUMNS)}, and some input")
    self.inputs, self.family, self.seed = inputs, family, seed
    self.preprocessor, self.estimator = None, None

  def _design(self, table, images):
    blocks = []
    if self.inputs.image:
      blocks.append(np.asarray(images, np.float64)[:, [_COLUMN[c] for c in self.inputs.image]])
    if self.inputs.tabular:
      blocks.append(self.preprocessor.transform(table).astype(np.float64))
    return np.concatenate(blocks, axis=1)

  def fit(self, table, images, targets):
    """Fits on these rows only: the tabular encoder (if any) and the estimator."""
    if self.inputs.tabular:
      self.preprocessor = features.fit(table, patient_context=True)
    self.estimator = FAMILIES[self.family](self.seed).fit(self._design(table, images), targets)
    return self

  def predict(self, table, images):
    """Probabilities [rows]; learns nothing from the rows."""
    return self.estimator.predict_proba(self._design(table, images))[:, 1]

  @property
  def width(self):
    """Number of design columns (the estimator's n_features_in_); needs the fitted encoder when tabular."""
    return len(self.inputs.image) + (len(self.preprocessor.columns) if self.inputs.tabular else 0)

  def to_dict(self):
    """All but the fitted estimator, as JSON values (ensemble/fitted.py saves the estimator apart)."""
    return {"inputs": {"image": list(self.inputs.image), "tabular": self.inputs.tabular}, "family": self.family,
            "seed": int(self.seed),
            "preprocessor": None if self.preprocessor is None else self.preprocessor.to_dict()}

  @classmethod
  def from_dict(cls, d, estimator):
    """The Stage of `to_dict`'s output with its fitted `estimator`; ValueError when a value is malformed."""
    inputs = d["inputs"]
    if (set(inputs) != {"image", "tabular"} or not isinstance(inputs["tabular"], bool)
        or not isinstance(inputs["image"], list) or not all(isinstance(c, str) for c in inputs["image"])):
      raise ValueError(f"stage inputs {inputs!r} must be a list of image columns and a tabular boolean")
    if not isinstance(d["seed"], int) or isinstance(d["seed"], bool):
      raise ValueError(f"stage seed {d['seed']!r} must be an integer")
    try:
      stage = cls(Inputs(tuple(inputs["image"]), inputs["tabular"]), d["family"], d["seed"])
    except InputError as e:
      raise ValueError(str(e)) from None
    if stage.inputs.tabular != (d["preprocessor"] is not None):
      raise ValueError("a stage has a tabular encoder exactly when its inputs are tabular")
    if stage.inputs.tabular:
      stage.preprocessor = features.Preprocessor.from_dict(d["preprocessor"])
    stage.estimator = estimator
    return stage


def fit_oof(fit_predict, fold_ids):
  """Out-of-fold predictions: fold k's rows get fit_predict(training rows, fold k rows) (index arrays)."""
  fold_ids = np.asarray(fold_ids)
  oof = np.full(len(fold_ids), np.nan)
  for fold in np.unique(fold_ids):
    train, apply = np.flatnonzero(fold_ids != fold), np.flatnonzero(fold_ids == fold)
    oof[apply] = fit_predict(train, apply)
  return oof


def _inner_split(train_fold_ids, table, seed):
  """Inner fold ids of an outer fold's training rows: their own outer folds, or (one outer fold only, two
  folds in all) a patient-grouped split of it in two."""
  if len(np.unique(train_fold_ids)) >= 2:
    return np.asarray(train_fold_ids)
  return folds_lib.assign_folds(table.reset_index(drop=True), 2, seed)


def nested_oof(fit_predict, fold_ids, table, seed=0):
  """(outer, inner) out-of-fold predictions of one candidate.

  outer [rows]: fold k's rows predicted by fit_predict(rows of the other folds, rows of fold k).
  inner {k: [rows]}: for each outer fold k, every row of the other folds predicted by a model that saw
  neither fold k nor the row's own (inner) fold; fold k's rows are NaN. Those choose among candidates for
  fold k. With three folds or more the inner folds are the outer ones, so a model fitted without folds {j, k}
  serves both k's inner prediction of j and j's of k (K(K-1)/2 fits, not K(K-1)).
  """
  fold_ids = np.asarray(fold_ids)
  folds = np.unique(fold_ids)
  outer = fit_oof(fit_predict, fold_ids)
  inner = {int(k): np.full(len(fold_ids), np.nan) for k in folds}
  if len(folds) >= 3:
    for j, k in itertools.combinations(folds, 2):
      train = np.flatnonzero((fold_ids != j) & (fold_ids != k))
      both = np.flatnonzero((fold_ids == j) | (fold_ids == k))
      predicted = fit_predict(train, both)
      in_j = fold_ids[both] == j
      inner[int(k)][both[in_j]], inner[int(j)][both[~in_j]] = predicted[in_j], predicted[~in_j]
    return outer, inner
  for k in folds:
    train = np.flatnonzero(fold_ids != k)
    sub = _inner_split(fold_ids[train], table.iloc[train], seed)
    for j in np.unique(sub):
      inner[int(k)][train[sub == j]] = fit_predict(train[sub != j], train[sub == j])
  return outer, inner


def candidate_oof(candidate, table, images, targets, fold_ids, seed=0):
  """nested_oof of a Candidate's Stage."""
  def fit_predict(train, apply):
    stage = Stage(candidate.inputs, candidate.family, seed).fit(table.iloc[train], images[train], targets[train])
    return stage.predict(table.iloc[apply], images[apply])
  return nested_oof(fit_predict, fold_ids, table, seed)


def calibrate_oof(scores, targets, fold_ids):
  """Out-of-fold calibrated probabilities: fold k's scores through a Platt calibrator fitted on the other folds."""
  return fit_oof(lambda train, apply: calibration.PlattCalibrator.fit(scores[train], targets[train])(scores[apply]),
                 fold_ids)
