"""Patient context from images: how one image compares with the patient's other images (the ugly duckling).

`image_context(patient_ids, probabilities, embeddings)` returns one row per image of these features, each
computed among the images of the same patient in the rows given, from one fold model's outputs for all of
them (so a patient's images are compared in one model's terms). Targets never enter. Callers pass training
rows (one fold model's out-of-fold outputs: a patient's images all sit in one fold) or test rows (one fold
model's test outputs), never the two mixed, so test rows see only test rows.

  pred_rank           rank of the image's probability within the patient, scaled to [0, 1] (ties averaged)
  pred_z              z-score of the image's logit among the patient's logits
  log_images          log(1 + the patient's image count)
and, in each geometry G of GEOMETRIES (below):
  G_dist_mean         the image's mean distance to the patient's other images, divided by the patient's
                      spread (the median distance between two of the patient's images)
  G_dist_nearest      the distance to the nearest other image of the patient, divided by the same spread
  G_dist_z            z-score of the image's G_dist_mean among the patient's images
  G_lof               log of the image's local outlier factor among the patient's images (scikit-learn's
                      LocalOutlierFactor on the same distances), for patients with LOF_MIN_IMAGES or more
and, for the PRINCIPAL leading principal components of the standardised embeddings:
  pc<i>_absz          |z-score| of the image's coordinate i among the patient's (a principal axis has no
                      sign, so only the size of the deviation is comparable between fold models)

Geometries: nobody knows in advance which directions of a backbone's embedding carry a patient's "style", so
the distances are taken in two and the second stage chooses out of fold (fusion.py, choice.py):
  embedding  every dimension of the embedding, standardised (mean 0, variance 1 over the rows fitted on);
  style      the directions along which a patient's images agree and patients differ: a linear discriminant
             analysis with the patient as the class (patient ids only, never targets) over the leading
             principal components. It ignores what varies from image to image (hair, light, the lesion's
             position) but, fitted on a few hundred rows, it can also discard the one direction a duckling
             breaks; the embedding geometry keeps every direction at the price of their noise.
Distances are Euclidean divided by sqrt(dimensions). The coordinates are a fitted linear map (`fit_space` ->
`ContextSpace`): `image_context` fits one on the rows given unless it is handed one (the ensemble fits one per
fold model on its outputs for all test rows and keeps it for the test rows and for new images alike, so a new
image's context never depends on which other patients are scored with it).

Neutral values where a feature is undefined: a single-image patient gets pred_rank 0.5, pred_z 0, distance
ratios 1, z-scores 0 and lof 0 (an image exactly as typical as the patient's others); a z-score whose spread is
0 (identical values, or two images for G_dist_z) is 0; a patient whose images all coincide in a geometry
(spread 0) gets that geometry's neutral values.
"""
import dataclasses

import numpy as np
import pandas as pd
from sklearn.neighbors import LocalOutlierFactor

from melanoma_jax.evaluation.calibration import logit
from melanoma_jax.utils.errors import InputError

GEOMETRIES = ("embedding", "style")
DISTANCE_FEATURES = ("dist_mean", "dist_nearest", "dist_z", "lof")
PRINCIPAL = 4  # Leading principal components whose per-patient z-scores are features.
FEATURES = (("pred_rank", "pred_z", "log_images")
            + tuple(f"{g}_{f}" for g in GEOMETRIES for f in DISTANCE_FEATURES)
            + tuple(f"pc{i + 1}_absz" for i in range(PRINCIPAL)))
_NEUTRAL_DISTANCES = {"dist_mean": 1.0, "dist_nearest": 1.0, "dist_z": 0.0, "lof": 0.0}
NEUTRAL = {"pred_rank": 0.5, "pred_z": 0.0, **{f"{g}_{f}": v for g in GEOMETRIES
                                               for f, v in _NEUTRAL_DISTANCES.items()},
           **{f"pc{i + 1}_absz": 0.0 for i in range(PRINCIPAL)}}
