"""Tests of the patient-level ensemble: image context, out-of-fold discipline, the ugly duckling, main.py."""
import io
import json
import os
import subprocess
import sys
import types

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn import metrics as sk_metrics
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from configs import ensemble_demo
from melanoma_jax import predict as predict_cli
from melanoma_jax.data import folds as folds_lib
from melanoma_jax.data import metadata, records, synthetic
from melanoma_jax.data.synthetic import generators
from melanoma_jax import export as export_cli
from melanoma_jax import image
from melanoma_jax.ensemble import context, fitted, fusion, task
from melanoma_jax.ensemble import outputs as outputs_lib
from melanoma_jax.image import data as image_data
from melanoma_jax.evaluation import calibration, metrics
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _context(patients, probs, embeddings):
  return context.image_context(np.asarray(patients), np.asarray(probs, float), np.asarray(embeddings, float))


# ---------------------------------------------------------------------------------------------------------
# Image context on hand-made patients.

def test_single_image_patient_gets_the_neutral_values():
  out = _context(["A", "B", "B"], [0.9, 0.1, 0.2], [[5.0], [0.0], [1.0]])
  row = out.iloc[0]
  assert row["pred_rank"] == 0.5 and row["pred_z"] == 0.0
  for g in context.GEOMETRIES:
    assert row[f"{g}_dist_z"] == 0.0 and row[f"{g}_dist_mean"] == 1.0 and row[f"{g}_dist_nearest"] == 1.0
    assert row[f"{g}_lof"] == 0.0
  assert (out.filter(like="_absz").iloc[0] == 0.0).all()
  assert row["log_images"] == pytest.approx(np.log(2.0))
  assert out["log_images"].iloc[1] == pytest.approx(np.log(3.0))


def test_prediction_rank_and_z_score_within_the_patient():
  out = _context(["P"] * 4 + ["Q"], [0.1, 0.5, 0.9, 0.5, 0.99], np.zeros((5, 2)))
  np.testing.assert_allclose(out["pred_rank"][:4], [0.0, 0.5, 1.0, 0.5])  # Ties share the mean rank.
  logits = np.log(np.array([0.1, 0.5, 0.9, 0.5]) / (1 - np.array([0.1, 0.5, 0.9, 0.5])))
  np.testing.assert_allclose(out["pred_z"][:4], (logits - logits.mean()) / logits.std())
  assert out["pred_rank"][4] == 0.5  # Q's only image: another patient's scores never enter.


def test_embedding_distances_scaled_by_the_patients_spread():
  # One dimension: distances 0-1 1, 0-2 2, 0-3 12, 1-2 1, 1-3 11, 2-3 10; spread = median = (2 + 10) / 2.
  # One patient: the style geometry is the standardised embedding too (no other patient to tell apart).
  out = _context(["P"] * 4, [0.5] * 4, [[0.0], [1.0], [2.0], [12.0]])
  means = np.array([15, 13, 13, 33]) / 3.0
  for g in context.GEOMETRIES:
    np.testing.assert_allclose(out[f"{g}_dist_mean"], means / 6.0)
    np.testing.assert_allclose(out[f"{g}_dist_nearest"], np.array([1, 1, 1, 10]) / 6.0)
    np.testing.assert_allclose(out[f"{g}_dist_z"], (means - means.mean()) / means.std())
    assert out[f"{g}_dist_z"].idxmax() == 3  # The ugly duckling.
    assert (out[f"{g}_lof"] == 0.0).all()  # Four images: too few for a local outlier factor.


def test_local_outlier_factor_and_principal_z_scores_find_the_stranger():
  # Patient P: five images around 0 and a stranger far out along dimension 0; Q and R give the principal
  # axes another patient's worth of spread. The stranger has the largest log LOF and |z| on the first axis.
  rng = np.random.default_rng(0)
  p = np.concatenate([0.3 * rng.normal(size=(5, 3)), [[6.0, 0.0, 0.0]]])
  embeddings = np.concatenate([p, 0.3 * rng.normal(size=(6, 3)) + [0, 3, 0], 0.3 * rng.normal(size=(6, 3))])
  patients = ["P"] * 6 + ["Q"] * 6 + ["R"] * 6
  out = _context(patients, np.full(18, 0.3), embeddings)
  lof = out["embedding_lof"][:6]
  assert lof.idxmax() == 5 and lof[5] > 0.5 and (lof[:5].abs() < 0.5).all()
  # The style geometry whitens by the within-patient spread, which the stranger itself inflates along
  # dimension 0: it shrinks the one direction the stranger breaks (why both geometries are kept).
  assert out["style_lof"][5] < 0.5
  space = context.fit_space(embeddings, patients)
  assert space.principal.shape == (3, 3)  # Three dimensions: three axes, the fourth feature stays neutral.
  first = ((embeddings[:6] - space.mean) / space.scale) @ space.principal[:, 0]
  np.testing.assert_allclose(out["pc1_absz"][:6], np.abs(first - first.mean()) / first.std(), rtol=1e-9)
  assert out["pc1_absz"][:6].idxmax() == 5
  assert (out["pc4_absz"] == 0.0).all()


