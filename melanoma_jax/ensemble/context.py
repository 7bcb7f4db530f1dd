"""Patient context from images: how one image compares with the patient's other images (the ugly duckling).

`image_context(patient_ids, probabilities, embeddings)` returns one row per image of these features, each
computed among the images of the same patient in the rows given, from one fold model's outputs for all of
them (so a patient's images are compared in one model's terms). Targets never enter. Callers pass training
rows (one fold model's out-of-fold outputs: a patient's images all sit in one fold) or test rows (one fold
model's test outputs), never the two mixed, so test rows see only test rows.

  pred_rank       rank of the image's probability within the patient, scaled to [0, 1] (ties averaged)
  pred_z          z-score of the image's logit among the patient's logits
  dist_mean       the image's mean embedding distance to the patient's other images, divided by the
                  patient's spread (the median distance between two of the patient's images)
  dist_nearest    the distance to the nearest other image of the patient, divided by the same spread
  dist_z          z-score of the image's dist_mean among the patient's images
  log_images      log(1 + the patient's image count)

Distances are taken in the patients' "style" coordinates (`fit_style` -> `StyleProjection`): the
directions of the embedding along which a patient's images agree and patients differ (a linear discriminant
analysis with the patient as the class; patient ids only, never targets). Pooled backbone features mostly
vary with what changes from image to image (hair, light, the dermoscope's dark corners, the lesion's
position); a distance over all of them barely sees a mole that breaks its patient's style. Euclidean, divided
by sqrt(dimensions). The projection is a fitted linear map: `image_context` fits it on the rows given unless
it is handed one (the ensemble fits one per fold model on its outputs for all test rows and keeps it for the
test rows and for new images alike, so a new image's context never depends on which other patients are
scored with it).

Neutral values where a feature is undefined: a single-image patient gets pred_rank 0.5, pred_z 0, dist_mean
1, dist_nearest 1, dist_z 0 (an image exactly as typical as the patient's others); a z-score whose spread is 0
(identical values, or two images for dist_z) is 0; a patient whose images all coincide (spread 0) gets
distance ratios 1.
"""
import dataclasses

import numpy as np
import pandas as pd

from melanoma_jax.evaluation.calibration import logit
from melanoma_jax.utils.errors import InputError

FEATURES = ("pred_rank", "pred_z", "dist_mean", "dist_nearest", "dist_z", "log_images")
NEUTRAL = {"pred_rank": 0.5, "pred_z": 0.0, "dist_mean": 1.0, "dist_nearest": 1.0, "dist_z": 0.0}
# How many style directions and leading principal components the distances use (configurable per run:
# config.ensemble.style_components).
STYLE_COMPONENTS = 8
STYLE_PRINCIPAL = 128
_REGULARISER = 1e-3  # Added to the within-patient covariance, relative to its mean eigenvalue.
_EPS = 1e-9


def _zscores(values):
  std = values.std()
  return np.zeros_like(values) if std < _EPS else (values - values.mean()) / std


@dataclasses.dataclass(frozen=True)
class StyleProjection:
  """A fitted linear map from embeddings to style coordinates: ((x - mean) / scale) @ matrix."""
  mean: np.ndarray    # [F]
  scale: np.ndarray   # [F]
  matrix: np.ndarray  # [F, k]

  def __call__(self, embeddings):
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.ndim != 2 or embeddings.shape[1] != len(self.mean):
      raise InputError(f"style projection: embeddings of shape {embeddings.shape}, fitted on "
                       f"{len(self.mean)} features")
    return ((embeddings - self.mean) / self.scale) @ self.matrix