# How many style directions and leading principal components the style geometry uses (configurable per run:
# config.ensemble.style_components).
STYLE_COMPONENTS = 8
STYLE_PRINCIPAL = 128
LOF_MIN_IMAGES = 5  # Below, every image's neighbours are all the others: no outlier to tell apart.
LOF_NEIGHBOURS = 5  # At most; and at most n - 2 of a patient's n images, for the same reason.
_LOF_LOG_RANGE = (-1.0, 2.0)  # Two near-duplicates give a factor near 0 or far above 1: bounded for the stage.
_REGULARISER = 1e-3  # Added to the within-patient covariance, relative to its mean eigenvalue.
_EPS = 1e-9


def _zscores(values):
  std = values.std()
  return np.zeros_like(values) if std < _EPS else (values - values.mean()) / std


@dataclasses.dataclass(frozen=True)
class ContextSpace:
  """A fitted linear map from embeddings to the context's coordinates: x = (embeddings - mean) / scale is
  the embedding geometry, x @ style the style geometry and x @ principal the leading principal components."""
  mean: np.ndarray       # [F]
  scale: np.ndarray      # [F]
  style: np.ndarray      # [F, k]
  principal: np.ndarray  # [F, p]

  def coordinates(self, embeddings):
    """({geometry: [rows, d]}, principal coordinates [rows, p]) of `embeddings` [rows, F]."""
    embeddings = np.asarray(embeddings, np.float64)
    if embeddings.ndim != 2 or embeddings.shape[1] != len(self.mean):
      raise InputError(f"image context: embeddings of shape {embeddings.shape}, fitted on "
                       f"{len(self.mean)} features")
    x = (embeddings - self.mean) / self.scale
    return {"embedding": x, "style": x @ self.style}, x @ self.principal


def fit_space(embeddings, patient_ids, components=STYLE_COMPONENTS, principal=STYLE_PRINCIPAL):
  """The ContextSpace of these rows (patient ids only, never targets).

  Standardisation: each dimension's mean and standard deviation (a constant dimension becomes 0). Style: the
  standardised embeddings reduced to their `principal` leading principal components, whitened by the pooled
  within-patient covariance (lightly regularised) and projected on the `components` leading eigenvectors of
  the between-patient covariance, so each unit of distance is one within-patient standard deviation along a
  direction that tells patients apart; with fewer than two patients it is the identity. Principal: the
  PRINCIPAL leading principal axes (fewer when the rows allow fewer).
  """
  embeddings = np.asarray(embeddings, np.float64)
  mean, std = embeddings.mean(axis=0), embeddings.std(axis=0)
  scale = np.where(std < _EPS, 1.0, std)
  x = (embeddings - mean) / scale
  groups = pd.Series(np.arange(len(x))).groupby(np.asarray(patient_ids).astype(str), sort=False).indices
  if min(x.shape) < 2:
    return ContextSpace(mean, scale, np.eye(x.shape[1]), np.zeros((x.shape[1], 0)))
  _, _, vt = np.linalg.svd(x, full_matrices=False)
  keep = int(min(principal, len(x) - 1, x.shape[1]))
  principal_axes = vt[:keep].T  # [F, keep]
  leading = principal_axes[:, :PRINCIPAL]
  if len(groups) < 2:
    return ContextSpace(mean, scale, np.eye(x.shape[1]), leading)
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
  return ContextSpace(mean, scale, principal_axes @ whiten @ directions[:, ::-1][:, :k], leading)


def _lof(dist):
  """log local outlier factor of each of n images from their [n, n] distances (n >= LOF_MIN_IMAGES)."""
  n = len(dist)
  lof = LocalOutlierFactor(n_neighbors=min(LOF_NEIGHBOURS, n - 2), metric="precomputed").fit(dist)
  return np.clip(np.log(np.maximum(-lof.negative_outlier_factor_, _EPS)), *_LOF_LOG_RANGE)