def test_distances_are_scale_free_and_identical_images_are_neutral():
  embeddings = np.array([[0.0, 0.0], [1.0, 0.5], [0.2, 3.0]])
  a = _context(["P"] * 3, [0.2] * 3, embeddings)
  b = _context(["P"] * 3, [0.2] * 3, embeddings * [10.0, 10.0])
  pd.testing.assert_frame_equal(a, b)
  same = _context(["P"] * 3, [0.2, 0.3, 0.4], np.ones((3, 4)))
  for g in context.GEOMETRIES:
    assert (same[f"{g}_dist_mean"] == 1.0).all() and (same[f"{g}_dist_nearest"] == 1.0).all()
    assert (same[f"{g}_dist_z"] == 0).all()


def test_context_is_per_row_and_order_free():
  rng = np.random.default_rng(0)
  patients = np.array(["A", "B", "A", "C", "B", "A", "B"])
  probs, embeddings = rng.uniform(0.05, 0.95, 7), rng.normal(size=(7, 3))
  order = rng.permutation(7)
  out = _context(patients, probs, embeddings)
  shuffled = _context(patients[order], probs[order], embeddings[order])
  np.testing.assert_allclose(shuffled.to_numpy(), out.to_numpy()[order])


def test_style_coordinates_find_the_duckling_among_noisier_features():
  # Dimension 0 is the patients' style (the duckling breaks it); 30 more vary from image to image, 3x more.
  rng = np.random.default_rng(0)
  patients = np.repeat(np.arange(60), 8).astype(str)
  style = rng.normal(size=60)[patients.astype(int)]
  duckling = np.arange(len(patients)) % 8 == 3
  style[duckling] += rng.choice([-2.5, 2.5], duckling.sum())
  embeddings = np.concatenate([style[:, None] + 0.1 * rng.normal(size=(len(patients), 1)),
                               3.0 * rng.normal(size=(len(patients), 30))], axis=1)
  found = context.image_context(patients, np.full(len(patients), 0.1), embeddings, components=2)
  assert metrics.roc_auc(duckling, found["style_dist_nearest"]) > 0.95
  # Every direction, standardised: the noise hides it.
  assert metrics.roc_auc(duckling, found["embedding_dist_nearest"]) < 0.8


def test_fold_averaged_test_context_is_the_mean_of_each_models_context():
  patients = ["T", "T", "U"]
  first = ([0.1, 0.7, 0.3], [[0.0], [1.0], [0.0]])
  second = ([0.6, 0.2, 0.3], [[0.0], [3.0], [5.0]])
  averaged = context.fold_averaged_context(patients, [first, second])
  expected = (_context(patients, *first) + _context(patients, *second)) / 2
  pd.testing.assert_frame_equal(averaged, expected)


# ---------------------------------------------------------------------------------------------------------
# Out-of-fold discipline.

def _table(n_patients=30, seed=0):
  """A small metadata table: patients with 3-8 images, about 15% malignant."""
  rng = np.random.default_rng(seed)
  rows = []
  for p in range(n_patients):
    for i in range(rng.integers(3, 9)):
      rows.append({"image_name": f"I{p}_{i}", "patient_id": f"P{p}", "sex": rng.choice(["male", "female"]),
                   "age_approx": float(rng.integers(3, 9) * 10),
                   "anatom_site_general_challenge": rng.choice(["torso", "head/neck"]),
                   "target": int(rng.uniform() < 0.15)})
  return pd.DataFrame(rows)


