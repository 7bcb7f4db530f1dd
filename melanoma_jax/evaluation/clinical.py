"""The clinical report of a labelled run: WORKDIR/report.json and a self-contained WORKDIR/report.html.

One report covers one table of labelled images and any number of stages (a stage is a named column of
malignancy probabilities, e.g. "image", "tabular", "fused"). Per stage it holds:
  auc, auc_ci         ROC AUC and its 95% interval from a patient-level bootstrap: patients are drawn with
                      replacement and bring all their images (images of one patient are not independent);
                      resamples with one class are skipped; fixed seed, so a rerun gives the same interval.
  operating_points    "positive" at threshold t means probability >= t. Specificity at sensitivity S is the
                      best specificity among thresholds whose sensitivity is >= S (the highest such t);
                      sensitivity at specificity P is the best sensitivity among thresholds whose
                      specificity is >= P (the lowest such t). Each comes with its threshold.
  dermatologists      the model at the operating points of Haenssle et al. 2018 (DERMATOLOGISTS).
  pauc_80             the ISIC 2024 metric: the area under the ROC curve and above TPR = 0.8, i.e. the
                      integral of (1 - FPR) over TPR in [0.8, 1] (ties interpolated linearly); in [0, 0.2],
                      0.02 for a random ranking.
  calibration         Brier score and expected calibration error (10 equal-width bins [k/10, (k+1)/10), the
                      last closed; |mean probability - malignant share| weighted by the bin's share of
                      images) with the reliability bins, "before" and, when calibrated probabilities are
                      given, "after".
  subgroups           AUC by sex, anatomical site and age band with counts; AUC null in a one-class group.
The pure functions below take targets (0/1) and probabilities of the same images in the same order.
"""
import json
import os

import numpy as np
import pandas as pd

from melanoma_jax.evaluation import clinical_html
from melanoma_jax.evaluation import metrics
from melanoma_jax.utils import files

# Haenssle et al., Ann Oncol 2018;29:1836-1842: 58 dermatologists' mean on 100 dermoscopic images.
DERMATOLOGISTS = (
    {"name": "Dermatologists, dermoscopy alone", "sensitivity": 0.866, "specificity": 0.713},
    {"name": "Dermatologists, dermoscopy + clinical information", "sensitivity": 0.889, "specificity": 0.757},
)
TARGET_SENSITIVITIES = (0.80, 0.90, 0.95)
TARGET_SPECIFICITIES = (0.713,)
AGE_BANDS = ((0, 30, "<30"), (30, 45, "30-44"), (45, 60, "45-59"), (60, 75, "60-74"), (75, np.inf, ">=75"))
SUBGROUPS = (("sex", "sex"), ("anatomical site", "anatom_site_general_challenge"), ("age band", "age_approx"))
CONTEXT_COLUMNS = ("sex", "age_approx", "anatom_site_general_challenge")
MISSING = "missing"
_EPS = 1e-12  # Rates equal to a target up to rounding count as meeting it.


def _checked(targets, scores):
  """(bool targets, float64 scores) of equal length, finite scores; raises ValueError otherwise."""
  y = np.asarray(targets).astype(bool).ravel()
  s = np.asarray(scores, dtype=np.float64).ravel()
  if y.shape != s.shape:
    raise ValueError(f"{y.size} targets but {s.size} scores")
  if not np.isfinite(s).all():
    raise ValueError(f"{int((~np.isfinite(s)).sum())} non-finite score(s)")
  return y, s


def _both_classes(targets):
  y = np.asarray(targets).astype(bool)
  return bool(y.any() and not y.all())


def _roc_counts(targets, scores):
  """(false positives, true positives, thresholds, n_neg, n_pos) at +inf then every distinct score, high first."""
  y, s = _checked(targets, scores)
  if not _both_classes(y):
    raise ValueError(f"a ROC curve needs both classes; got {int(y.sum())} positive of {y.size}")
  order = np.argsort(-s, kind="stable")
  s, y = s[order], y[order]
  last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # Last index of each group of tied scores.
  tp = np.cumsum(y)[last]
  fp = last + 1 - tp
  return np.r_[0, fp], np.r_[0, tp], np.r_[np.inf, s[last]], int(y.size - y.sum()), int(y.sum())


