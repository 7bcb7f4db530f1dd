"""Clinical report: each metric against a value worked out by hand, the bootstrap's unit is the patient,
and report.html stands alone."""
import json
import re
import xml.etree.ElementTree as ET

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as sk_metrics

from melanoma_jax.evaluation import clinical

# Ten images, 4 malignant, ranked high to low. With "positive iff score >= t" the ROC walks:
#   t      tp fp  sensitivity specificity
#   +inf   0  0   0           6/6
#   0.9    1  0   0.25        6/6
#   0.8    2  0   0.50        6/6
#   0.7    2  1   0.50        5/6
#   0.6    3  1   0.75        5/6
#   0.5    3  2   0.75        4/6
#   0.4    4  2   1.00        4/6
#   0.3 .. 0.05: 4, 3..6, 1.00, 3/6 .. 0/6
SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
TARGETS = np.array([1, 1, 0, 1, 0, 1, 0, 0, 0, 0])


def _points(points):
  """(target, threshold, sensitivity, specificity) rows as an array, for pytest.approx."""
  return np.array([(p["target"], p["threshold"], p["sensitivity"], p["specificity"]) for p in points])


def test_operating_points_by_hand():
  ops = clinical.operating_points(TARGETS, SCORES, sensitivities=(0.5, 0.75, 0.8, 0.95),
                                  specificities=(0.713, 0.9, 1.0, 0.5))
  # Sensitivity >= 0.5 first at t=0.8 (spec 1); >= 0.75 first at t=0.6 (spec 5/6); >= 0.8 and >= 0.95 only
  # from t=0.4 on, where the best specificity is 4/6.
  assert _points(ops["specificity_at_sensitivity"]) == pytest.approx(np.array([
      (0.5, 0.8, 0.5, 1.0), (0.75, 0.6, 0.75, 5 / 6), (0.8, 0.4, 1.0, 4 / 6), (0.95, 0.4, 1.0, 4 / 6)]))
  # Specificity >= 0.713 (5/6 = 0.833 qualifies, 4/6 = 0.667 does not): lowest such t is 0.6, sensitivity
  # 0.75. >= 0.9 and >= 1.0: lowest t with specificity 1 is 0.8, sensitivity 0.5. >= 0.5: t=0.3, sens 1.
  assert _points(ops["sensitivity_at_specificity"]) == pytest.approx(np.array([
      (0.713, 0.6, 0.75, 5 / 6), (0.9, 0.8, 0.5, 1.0), (1.0, 0.8, 0.5, 1.0), (0.5, 0.3, 1.0, 0.5)]))


def test_operating_points_default_targets_and_ties():
  # Tied scores move together: 0.5 holds one malignant and one benign image, so no threshold splits them.
  ops = clinical.operating_points([1, 1, 0, 0], [0.9, 0.5, 0.5, 0.1])
  assert [p["target"] for p in ops["specificity_at_sensitivity"]] == [0.8, 0.9, 0.95]
  assert all(p["threshold"] == 0.5 and p["specificity"] == 0.5 for p in ops["specificity_at_sensitivity"])
  assert _points(ops["sensitivity_at_specificity"]) == pytest.approx(np.array([(0.713, 0.9, 0.5, 1.0)]))


def test_roc_corners_keep_the_curve():
  rng = np.random.default_rng(0)
  y = rng.random(500) < 0.2
  s = np.round(rng.random(500) + y * 0.5, 2)  # Many ties.
  fpr, tpr, _ = clinical.roc_corners(y, s)
  full_fpr, full_tpr, _ = clinical.roc_points(y, s)
  assert len(fpr) < len(full_fpr)
  assert np.trapezoid(tpr, fpr) == pytest.approx(sk_metrics.roc_auc_score(y, s))
  assert np.trapezoid(full_tpr, full_fpr) == pytest.approx(sk_metrics.roc_auc_score(y, s))