def test_fit_oof_never_shows_a_fold_its_own_rows():
  fold_ids = np.array([0, 1, 2, 0, 1, 2, 2, 0])
  calls = []

  def fit_predict(train, apply):
    calls.append((set(train), set(apply)))
    return np.full(len(apply), float(len(calls)))

  oof = fusion.fit_oof(fit_predict, fold_ids)
  assert len(calls) == 3
  for fold, (train, apply) in enumerate(calls):
    assert apply == set(np.flatnonzero(fold_ids == fold)) and train == set(np.flatnonzero(fold_ids != fold))
  np.testing.assert_array_equal(oof, fold_ids + 1.0)


def test_a_folds_stage_and_calibration_ignore_its_own_targets(monkeypatch):
  # A short boosting run: the discipline is what is tested, not the family's settings.
  monkeypatch.setitem(fusion.FAMILIES, "hgb", lambda seed: HistGradientBoostingClassifier(
      max_iter=20, min_samples_leaf=5, random_state=seed))
  df = _table()
  fold_ids = folds_lib.assign_folds(df, 3, 0)
  rng = np.random.default_rng(1)
  images = rng.normal(size=(len(df), len(fusion.IMAGE_COLUMNS)))
  y = df["target"].to_numpy()
  flipped = y.copy()
  flipped[fold_ids == 0] = 1 - flipped[fold_ids == 0]
  for family in fusion.FAMILIES:
    candidate = fusion.Candidate("all", True, family)
    (a, inner_a), (b, inner_b) = (fusion.candidate_oof(candidate, df, images, t, fold_ids) for t in (y, flipped))
    np.testing.assert_allclose(a[fold_ids == 0], b[fold_ids == 0])
    assert not np.allclose(a[fold_ids != 0], b[fold_ids != 0])
    # The inner predictions that choose for fold 0 never saw fold 0's targets either.
    np.testing.assert_allclose(inner_a[0], inner_b[0])
    assert np.isnan(inner_a[0][fold_ids == 0]).all() and not np.isnan(inner_a[0][fold_ids != 0]).any()
  scores = rng.uniform(0.01, 0.99, len(df))
  np.testing.assert_allclose(fusion.calibrate_oof(scores, y, fold_ids)[fold_ids == 0],
                             fusion.calibrate_oof(scores, flipped, fold_ids)[fold_ids == 0])


def _outputs(fold, names, probs, dims=2):
  names = np.asarray(names, str)
  return outputs_lib.FoldOutputs(fold, names, np.asarray(probs, float), np.zeros((len(names), dims), np.float32),
                           np.zeros(0, str), np.zeros(0), np.zeros((0, dims), np.float32))


def test_out_of_fold_image_outputs_come_from_the_model_that_never_saw_the_patient():
  df = _table(12)
  fold_ids = folds_lib.assign_folds(df, 3, 0)
  names = df["image_name"].to_numpy()
  # The image task's split of fold k (what fold model k validates on) is exactly the rows of fold k.
  for fold in range(3):
    split = image_data.make_split(types.SimpleNamespace(num_folds=3, seed=0, fold=fold),
                                  types.SimpleNamespace(train_df=df))
    assert set(split.val_df["image_name"]) == set(names[fold_ids == fold])
    assert not set(split.train_df["patient_id"]) & set(split.val_df["patient_id"])
  per_fold = [_outputs(k, names[fold_ids == k][::-1], np.full((fold_ids == k).sum(), k / 10)) for k in range(3)]
  probs, _, source = outputs_lib.place_out_of_fold(list(names), fold_ids, per_fold)
  np.testing.assert_array_equal(source, fold_ids)
  np.testing.assert_allclose(probs, fold_ids / 10)
  stray = [per_fold[0], _outputs(1, list(names[fold_ids == 1]) + [names[fold_ids == 0][0]],
                                 np.zeros((fold_ids == 1).sum() + 1)), per_fold[2]]
  with pytest.raises(InputError, match="fold 1"):
    outputs_lib.place_out_of_fold(list(names), fold_ids, stray)
  with pytest.raises(InputError, match="no out-of-fold output"):
    outputs_lib.place_out_of_fold(list(names), fold_ids, per_fold[:2])


def test_fold_configs_are_image_runs_on_the_shared_data():
  config = ensemble_demo.get_config()
  fold_cfg = task.fold_config(config, 3, "W/data")
  assert fold_cfg.task == "image" and fold_cfg.fold == 3 and fold_cfg.data_dir == "W/data"
  assert "ensemble" not in fold_cfg and fold_cfg.synthetic.ugly_duckling == 1.0
  assert fold_cfg.image_size == config.image_size and fold_cfg.model.name == config.model.name