def roc_points(targets, scores):
  """(fpr, tpr, thresholds): (0, 0) at t = +inf, then one point per distinct score (ties move together)."""
  fp, tp, thresholds, n_neg, n_pos = _roc_counts(targets, scores)
  return fp / n_neg, tp / n_pos, thresholds


def roc_corners(targets, scores):
  """roc_points without the points inside straight runs: the same curve, small enough to store and draw."""
  fp, tp, thresholds, n_neg, n_pos = _roc_counts(targets, scores)
  dx, dy = np.diff(fp), np.diff(tp)
  bends = dx[:-1] * dy[1:] != dy[:-1] * dx[1:]  # Exact integer test: no float collinearity noise.
  keep = np.r_[True, bends, True]
  return fp[keep] / n_neg, tp[keep] / n_pos, thresholds[keep]


def _point(target, threshold, sensitivity, specificity):
  return {"target": float(target), "threshold": float(threshold) if np.isfinite(threshold) else None,
          "sensitivity": float(sensitivity), "specificity": float(specificity)}


def operating_points(targets, scores, sensitivities=TARGET_SENSITIVITIES, specificities=TARGET_SPECIFICITIES):
  """{"specificity_at_sensitivity": [...], "sensitivity_at_specificity": [...]}, one point per target.

  Along the curve (threshold falling) sensitivity never falls and specificity never rises, so the best
  specificity with sensitivity >= S is at the first point reaching S, and the best sensitivity with
  specificity >= P at the last point keeping P. A threshold of None means +inf (nothing called positive).
  """
  fpr, tpr, thresholds = roc_points(targets, scores)
  spec = 1.0 - fpr
  at_sens = [np.flatnonzero(tpr >= s - _EPS)[0] for s in sensitivities]
  at_spec = [np.flatnonzero(spec >= p - _EPS)[-1] for p in specificities]
  return {"specificity_at_sensitivity": [_point(s, thresholds[i], tpr[i], spec[i])
                                         for s, i in zip(sensitivities, at_sens)],
          "sensitivity_at_specificity": [_point(p, thresholds[i], tpr[i], spec[i])
                                         for p, i in zip(specificities, at_spec)]}


def partial_auc(targets, scores, min_tpr=0.8):
  """Area under the ROC curve and above TPR = min_tpr (see the module docstring); in [0, 1 - min_tpr]."""
  fpr, tpr, _ = roc_points(targets, scores)
  dx, a, b = np.diff(fpr), tpr[:-1] - min_tpr, tpr[1:] - min_tpr  # b >= a: TPR never falls along the curve.
  above = np.where(a >= 0, dx * (a + b) / 2, 0.0)
  crossing = (a < 0) & (b > 0)  # Only the part of the segment past its crossing of min_tpr counts.
  above[crossing] = dx[crossing] * b[crossing] ** 2 / (2 * (b[crossing] - a[crossing]))
  return float(above.sum())