def _isic_2024_pauc(y, s, min_tpr=0.8):
  """The ISIC 2024 Kaggle scorer: sklearn's McClish-standardised pAUC of the flipped problem, unscaled."""
  max_fpr = 1 - min_tpr
  scaled = sk_metrics.roc_auc_score(1 - np.asarray(y), -np.asarray(s), max_fpr=max_fpr)
  return 0.5 * max_fpr ** 2 + (max_fpr - 0.5 * max_fpr ** 2) / 0.5 * (scaled - 0.5)


def test_partial_auc_by_hand():
  # TARGETS/SCORES: sensitivity reaches 1 at fpr 2/6 and stays 1; below that it is <= 0.75 < 0.8.
  # Area above TPR 0.8 = 0.2 * (1 - 2/6) = 2/15.
  assert clinical.partial_auc(TARGETS, SCORES) == pytest.approx(2 / 15)
  # A tie group crossing 0.8: three malignant on top -> (0, 0.6); a tie of two malignant and one benign
  # -> (0.5, 1.0), crossing TPR 0.8 at fpr 0.25; then (1, 1). Area: triangle 0.5 * 0.25 * 0.2 = 0.025
  # plus the rectangle 0.5 * 0.2 = 0.1.
  y, s = [1, 1, 1, 1, 1, 0, 0], [0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.1]
  assert clinical.partial_auc(y, s) == pytest.approx(0.125)
  assert clinical.partial_auc(y, s) == pytest.approx(_isic_2024_pauc(y, s))
  assert clinical.partial_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.2)  # Perfect.
  assert clinical.partial_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.0)  # Reversed.
  rng = np.random.default_rng(1)
  y, s = rng.random(2000) < 0.1, rng.random(2000)
  assert clinical.partial_auc(y, s) == pytest.approx(0.02, abs=0.01)  # Random: integral of (1 - TPR).
  s = np.round(s + 0.3 * y, 2)
  assert clinical.partial_auc(y, s) == pytest.approx(_isic_2024_pauc(y, s))


def test_brier_and_ece_by_hand():
  y, p = [0, 0, 1, 1], [0.05, 0.15, 0.15, 0.95]
  # Brier: (0.05^2 + 0.15^2 + 0.85^2 + 0.05^2) / 4 = (0.0025 + 0.0225 + 0.7225 + 0.0025) / 4 = 0.1875.
  assert clinical.brier(y, p) == pytest.approx(0.1875)
  # Bins: [0, .1) {0.05: share 0} -> |0.05 - 0| * 1/4; [.1, .2) {0.15, 0.15: share 0.5} -> 0.35 * 2/4;
  # [.9, 1] {0.95: share 1} -> 0.05 * 1/4. ECE = 0.0125 + 0.175 + 0.0125 = 0.2.
  assert clinical.expected_calibration_error(y, p) == pytest.approx(0.2)
  bins = clinical.reliability_bins(y, p)
  assert [b["count"] for b in bins] == [1, 2, 0, 0, 0, 0, 0, 0, 0, 1]
  assert bins[1]["mean_probability"] == pytest.approx(0.15) and bins[1]["malignant_share"] == 0.5
  assert bins[2]["mean_probability"] is None
  # Bin edges: k/10 opens bin k, and 1.0 falls in the last bin.
  edges = clinical.reliability_bins([0] * 11, np.arange(11) / 10)
  assert [b["count"] for b in edges] == [1] * 9 + [2]
  assert clinical.expected_calibration_error([0, 1, 1, 0], [0.25, 0.25, 0.75, 0.75]) == pytest.approx(0.25)


def test_weighted_auc_matches_sklearn_sample_weights():
  rng = np.random.default_rng(2)
  y = rng.random(300) < 0.3
  s = np.round(rng.random(300) + 0.3 * y, 1)  # Ties across classes.
  w = rng.integers(0, 4, size=(3, 300)).astype(float)
  got = clinical._weighted_aucs(y, s, w)  # pylint: disable=protected-access
  assert got == pytest.approx([sk_metrics.roc_auc_score(y, s, sample_weight=row) for row in w])