def _distance_features(coordinates):
  """[n, len(DISTANCE_FEATURES)] of one patient's n >= 2 images in one geometry."""
  n = len(coordinates)
  out = np.tile([_NEUTRAL_DISTANCES[f] for f in DISTANCE_FEATURES], (n, 1))
  diff = coordinates[:, None, :] - coordinates[None, :, :]
  dist = np.sqrt((diff * diff).sum(-1) / max(coordinates.shape[1], 1))
  others = ~np.eye(n, dtype=bool)
  spread = np.median(dist[others])  # The patient's typical distance between two of their images.
  if spread < _EPS:
    return out  # All images coincide: nothing stands out.
  mean = dist.sum(1) / (n - 1.0)
  out[:, 0] = mean / spread
  out[:, 1] = np.where(others, dist, np.inf).min(1) / spread
  out[:, 2] = _zscores(mean)
  if n >= LOF_MIN_IMAGES:
    out[:, 3] = _lof(dist / spread)
  return out


def _patient_features(logits, geometries, principal):
  """The FEATURES of one patient's images, [n, len(FEATURES)]."""
  n = len(logits)
  out = np.tile([NEUTRAL.get(f, 0.0) for f in FEATURES], (n, 1))
  out[:, 2] = np.log1p(n)
  if n < 2:
    return out
  ranks = pd.Series(logits).rank(method="average").to_numpy()
  out[:, 0] = (ranks - 1.0) / (n - 1.0)
  out[:, 1] = _zscores(logits)
  column = 3
  for g in GEOMETRIES:
    out[:, column:column + len(DISTANCE_FEATURES)] = _distance_features(geometries[g])
    column += len(DISTANCE_FEATURES)
  for i in range(principal.shape[1]):
    out[:, column + i] = np.abs(_zscores(principal[:, i]))
  return out


def image_context(patient_ids, probabilities, embeddings, components=STYLE_COMPONENTS, space=None):
  """DataFrame [rows, FEATURES] (index 0..rows-1) of the images given, in their order; see the module doc.

  `space`: the ContextSpace to measure in; None fits one on these rows (`components` style directions).
  """
  patient_ids = np.asarray(patient_ids).astype(str)
  probabilities = np.asarray(probabilities, np.float64).reshape(-1)
  embeddings = np.asarray(embeddings, np.float64)
  if not len(patient_ids) == len(probabilities) == len(embeddings):
    raise InputError(f"image context: {len(patient_ids)} patient ids, {len(probabilities)} probabilities and "
                     f"{len(embeddings)} embeddings")
  if embeddings.ndim != 2:
    raise InputError(f"image context: embeddings must be [rows, features], got shape {embeddings.shape}")
  if space is None:
    space = fit_space(embeddings, patient_ids, components)
  logits = logit(probabilities)
  geometries, principal = space.coordinates(embeddings)
  out = np.zeros((len(patient_ids), len(FEATURES)))
  for rows in pd.Series(np.arange(len(patient_ids))).groupby(patient_ids, sort=False).indices.values():
    out[rows] = _patient_features(logits[rows], {g: c[rows] for g, c in geometries.items()}, principal[rows])
  return pd.DataFrame(out, columns=list(FEATURES))


def fold_averaged_context(patient_ids, per_fold, components=STYLE_COMPONENTS, spaces=None):
  """The mean over fold models of their image_context (test rows, new images): per_fold = [(probabilities,
  embeddings)], spaces = [each fold model's ContextSpace] (None: each fitted on these rows)."""
  spaces = spaces or [None] * len(per_fold)
  if len(spaces) != len(per_fold):
    raise InputError(f"image context: {len(per_fold)} fold models' outputs, {len(spaces)} context spaces")
  frames = [image_context(patient_ids, p, e, components, space) for (p, e), space in zip(per_fold, spaces)]
  return sum(frames) / len(frames)