def fit_style(embeddings, patient_ids, components=STYLE_COMPONENTS, principal=STYLE_PRINCIPAL):
  """The StyleProjection to [rows, <= components] coordinates in which patients differ and a patient's
  images agree, fitted on these rows.

  The standardised embeddings are reduced to their `principal` leading principal components, whitened by
  the pooled within-patient covariance (lightly regularised) and projected on the `components` leading
  eigenvectors of the between-patient covariance: each unit of distance is then one within-patient
  standard deviation along a direction that tells patients apart. With fewer than two patients the
  projection only standardises.
  """
  embeddings = np.asarray(embeddings, np.float64)
  mean, std = embeddings.mean(axis=0), embeddings.std(axis=0)
  scale = np.where(std < _EPS, 1.0, std)  # A constant dimension becomes 0.
  x = (embeddings - mean) / scale
  groups = pd.Series(np.arange(len(x))).groupby(np.asarray(patient_ids).astype(str), sort=False).indices
  if len(groups) < 2 or min(x.shape) < 2:
    return StyleProjection(mean, scale, np.eye(x.shape[1]))
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  keep = int(min(principal, len(x) - 1, x.shape[1]))
  principal_axes = vt[:keep].T  # [F, keep]
  x = x @ principal_axes
  means = np.zeros_like(x)
  for rows in groups.values():
    means[rows] = x[rows].mean(axis=0)
  within, between = x - means, means - x.mean(axis=0)
  s_within, s_between = within.T @ within / len(x), between.T @ between / len(x)
  values, vectors = np.linalg.eigh(s_within + _REGULARISER * max(np.trace(s_within), _EPS) / keep * np.eye(keep))
  whiten = vectors / np.sqrt(values)
  _, directions = np.linalg.eigh(whiten.T @ s_between @ whiten)
  k = int(min(components, len(groups) - 1, keep))
  return StyleProjection(mean, scale, principal_axes @ whiten @ directions[:, ::-1][:, :k])


def _patient_features(logits, embeddings):
  """The FEATURES (but log_images) of one patient's images, [n, 5]."""
  n = len(logits)
  out = np.tile([NEUTRAL[f] for f in FEATURES[:-1]], (n, 1))
  if n < 2:
    return out
  ranks = pd.Series(logits).rank(method="average").to_numpy()
  out[:, 0] = (ranks - 1.0) / (n - 1.0)
  out[:, 1] = _zscores(logits)
  diff = embeddings[:, None, :] - embeddings[None, :, :]
  dist = np.sqrt((diff * diff).sum(-1) / max(embeddings.shape[1], 1))
  others = ~np.eye(n, dtype=bool)
  spread = np.median(dist[others])  # The patient's typical distance between two of their images.
  if spread < _EPS:
    return out  # All images coincide: nothing stands out.
  mean = dist.sum(1) / (n - 1.0)
  out[:, 2] = mean / spread
  out[:, 3] = np.where(others, dist, np.inf).min(1) / spread
  out[:, 4] = _zscores(mean)
  return out


def image_context(patient_ids, probabilities, embeddings, components=STYLE_COMPONENTS, projection=None):
  """DataFrame [rows, FEATURES] (index 0..rows-1) of the images given, in their order; see the module doc.

  `projection`: the StyleProjection to measure distances in; None fits one on these rows (`components`).
  """
  patient_ids = np.asarray(patient_ids).astype(str)
  probabilities = np.asarray(probabilities, np.float64).reshape(-1)
  embeddings = np.asarray(embeddings, np.float64)
  if not len(patient_ids) == len(probabilities) == len(embeddings):
    raise InputError(f"image context: {len(patient_ids)} patient ids, {len(probabilities)} probabilities and "
                     f"{len(embeddings)} embeddings")
  if embeddings.ndim != 2:
    raise InputError(f"image context: embeddings must be [rows, features], got shape {embeddings.shape}")
  if projection is None:
    projection = fit_style(embeddings, patient_ids, components)
  logits, style = logit(probabilities), projection(embeddings)
  out = np.zeros((len(patient_ids), len(FEATURES)))
  for rows in pd.Series(np.arange(len(patient_ids))).groupby(patient_ids, sort=False).indices.values():
    out[rows, :-1] = _patient_features(logits[rows], style[rows])
    out[rows, -1] = np.log1p(len(rows))
  return pd.DataFrame(out, columns=list(FEATURES))


def fold_averaged_context(patient_ids, per_fold, components=STYLE_COMPONENTS, projections=None):
  """The mean over fold models of their image_context (test rows, new images): per_fold = [(probabilities,
  embeddings)], projections = [each fold model's StyleProjection] (None: each fitted on these rows)."""
  projections = projections or [None] * len(per_fold)
  if len(projections) != len(per_fold):
    raise InputError(f"image context: {len(per_fold)} fold models' outputs, {len(projections)} style projections")
  frames = [image_context(patient_ids, p, e, components, projection)
            for (p, e), projection in zip(per_fold, projections)]
  return sum(frames) / len(frames)