def _patients(n_patients, images_per_patient, seed, separation=1.0):
  """A table where a patient's images share the patient's malignancy and a patient-level score offset."""
  rng = np.random.default_rng(seed)
  malignant = rng.random(n_patients) < 0.3
  offset = rng.normal(size=n_patients)
  patient = np.repeat(np.arange(n_patients), images_per_patient)
  score = offset[patient] + separation * malignant[patient] + 0.3 * rng.normal(size=patient.size)
  return malignant[patient].astype(int), score, np.char.add("P", patient.astype(str))


def _width(ci):
  return ci["high"] - ci["low"]


def test_bootstrap_is_deterministic_and_contains_the_point_auc():
  y, s, patients = _patients(80, 3, seed=3)
  first = clinical.bootstrap_auc_ci(y, s, patients, resamples=300, seed=7)
  assert first == clinical.bootstrap_auc_ci(y, s, patients, resamples=300, seed=7)
  assert first != clinical.bootstrap_auc_ci(y, s, patients, resamples=300, seed=8)
  assert first["auc"] == pytest.approx(sk_metrics.roc_auc_score(y, s))
  assert first["low"] < first["auc"] < first["high"]
  assert first["valid"] == 300 and first["unit"] == "patient"
  # Row order does not change the draws: they are made over the sorted patient ids.
  order = np.random.default_rng(0).permutation(len(y))
  assert clinical.bootstrap_auc_ci(y[order], s[order], patients[order], resamples=300, seed=7) == pytest.approx(first)


def test_bootstrap_narrows_with_more_patients():
  few = clinical.bootstrap_auc_ci(*_patients(60, 2, seed=4), resamples=400)
  many = clinical.bootstrap_auc_ci(*_patients(600, 2, seed=4), resamples=400)
  assert _width(many) < 0.6 * _width(few)  # ~ 1 / sqrt(10) expected.


def test_bootstrap_resamples_patients_not_images():
  y, s, patients = _patients(100, 2, seed=5)
  twice = np.r_[np.arange(len(y)), np.arange(len(y))]  # Every image twice, in the same patient.
  by_patient = clinical.bootstrap_auc_ci(y, s, patients, resamples=400)
  by_patient_twice = clinical.bootstrap_auc_ci(y[twice], s[twice], patients[twice], resamples=400)
  # More images of the same patients carry no new information: the same patients are drawn and every
  # resample's AUC is unchanged, so the interval is the same.
  assert (by_patient_twice["low"], by_patient_twice["high"]) == pytest.approx((by_patient["low"], by_patient["high"]))
  # An image-level bootstrap takes the copies as independent and shrinks by about 1 / sqrt(2).
  by_image = clinical.bootstrap_auc_ci(y, s, None, resamples=400)
  by_image_twice = clinical.bootstrap_auc_ci(y[twice], s[twice], None, resamples=400)
  assert by_image["unit"] == "image"
  assert _width(by_image_twice) < 0.85 * _width(by_image)
  assert _width(by_patient_twice) > 1.2 * _width(by_image_twice)


def test_bootstrap_skips_resamples_with_one_class():
  # One malignant patient of five: about (4/5)^5 = 33% of the resamples have no malignant image.
  y, s, patients = [1, 1, 0, 0, 0, 0], [0.9, 0.8, 0.7, 0.1, 0.85, 0.2], ["a", "a", "b", "c", "d", "e"]
  ci = clinical.bootstrap_auc_ci(y, s, patients, resamples=500, seed=0)
  assert 250 < ci["valid"] < 420
  assert 0 <= ci["low"] <= ci["high"] <= 1


@pytest.fixture
def table():
  return pd.DataFrame({
      "image_name": [f"I{i}" for i in range(8)],
      "patient_id": ["a", "a", "b", "c", "c", "d", "e", "f"],
      "target": [1, 0, 0, 1, 0, 0, 1, 0],
      "sex": ["male", "male", "female", "female", "female", np.nan, "male", "female"],
      "age_approx": [25.0, 25.0, 30.0, 60.0, 60.0, np.nan, 80.0, 44.0],
      "anatom_site_general_challenge": ["torso", "torso", "head/neck", "torso", np.nan, "torso", "torso", "torso"],
      "p": [0.8, 0.3, 0.2, 0.7, 0.4, 0.1, 0.6, 0.5],
      "p_cal": [0.6, 0.2, 0.1, 0.5, 0.3, 0.05, 0.4, 0.3]})