# ---------------------------------------------------------------------------------------------------------
# The ugly duckling, end to end on a small set (hand-made image features stand in for the CNN).

SIZE = 32


def _lesion_features(jpeg):
  """Colour and area of the dark (lesion) pixels of the image's centre: a stand-in for CNN embeddings."""
  pixels = np.asarray(Image.open(io.BytesIO(jpeg)), np.float32)[SIZE // 6:-SIZE // 6, SIZE // 6:-SIZE // 6]
  pixels = pixels.reshape(-1, 3) / 255.0
  lum = pixels.mean(1)
  lesion = lum < 0.8 * np.percentile(lum, 90)
  colour = pixels[lesion].mean(0) if lesion.any() else pixels.mean(0)
  return np.concatenate([colour, [3.0 * lesion.mean()]])


def _rendered(df, labels, generator="dermoscopy"):
  return np.stack([_lesion_features(generators.render_image(generator, 0, n, p, bool(t), SIZE, ugly_duckling=1.0))
                   for n, p, t in zip(df["image_name"], df["patient_id"], labels)])


def test_ugly_duckling_is_an_option_that_leaves_ordinary_sets_alone():
  args = ("ISIC_1", "IP_1", True, SIZE)
  assert synthetic.render_image(0, *args) == synthetic.render_image(0, *args, ugly_duckling=0.0)
  assert synthetic.render_image(0, *args) != synthetic.render_image(0, *args, ugly_duckling=1.0)
  with pytest.raises(InputError, match="ugly_duckling"):
    synthetic.generate_dataset("unused", num_patients=2, image_size=SIZE, ugly_duckling=1.5)


@pytest.mark.parametrize("generator", ["dermoscopy", "plain"])
def test_ugly_duckling_needs_the_patient_context(real_train_csv, real_test_csv, generator):
  """The same pipeline on two structurally different generators (the one the design was built on, and the
  plain one: flat skin, style by colour, darkness, size and outline only): image-only near chance, fused
  at least 0.85 out of fold and on the held-out labels, with every choice made out of fold.

  Image-only is judged loosely (within 0.2 of 0.5): a patient's benign images share one style, so the
  benign side holds about one independent draw per patient, not per image."""
  train_all = metadata.load_metadata(real_train_csv, "train")
  test_all = metadata.load_metadata(real_test_csv, "test")
  train_df = train_all[train_all["patient_id"].isin(synthetic.select_patients(train_all, 120, 0, 60))]
  test_df = test_all[test_all["patient_id"].isin(synthetic.select_test_patients(test_all, 120, 0))]
  train_df, test_df = train_df.reset_index(drop=True), test_df.reset_index(drop=True)
  test_labels = synthetic.hidden_test_labels(test_df, 0)
  y = train_df["target"].to_numpy()
  assert y.sum() >= 50 and test_labels.sum() >= 30
  features, test_features = _rendered(train_df, y, generator), _rendered(test_df, test_labels, generator)
  fold_ids = folds_lib.assign_folds(train_df, 4, 0)
  # Fold model k: image features alone, fitted on the other folds, as the image folds are.
  per_fold = []
  for k in range(4):
    model = LogisticRegression(C=0.1, max_iter=2000).fit(features[fold_ids != k], y[fold_ids != k])
    per_fold.append(outputs_lib.FoldOutputs(
        k, train_df["image_name"].to_numpy()[fold_ids == k], model.predict_proba(features[fold_ids == k])[:, 1],
        features[fold_ids == k], test_df["image_name"].to_numpy(), model.predict_proba(test_features)[:, 1],
        test_features))
  images, image_probs = task.image_stage(train_df, fold_ids, per_fold)
  oof, stages, _ = task.fit_stages(train_df, images, fold_ids, fusion.candidates(families=("logistic",)), 0)
  fused = fusion.calibrate_oof(oof["fusion"], y, fold_ids)
  per_fold_test = task.test_outputs(test_df, per_fold)
  final = fitted.FittedEnsemble(tuple(range(4)), (-1,) * 4, task.test_spaces(test_df, per_fold_test), stages,
                                calibration.PlattCalibrator.fit(oof["fusion"], y))
  test = final.predict(test_df, per_fold_test)
  test_probs, test_fused = test["pred_image"].to_numpy(), test["prediction"].to_numpy()
  aucs = {"image": metrics.roc_auc(y, image_probs), "test image": metrics.roc_auc(test_labels, test_probs),
          "fused": metrics.roc_auc(y, fused), "test fused": metrics.roc_auc(test_labels, test_fused)}
  print(generator, {k: round(v, 3) for k, v in aucs.items()})
  assert abs(aucs["image"] - 0.5) < 0.2 and abs(aucs["test image"] - 0.5) < 0.2
  assert aucs["fused"] >= 0.85 and aucs["test fused"] >= 0.85
  assert abs(fused.mean() - y.mean()) < 0.02  # Calibrated: at the malignant rate.


# ---------------------------------------------------------------------------------------------------------
# main.py, end to end.

def test_main_ensemble_demo_tiny_end_to_end(ensemble_run):
  workdir, command, env = ensemble_run
  train_csv = pd.read_csv(workdir / "data" / "train.csv")
  oof = pd.read_csv(workdir / "oof.csv")
  assert sorted(oof["image_name"]) == sorted(train_csv["image_name"]) and oof["image_name"].is_unique
  assert {"prediction", "pred_image", "pred_tabular", "pred_fusion", "fold"} <= set(oof.columns)
  submission = pd.read_csv(workdir / "submission.csv")
  assert sorted(submission["image_name"]) == sorted(pd.read_csv(workdir / "data" / "test.csv")["image_name"])
  results = json.loads((workdir / "results.json").read_text())
  assert set(results["stage_oof_auc"]) == {"image", "tabular", "image_context", "fusion", "fused"}
  assert results["fusion_model"].endswith("/logistic") and results["choice_rule"] == "one_se"
  assert results["fusion_sha256"] == files.sha256(workdir / fitted.FILE)
  for fold in range(2):
    assert (workdir / f"fold_{fold}" / "run.json").exists()
    in_fold = oof[oof["fold"] == fold]
    assert not set(in_fold["patient_id"]) & set(oof.loc[oof["fold"] != fold, "patient_id"])
  assert (workdir / "report.html").exists() and (workdir / "report.json").exists()
  # A finished ensemble rerun (here: one whose fitted stages were deleted) refits the stages from the folds'
  # kept scores and writes the fitted stages again, the same test predictions and its hash.
  test_stages = pd.read_csv(workdir / "test_stages.csv")
  (workdir / fitted.FILE).unlink()
  again = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stderr.count("not training again") == 2 and "reusing" in again.stderr
  assert json.loads((workdir / "results.json").read_text())["fusion_sha256"] == files.sha256(workdir / fitted.FILE)
  pd.testing.assert_frame_equal(pd.read_csv(workdir / "test_stages.csv"), test_stages)


def _rates(y, p, threshold):
  """(sensitivity, specificity) when probability >= threshold is called malignant (None: nothing is)."""
  positive = p >= (np.inf if threshold is None else threshold)
  return positive[y].mean(), (~positive[~y]).mean()


def test_ensemble_report_figures_are_those_of_oof_csv(ensemble_run):
  """Every figure a reader of report.json acts on, recomputed from oof.csv (the predictions users get) with
  sklearn and numpy: a report built from other rows, columns or a mis-thresholded ROC would differ."""
  workdir = ensemble_run[0]
  oof = pd.read_csv(workdir / "oof.csv")
  report = json.loads((workdir / "report.json").read_text())
  results = json.loads((workdir / "results.json").read_text())
  y = oof["target"].to_numpy().astype(bool)
  assert 0 < y.sum() < len(y)
  header = {"images": len(oof), "patients": oof["patient_id"].nunique(), "malignant": int(y.sum())}
  assert {k: report[k] for k in header} == header
  columns = {"image": "pred_image", "tabular": "pred_tabular", "fused": "pred_fusion"}
  assert set(report["stages"]) == set(columns)
  for name, stage in report["stages"].items():
    p = oof[columns[name]].to_numpy(np.float64)
    assert stage["column"] == columns[name] and {k: stage[k] for k in header} == header, name
    assert stage["auc"] == pytest.approx(sk_metrics.roc_auc_score(y, p), abs=1e-12), name
    assert stage["calibration"]["before"]["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-12), name
    points = [*stage["operating_points"]["specificity_at_sensitivity"],
              *stage["operating_points"]["sensitivity_at_specificity"]]
    points += [d[k] for d in stage["dermatologists"]
               for k in ("model_specificity_at_their_sensitivity", "model_sensitivity_at_their_specificity")]
    assert len(points) == 8, name  # 3 sensitivities, 1 specificity, 2 dermatologist groups x 2.
    for point in points:
      sensitivity, specificity = _rates(y, p, point["threshold"])
      assert point["sensitivity"] == pytest.approx(sensitivity, abs=1e-12), (name, point)
      assert point["specificity"] == pytest.approx(specificity, abs=1e-12), (name, point)
    # Each point is the best one at its target: no threshold meeting the target does better.
    every = [_rates(y, p, t) for t in [None, *np.unique(p)]]
    for point in stage["operating_points"]["specificity_at_sensitivity"]:
      assert point["sensitivity"] >= point["target"] - 1e-12
      best = max(spec for sens, spec in every if sens >= point["target"] - 1e-12)
      assert point["specificity"] == pytest.approx(best, abs=1e-12), (name, point)
    for point in stage["operating_points"]["sensitivity_at_specificity"]:
      assert point["specificity"] >= point["target"] - 1e-12
      best = max(sens for sens, spec in every if spec >= point["target"] - 1e-12)
      assert point["sensitivity"] == pytest.approx(best, abs=1e-12), (name, point)
  # Only the fused stage is calibrated: its "after" is the prediction column users get.
  fused = report["stages"]["fused"]
  assert fused["calibrated_column"] == "prediction"
  assert [s for s in report["stages"] if "after" in report["stages"][s]["calibration"]] == ["fused"]
  prediction = oof["prediction"].to_numpy(np.float64)
  assert fused["calibration"]["after"]["brier"] == pytest.approx(np.mean((prediction - y) ** 2), abs=1e-12)
  stage_columns = {"image": "pred_image", "tabular": "pred_tabular", "image_context": "pred_image_context",
                   "fusion": "pred_fusion", "fused": "prediction"}
  assert set(results["stage_oof_auc"]) == set(stage_columns)
  for name, column in stage_columns.items():
    assert results["stage_oof_auc"][name] == pytest.approx(sk_metrics.roc_auc_score(y, oof[column]), abs=1e-12)
  assert results["report"] == {name: stage["auc"] for name, stage in report["stages"].items()}
  # The second stage's choice: the report shows what results.json records, and each stage's nested AUC is
  # that of its oof.csv column, scored fold by fold by the candidate named for that fold.
  assert report["choice"] == {"rule": results["choice_rule"], "candidate_oof_auc": results["candidate_oof_auc"],
                              "stages": results["stages"]}
  for stage, record in results["stages"].items():
    assert record["nested_oof_auc"] == pytest.approx(results["stage_oof_auc"][stage], abs=1e-12)
    assert set(record["chosen_per_fold"]) == {str(f) for f in oof["fold"].unique()}
    assert record["chosen_oof_auc"] == results["candidate_oof_auc"][record["chosen"]]


# ---------------------------------------------------------------------------------------------------------
# The predict command on an ensemble workdir.

@pytest.fixture(scope="module")
def patient_images(ensemble_run):
  """All test images of three test patients as JPEG files (the test records' bytes), one more copy named
  stray.jpg (no metadata row) and a broken file: (folder, those patients' test.csv rows)."""
  workdir = ensemble_run[0]
  test_csv = pd.read_csv(workdir / "data" / "test.csv")
  counts = test_csv["patient_id"].value_counts()
  patients = sorted(counts[counts >= 3].index)[:3]
  rows = test_csv[test_csv["patient_id"].isin(patients)]
  assert len(patients) == 3 and len(rows) >= 9
  folder = workdir.parent / "images"
  folder.mkdir()
  wanted = set(rows["image_name"])
  examples = [e for path in sorted((workdir / "data").glob("test*.tfrec")) for e in records.read_examples(str(path))
              if e["image_name"] in wanted]
  assert len(examples) == len(rows)
  for example in examples:
    (folder / f"{example['image_name']}.jpg").write_bytes(example["image"])
  (folder / "stray.jpg").write_bytes(examples[0]["image"])
  (folder / "broken.jpg").write_bytes(examples[1]["image"][:200])
  return folder, rows


def _fold_test_probs(workdir, names):
  per_fold = []
  for fold in range(2):
    scores = image.load_scores(str(workdir / f"fold_{fold}")).test
    per_fold.append(pd.Series(scores.probabilities, index=scores.names).loc[names].to_numpy())
  return np.mean(per_fold, axis=0)


def test_predict_averages_the_fold_models(ensemble_run, patient_images, tmp_path):
  workdir, (folder, rows) = ensemble_run[0], patient_images
  out = tmp_path / "preds.csv"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")  # Another device count.
  proc = subprocess.run([sys.executable, "-m", "melanoma_jax.predict", f"--workdir={workdir}", f"--images={folder}",
                         f"--out={out}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  preds = pd.read_csv(out, keep_default_na=False).set_index("image")
  assert list(preds.columns) == ["probability", "error"] and len(preds) == len(rows) + 2
  names = list(rows["image_name"])
  np.testing.assert_allclose(preds.loc[[f"{n}.jpg" for n in names], "probability"].astype(float),
                             _fold_test_probs(workdir, names), rtol=0, atol=1e-5)
  assert preds.loc["stray.jpg", "probability"] == preds.loc[f"{rows['image_name'].iloc[0]}.jpg", "probability"]
  assert preds.loc["broken.jpg", "probability"] == "" and "not a decodable" in preds.loc["broken.jpg", "error"]


def test_predict_with_metadata_fuses_as_the_ensembles_test_stage(ensemble_run, patient_images, tmp_path):
  workdir, (folder, rows) = ensemble_run[0], patient_images
  meta = tmp_path / "meta.csv"
  rows.rename(columns={"image_name": "image"}).to_csv(meta, index=False)  # `image` is accepted too.
  out = tmp_path / "fused.csv"
  predict_cli.run(str(workdir), str(folder), str(out), metadata=str(meta))
  preds = pd.read_csv(out, keep_default_na=False).set_index("image")
  assert list(preds.columns) == ["probability", "error", "pred_image", "pred_fused"]
  names = list(rows["image_name"])
  got = preds.loc[[f"{n}.jpg" for n in names]]
  want = pd.read_csv(workdir / "test_stages.csv").set_index("image_name").loc[names]
  assert (got["error"] == "").all()
  np.testing.assert_allclose(got["pred_image"].astype(float), want["pred_image"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["pred_fused"].astype(float), want["prediction"], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(got["probability"], got["pred_fused"])
  stray = preds.loc["stray.jpg"]
  assert stray["probability"] == stray["pred_fused"] == "" and stray["pred_image"] != ""
  assert stray["error"] == f"no row for stray in --metadata={meta}"
  assert preds.loc["broken.jpg", "pred_image"] == "" and "not a decodable" in preds.loc["broken.jpg", "error"]


def test_ensemble_refusals_are_one_line(ensemble_run, patient_images, tmp_path):
  workdir, (folder, rows) = ensemble_run[0], patient_images
  with pytest.raises(InputError, match="an ensemble workdir; saliency maps: one model only.*--workdir=.*fold_0"):
    predict_cli.run(str(workdir), str(folder), str(tmp_path / "p.csv"), saliency_dir=str(tmp_path / "maps"))
  meta = tmp_path / "meta.csv"
  rows.drop(columns=["age_approx"]).to_csv(meta, index=False)
  with pytest.raises(InputError, match=f"--metadata={meta}: missing column.s. age_approx$"):
    predict_cli.run(str(workdir), str(folder), str(tmp_path / "p.csv"), metadata=str(meta))
  with pytest.raises(InputError, match=r"fusion.zip: missing .*rerun the same main.py command"):
    fitted.load(str(tmp_path))
  with pytest.raises(InputError, match="an ensemble workdir; a SavedModel export: one model only"):
    export_cli.run(str(workdir), str(tmp_path / "saved_model"))
  assert not (tmp_path / "p.csv").exists()


def test_a_fitted_context_space_makes_context_independent_of_other_patients():
  rng = np.random.default_rng(0)
  patients = np.repeat(["A", "B", "C", "D"], 5)
  probs, embeddings = rng.uniform(0.05, 0.95, 20), rng.normal(size=(20, 6))
  space = context.fit_space(embeddings, patients, components=2)
  again = context.fit_space(embeddings, patients, 2)
  for field in ("mean", "scale", "style", "principal"):
    np.testing.assert_allclose(getattr(space, field), getattr(again, field))
  whole = context.image_context(patients, probs, embeddings, space=space)
  alone = context.image_context(patients[:5], probs[:5], embeddings[:5], space=space)
  np.testing.assert_allclose(alone.to_numpy(), whole.to_numpy()[:5])