def _weighted_aucs(y, s, weights):
  """AUC per row of weights (resamples x images), ties counted half; NaN where a row has one class."""
  order = np.argsort(s, kind="stable")
  y, s, weights = y[order], s[order], weights[:, order]
  starts = np.r_[0, np.flatnonzero(np.diff(s)) + 1]  # First index of each group of tied scores.
  pos = np.add.reduceat(weights * y, starts, axis=1)
  neg = np.add.reduceat(weights * ~y, starts, axis=1)
  below = np.cumsum(neg, axis=1) - neg  # Negative weight strictly below each tie group.
  n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
  with np.errstate(invalid="ignore", divide="ignore"):
    auc = (pos * (below + neg / 2)).sum(axis=1) / (n_pos * n_neg)
  return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def bootstrap_auc_ci(targets, scores, patients, resamples=1000, seed=0, level=0.95, chunk_elements=2_000_000):
  """{"auc", "low", "high", "level", "resamples", "valid", "seed", "unit": "patient"}: a percentile interval.

  Each resample draws as many patients as there are, with replacement; an image's weight is the number
  of times its patient was drawn. `patients=None` treats every image as its own patient.
  """
  y, s = _checked(targets, scores)
  ids = np.arange(y.size) if patients is None else np.asarray(patients)
  _, patient_of = np.unique(ids, return_inverse=True)  # Sorted ids: the draws do not depend on row order.
  n_patients = int(patient_of.max()) + 1 if y.size else 0
  rng = np.random.default_rng(seed)
  draws = rng.integers(0, n_patients, size=(resamples, n_patients))
  rows = np.arange(resamples)[:, None] * n_patients  # Count each row's draws in one bincount.
  counts = np.bincount((rows + draws).ravel(), minlength=resamples * n_patients).reshape(resamples, n_patients)
  counts = counts.astype(np.float64)
  per_chunk = max(1, chunk_elements // max(y.size, 1))  # Bounds memory: resamples x images floats per chunk.
  aucs = np.concatenate([_weighted_aucs(y, s, counts[i:i + per_chunk][:, patient_of])
                         for i in range(0, resamples, per_chunk)])
  valid = aucs[np.isfinite(aucs)]
  tail = (1 - level) / 2 * 100
  low, high = np.percentile(valid, [tail, 100 - tail]) if valid.size else (np.nan, np.nan)
  return {"auc": metrics.roc_auc(y, s) if _both_classes(y) else None, "low": _num(low), "high": _num(high),
          "level": level, "resamples": int(resamples), "valid": int(valid.size), "seed": int(seed),
          "unit": "patient" if patients is not None else "image"}


def brier(targets, probs):
  y, p = _checked(targets, probs)
  return float(np.mean((p - y) ** 2))


def reliability_bins(targets, probs, bins=10):
  """Per equal-width bin: lower/upper edge, count, mean probability and malignant share (None when empty)."""
  y, p = _checked(targets, probs)
  index = np.clip(np.floor(p * bins).astype(int), 0, bins - 1)  # [k/bins, (k+1)/bins); 1.0 in the last.
  count = np.bincount(index, minlength=bins)
  sum_p, sum_y = np.bincount(index, p, bins), np.bincount(index, y.astype(float), bins)
  return [{"low": k / bins, "high": (k + 1) / bins, "count": int(count[k]),
           "mean_probability": float(sum_p[k] / count[k]) if count[k] else None,
           "malignant_share": float(sum_y[k] / count[k]) if count[k] else None} for k in range(bins)]


def expected_calibration_error(targets, probs, bins=10):
  """Sum over bins of (bin count / n) * |mean probability - malignant share|."""
  table = reliability_bins(targets, probs, bins)
  n = sum(b["count"] for b in table)
  gaps = [b["count"] / n * abs(b["mean_probability"] - b["malignant_share"]) for b in table if b["count"]]
  return float(sum(gaps))


def calibration(targets, probs, bins=10):
  return {"brier": brier(targets, probs), "ece": expected_calibration_error(targets, probs, bins),
          "bins": reliability_bins(targets, probs, bins)}


def age_band(age):
  """The AGE_BANDS label of an age in years, MISSING for NaN."""
  if age is None or not np.isfinite(age):
    return MISSING
  return next(label for low, high, label in AGE_BANDS if low <= age < high)


def subgroup_aucs(table, score_column, target_column="target"):
  """{subgroup name: [{"group", "n", "malignant", "auc"}, ...]} for the SUBGROUPS columns `table` has."""
  out = {}
  for name, column in SUBGROUPS:
    if column not in table.columns:
      continue
    if column == "age_approx":
      groups = pd.to_numeric(table[column], errors="coerce").map(age_band)
      order = [label for _, _, label in AGE_BANDS] + [MISSING]
    else:
      groups = table[column].astype(object).where(table[column].notna(), MISSING).astype(str)
      order = sorted(set(groups) - {MISSING}) + [MISSING]
    rows = []
    for group in order:
      part = table[(groups == group).to_numpy()]
      if part.empty:
        continue
      y = part[target_column].to_numpy()
      rows.append({"group": group, "n": int(len(part)), "malignant": int(y.sum()),
                   "auc": metrics.roc_auc(y, part[score_column]) if _both_classes(y) else None})
    out[name] = rows
  return out


def with_context(table, metadata_table):
  """`table` plus the CONTEXT_COLUMNS it lacks from `metadata_table`, matched by image_name (NaN if absent)."""
  columns = [c for c in CONTEXT_COLUMNS if c in metadata_table.columns and c not in table.columns]
  context = metadata_table.drop_duplicates("image_name").set_index("image_name")[columns]
  return table.join(context, on="image_name")


def _num(x):
  """A JSON number, or None for NaN/inf."""
  return float(x) if x is not None and np.isfinite(x) else None


def stage_report(table, column, calibrated_column=None, resamples=1000, seed=0):
  """Everything the module docstring lists, for one stage (probabilities in `table[column]`)."""
  y, p = _checked(table["target"], table[column])
  report = {"column": column, "images": int(y.size), "patients": int(table["patient_id"].nunique()),
            "malignant": int(y.sum()), "calibration": {"before": calibration(y, p)}}
  if calibrated_column is not None:
    report["calibrated_column"] = calibrated_column
    report["calibration"]["after"] = calibration(y, table[calibrated_column])
  report["subgroups"] = subgroup_aucs(table, column)
  if not _both_classes(y):  # No ranking metric means anything with one class.
    return {**report, "auc": None, "auc_ci": None, "pauc_80": None, "operating_points": None,
            "dermatologists": None, "roc": None}
  ci = bootstrap_auc_ci(y, p, table["patient_id"].to_numpy(), resamples, seed)
  fpr, tpr, thresholds = roc_corners(y, p)
  derm_points = operating_points(y, p, [d["sensitivity"] for d in DERMATOLOGISTS],
                                 [d["specificity"] for d in DERMATOLOGISTS])
  return {**report, "auc": ci.pop("auc"), "auc_ci": ci, "pauc_80": partial_auc(y, p, 0.8),
          "operating_points": operating_points(y, p),
          "dermatologists": [{**d, "model_specificity_at_their_sensitivity": a,
                              "model_sensitivity_at_their_specificity": b}
                             for d, a, b in zip(DERMATOLOGISTS, derm_points["specificity_at_sensitivity"],
                                                derm_points["sensitivity_at_specificity"])],
          "roc": {"fpr": np.round(fpr, 6).tolist(), "tpr": np.round(tpr, 6).tolist(),
                  "thresholds": [_num(t) for t in thresholds]}}


def summary(report):
  """{stage: {auc, auc_low, auc_high, pauc_80, brier, ece[, brier_after, ece_after]}}: for results.json."""
  out = {}
  for name, stage in report["stages"].items():
    ci, cal = stage["auc_ci"] or {}, stage["calibration"]
    out[name] = {"auc": stage["auc"], "auc_low": ci.get("low"), "auc_high": ci.get("high"),
                 "pauc_80": stage["pauc_80"], "brier": cal["before"]["brier"], "ece": cal["before"]["ece"]}
    if "after" in cal:
      out[name].update(brier_after=cal["after"]["brier"], ece_after=cal["after"]["ece"])
  return out


def write_report(workdir, table, stages, title, calibrated=None, seed=0, resamples=1000, choice=None):
  """Writes WORKDIR/report.json and report.html (atomically); returns the report dict.

  `table`: image_name, patient_id, target and optionally sex, age_approx, anatom_site_general_challenge;
  `stages`: stage name -> column of probabilities; `calibrated`: stage name -> column of calibrated ones;
  `choice`: how the stages were chosen among candidates, shown as it is ({"rule": str, "candidate_oof_auc":
  {candidate: AUC}, "stages": {stage: {"nested_oof_auc", "chosen", "chosen_oof_auc", "chosen_per_fold"}}}).
  """
  calibrated = dict(calibrated or {})
  needed = ["image_name", "patient_id", "target", *stages.values(), *calibrated.values()]
  missing = [c for c in needed if c not in table.columns]
  if missing or set(calibrated) - set(stages):
    raise ValueError(f"report table lacks column(s) {missing} (has {list(table.columns)}) "
                     f"or calibrates unknown stage(s) {sorted(set(calibrated) - set(stages))}")
  report = {"title": title, "images": int(len(table)), "patients": int(table["patient_id"].nunique()),
            "malignant": int(table["target"].sum()), "seed": int(seed),
            "dermatologists_reference": "Haenssle et al., Ann Oncol 2018;29:1836-1842",
            "stages": {name: stage_report(table, column, calibrated.get(name), resamples, seed)
                       for name, column in stages.items()}}
  if choice is not None:
    report["choice"] = choice
  os.makedirs(workdir, exist_ok=True)
  with files.atomic_path(os.path.join(workdir, "report.json")) as tmp, open(tmp, "w") as f:
    json.dump(report, f, indent=1, allow_nan=False)
  with files.atomic_path(os.path.join(workdir, "report.html")) as tmp, open(tmp, "w", encoding="utf-8") as f:
    f.write(clinical_html.render(report))
  return report