def test_subgroup_counts_and_one_class_groups(table):
  groups = clinical.subgroup_aucs(table, "p")

  def rows(name):
    return [(r["group"], r["n"], r["malignant"], r["auc"]) for r in groups[name]]

  # male: I0 (1, .8), I1 (0, .3), I6 (1, .6) -> both malignant above the benign: AUC 1.
  # female: I2 (0, .2), I3 (1, .7), I4 (0, .4), I7 (0, .5) -> AUC 1. missing: I5 only (benign).
  assert rows("sex") == [("female", 4, 1, 1.0), ("male", 3, 2, 1.0), ("missing", 1, 0, None)]
  assert rows("age band") == [("<30", 2, 1, 1.0), ("30-44", 2, 0, None), ("60-74", 2, 1, 1.0),
                              (">=75", 1, 1, None), ("missing", 1, 0, None)]
  # torso: malignant .8 .7 .6 vs benign .3 .1 .5 -> all 9 pairs ordered: AUC 1.
  assert rows("anatomical site") == [("head/neck", 1, 0, None), ("torso", 6, 3, 1.0), ("missing", 1, 0, None)]
  assert "sex" not in clinical.subgroup_aucs(table.drop(columns="sex"), "p")
  assert [clinical.age_band(a) for a in (0, 29.9, 30, 44, 45, 59, 60, 74, 75, 120, np.nan)] == [
      "<30", "<30", "30-44", "30-44", "45-59", "45-59", "60-74", "60-74", ">=75", ">=75", "missing"]


def test_write_report_is_self_contained_and_matches_json(table, tmp_path):
  report = clinical.write_report(tmp_path, table, {"image": "p", "fused": "p_cal"}, "Fold <0> & test",
                                 calibrated={"image": "p_cal"}, resamples=200)
  stored = json.loads((tmp_path / "report.json").read_text(),
                      parse_constant=lambda c: pytest.fail(f"{c} in report.json"))
  assert stored == json.loads(json.dumps(report))
  assert set(stored["stages"]["image"]["calibration"]) == {"before", "after"}
  assert set(stored["stages"]["fused"]["calibration"]) == {"before"}
  assert report["stages"]["image"]["auc"] == pytest.approx(sk_metrics.roc_auc_score(table["target"], table["p"]))
  assert clinical.summary(report)["image"]["ece_after"] == report["stages"]["image"]["calibration"]["after"]["ece"]
  page = (tmp_path / "report.html").read_text()
  assert "http" not in page and not re.search(r"""(src|href)\s*=""", page)
  assert "<style>" in page and "Fold &lt;0&gt; &amp; test" in page
  assert "Stage: image" in page and "Stage: fused" in page and "Haenssle" in page
  svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
  assert len(svgs) == 4  # ROC + reliability per stage.
  for svg in svgs:
    ET.fromstring(svg)  # Well-formed: a browser draws it.
  assert not list(tmp_path.glob(".*tmp*"))  # Atomic writes left no temporary file.


def test_write_report_with_one_class_and_bad_columns(table, tmp_path):
  benign = table.assign(target=0)
  report = clinical.write_report(tmp_path, benign, {"image": "p"}, "benign only", resamples=50)
  assert report["stages"]["image"]["auc"] is None and report["stages"]["image"]["calibration"]["before"]["brier"] > 0
  assert "One class only" in (tmp_path / "report.html").read_text()
  with pytest.raises(ValueError, match="nope"):
    clinical.write_report(tmp_path, table, {"image": "nope"}, "t")
  with pytest.raises(ValueError, match="tabular"):
    clinical.write_report(tmp_path, table, {"image": "p"}, "t", calibrated={"tabular": "p_cal"})
