"""Tests of the out-of-fold choice among second-stage candidates (ensemble/choice.py, fusion.nested_oof)."""
import numpy as np
import pandas as pd
import pytest

from melanoma_jax.data import folds as folds_lib
from melanoma_jax.ensemble import choice, fusion, task
from melanoma_jax.evaluation import metrics
from melanoma_jax.utils.errors import InputError


def test_the_one_standard_error_rule_keeps_the_simplest_within_noise():
  aucs = {"simple": 0.80, "complex": 0.83}
  assert choice.choose(aucs, 20, 200, "best") == "complex"
  assert metrics.auc_standard_error(0.83, 20, 200) > 0.03  # Twenty positives: 0.03 is noise.
  assert choice.choose(aucs, 20, 200, "one_se") == "simple"
  assert metrics.auc_standard_error(0.83, 2000, 20000) < 0.03  # Two thousand: it is not.
  assert choice.choose(aucs, 2000, 20000, "one_se") == "complex"
  with pytest.raises(InputError, match="choice rule 'worst' must be one of one_se, best"):
    choice.choose(aucs, 20, 200, "worst")


def test_hanley_mcneil_standard_error_matches_the_spread_of_auc_over_resamples():
  rng = np.random.default_rng(0)
  aucs = []
  for _ in range(400):
    y = np.r_[np.ones(30), np.zeros(300)].astype(bool)
    aucs.append(metrics.roc_auc(y, rng.normal(size=330) + 1.0 * y))
  mean = np.mean(aucs)
  assert metrics.auc_standard_error(mean, 30, 300) == pytest.approx(np.std(aucs), rel=0.2)


def test_the_choice_for_a_fold_is_made_without_that_folds_rows():
  """A 'lucky' candidate whose outer scores happen to fit every fold (here: they are the targets) but whose
  inner scores, which never saw the fold, are noise, against a 'steady' one of moderate skill everywhere.
  Chosen on the outer scores, the lucky one wins and reports a perfect AUC; chosen out of fold, every fold
  takes the steady one and the stage reports the steady one's AUC."""
  rng = np.random.default_rng(0)
  n, folds = 600, 4
  y = (rng.uniform(size=n) < 0.2).astype(int)
  fold_ids = np.arange(n) % folds
  steady = y + rng.normal(size=n)
  lucky_outer = y + 0.01 * rng.normal(size=n)
  outer = {"lucky": lucky_outer, "steady": steady}
  inner = {"lucky": {k: np.where(fold_ids == k, np.nan, rng.normal(size=n)) for k in range(folds)},
           "steady": {k: np.where(fold_ids == k, np.nan, steady) for k in range(folds)}}
  for rule in choice.RULES:
    scores, chosen = choice.nested(outer, inner, y, fold_ids, rule)
    assert chosen == {k: "steady" for k in range(folds)}
    np.testing.assert_allclose(scores, steady)
    assert choice.final(outer, y, rule)[0] == "lucky"  # What choosing on the outer scores alone would keep.


def _table(n_patients, seed):
  rng = np.random.default_rng(seed)
  rows = [{"image_name": f"I{p}_{i}", "patient_id": f"P{p}", "sex": rng.choice(["male", "female"]),
           "age_approx": float(rng.integers(3, 9) * 10), "anatom_site_general_challenge": rng.choice(["torso", "head/neck"]),
           "target": int(rng.uniform() < 0.15)}
          for p in range(n_patients) for i in range(rng.integers(3, 9))]
  return pd.DataFrame(rows)


def test_when_the_metadata_carries_nothing_the_fusion_keeps_the_image_contexts_auc():
  """Metadata drawn independently of the targets, image columns that carry them: the fusion stage, free
  to choose any candidate out of fold, stays within noise of the image context stage, far above metadata."""
  df = _table(150, 0)
  y = df["target"].to_numpy()
  rng = np.random.default_rng(1)
  images = rng.normal(size=(len(df), len(fusion.IMAGE_COLUMNS)))
  images[:, list(fusion.IMAGE_COLUMNS).index("embedding_dist_nearest")] += 1.5 * y
  fold_ids = folds_lib.assign_folds(df, 4, 0)
  oof, stages, record = task.fit_stages(df, images, fold_ids, fusion.candidates(families=("logistic",)), 0)
  aucs = {stage: record["stages"][stage]["nested_oof_auc"] for stage in fusion.STAGES}
  assert aucs["tabular"] < 0.65 < 0.8 < aucs["image_context"]
  assert aucs["fusion"] >= aucs["image_context"] - 0.02
  assert not stages["fusion"].inputs.tabular or record["stages"]["fusion"]["chosen_oof_auc"] >= aucs["image_context"] - 0.02
  for stage in fusion.STAGES:
    np.testing.assert_allclose(metrics.roc_auc(y, oof[stage]), aucs[stage])
  # Every candidate's number is recorded, and each stage chose among its own.
  assert set(record["candidate_oof_auc"]) == {c.name for c in fusion.candidates(families=("logistic",))}
  assert record["stages"]["tabular"]["chosen"] == "tabular/logistic"
  assert "tabular" not in record["stages"]["image_context"]["chosen"]


def test_nested_predictions_with_two_folds_split_the_other_fold_by_patient():
  df = _table(40, 2)
  fold_ids = folds_lib.assign_folds(df, 2, 0)
  seen = []

  def fit_predict(train, apply):
    seen.append((set(train), set(apply)))
    return np.zeros(len(apply))

  outer, inner = fusion.nested_oof(fit_predict, fold_ids, df)
  assert not np.isnan(outer).any()
  patients = df["patient_id"].to_numpy()
  for k in (0, 1):
    assert np.isnan(inner[k][fold_ids == k]).all() and not np.isnan(inner[k][fold_ids != k]).any()
  for train, apply in seen[2:]:  # The inner fits: within one outer fold, patient-grouped.
    assert len(set(fold_ids[list(train | apply)])) == 1
    assert not set(patients[list(train)]) & set(patients[list(apply)])


def test_candidates_are_listed_simplest_first_and_refuse_unknown_names():
  names = [c.name for c in fusion.candidates(("style", "base"), ("hgb", "logistic"))]
  assert names == ["tabular/logistic", "tabular/hgb", "base/logistic", "base/hgb", "base+tabular/logistic",
                   "base+tabular/hgb", "style/logistic", "style/hgb", "style+tabular/logistic",
                   "style+tabular/hgb"]
  with pytest.raises(InputError, match="feature sets .*'colour'.*sets among base, style, embedding, all"):
    fusion.candidates(("colour",), ("logistic",))
  with pytest.raises(InputError, match="families among logistic, hgb"):
    fusion.candidates(("all",), ("forest",))
