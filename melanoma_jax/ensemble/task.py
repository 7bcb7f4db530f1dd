"""The patient-level ensemble: K image fold models -> image context -> fusion with metadata -> calibration.

`train(config, workdir)`:
  1. data: `config.data_dir`, or (when "") one synthetic set generated into WORKDIR/data (with
     `config.synthetic.ugly_duckling`), shared by every fold;
  2. image folds: `image.train` on every fold k, each its own run in WORKDIR/fold_k with its own identity
     (resumable; a finished fold is not trained again); each fold's prediction scores its validation fold
     (out of fold) and every test image once, probability and embedding together (FOLD_DIR/scores.npz),
     and the ensemble reads them from there (outputs.py);
  3. image context (context.py) per image among the patient's images, with one fold model's outputs, in
     two geometries (the standardised embedding, the patients' style) fitted per fold model on the rows
     scored together (its out-of-fold rows; for test rows, its outputs for all test rows: that context
     space is kept for new images too);
  4. candidates (fusion.py: image feature sets x with or without the metadata x model families) fitted out
     of fold on the same patient-grouped folds, and each stage's choice among them made out of fold too
     (choice.py: nested, `config.ensemble.choice` rule): `tabular` (metadata + its patient context),
     `image_context` (image + image context), `fusion` (any candidate); the fusion is calibrated out of
     fold (Platt) into `fused`;
  5. test: each stage fitted on all out-of-fold rows, applied to features of the fold-averaged test image
     probabilities and the fold-averaged test image contexts; the calibrator fitted on all out-of-fold rows.
     These fitted stages, the context spaces and the fold models' checkpoint steps are saved in
     WORKDIR (fitted.py, a format that runs no code when loaded; its sha256 in results.json), and the test
     rows are predicted through them exactly as the predict command predicts new image files.
Writes oof.csv, submission.csv, test_stages.csv, the fitted stages, results.json and the clinical report
(report.html / report.json). Every run refits the stages from the folds' kept scores, so rerunning a
finished ensemble (no fold trained or scored again) rewrites all of these.

Several processes: every fold trains and scores across all of them (as an image run does); the stages
after it are cheap CPU work that every process computes alike from the same gathered scores, and process 0
alone writes.
"""
import os
import time

import ml_collections
import numpy as np
import pandas as pd
from absl import logging

from melanoma_jax.data import external
from melanoma_jax.data import folds as folds_lib
from melanoma_jax.data import sources
from melanoma_jax import image
from melanoma_jax.ensemble import choice
from melanoma_jax.ensemble import context as context_lib
from melanoma_jax.ensemble import fitted as fitted_lib
from melanoma_jax.ensemble import fusion
from melanoma_jax.ensemble import outputs as outputs_lib
from melanoma_jax.evaluation import calibration, clinical, metrics
from melanoma_jax.image import data as image_data
from melanoma_jax.image import setup
from melanoma_jax.training import distributed, identity
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError
from melanoma_jax.training.results import write_results

REPORT_STAGES = {"image": "pred_image", "tabular": "pred_tabular", "fused": "pred_fusion"}
HIDDEN_LABELS = "test_hidden_labels.csv"  # The synthetic generator's labels of its test images.


def _without_ensemble(config):
  fields = config.to_dict()
  fields.pop("ensemble", None)
  return ml_collections.ConfigDict(fields)


def fold_config(config, fold, data_dir):
  """The image config of fold `fold`: `config` without its `ensemble` section, reading `data_dir`."""
  fold_cfg = _without_ensemble(config)
  fold_cfg.task, fold_cfg.fold, fold_cfg.data_dir = "image", int(fold), data_dir
  return fold_cfg


def _data_dir(config, workdir):
  """`config.data_dir`, or the synthetic set generated once into WORKDIR/data and shared by every fold."""
  return image_data.data_dir_of(setup.resolve(config), workdir)


def train_folds(config, workdir, data_dir):
  """Trains (or resumes; a finished fold is not trained again) every image fold; returns their FoldOutputs,
  the probabilities and embeddings each fold's own prediction scored in its one pass."""
  per_fold = []
  for fold in range(int(config.num_folds)):
    fold_dir = os.path.join(workdir, f"fold_{fold}")
    image.train(fold_config(config, fold, data_dir), fold_dir)
    scores = image.load_scores(fold_dir)
    if scores is None:  # image.train has just written it: only a concurrent writer could remove it.
      raise InputError(f"{os.path.join(fold_dir, 'scores.npz')}: missing after fold {fold} predicted")
    per_fold.append(outputs_lib.from_scores(fold, scores))
  return per_fold


def image_stage(train_df, fold_ids, per_fold, components=context_lib.STYLE_COMPONENTS):
  """(train image block, OOF probabilities) from the fold outputs.

  Training rows: the out-of-fold output of the model that never saw the patient, and the context among
  the patient's images in that model's terms (its context space fitted on that model's out-of-fold rows).
  """
  probs, embeddings, source = outputs_lib.place_out_of_fold(list(train_df["image_name"]), fold_ids, per_fold)
  patients = train_df["patient_id"].to_numpy()
  train_context = pd.DataFrame(0.0, index=np.arange(len(train_df)), columns=list(context_lib.FEATURES))
  for fold in np.unique(source):
    rows = np.flatnonzero(source == fold)
    train_context.iloc[rows] = context_lib.image_context(patients[rows], probs[rows], embeddings[rows],
                                                         components).to_numpy()
  return fusion.image_block(probs, train_context), probs


def test_outputs(test_df, per_fold):
  """[(probabilities, embeddings)] of every fold model for the test rows, in test.csv order."""
  return [outputs_lib.ordered_test_outputs(list(test_df["image_name"]), out) for out in per_fold]


def test_spaces(test_df, per_fold_test, components=context_lib.STYLE_COMPONENTS):
  """Each fold model's context space, fitted on its outputs for all test rows (patient ids only).

  Fitted once here and kept (fusion.zip) for the test rows and for new images alike, so the predict command
  reproduces the test stage, and an image's context never depends on which other patients it is scored with.
  """
  patients = test_df["patient_id"].to_numpy()
  return tuple(context_lib.fit_space(e, patients, components) for _, e in per_fold_test)


def _auc(targets, scores):
  targets = np.asarray(targets)
  return metrics.roc_auc(targets, scores) if 0 < targets.sum() < len(targets) else None


def fit_stages(train_df, images, fold_ids, candidates, seed, rule="one_se"):
  """Every candidate fitted out of fold (outer and inner, fusion.nested_oof) and every stage's choice.

  Returns (out-of-fold probabilities of every stage, each stage's chosen candidate fitted on all rows, a
  results record: each candidate's out-of-fold AUC, and per stage the nested out-of-fold AUC, the candidate
  chosen for each fold, the one fitted on all rows and that candidate's own out-of-fold AUC).
  """
  y = train_df["target"].to_numpy()
  outer, inner = {}, {}
  for i, candidate in enumerate(candidates, 1):
    started = time.time()
    outer[candidate.name], inner[candidate.name] = fusion.candidate_oof(candidate, train_df, images, y, fold_ids,
                                                                        seed)
    logging.info("candidate %d/%d %s: out-of-fold AUC %.4f (%.1f s)", i, len(candidates), candidate.name,
                 metrics.roc_auc(y, outer[candidate.name]), time.time() - started)
  by_name = {c.name: c for c in candidates}
  oof, fitted, record = {}, {}, {"candidate_oof_auc": {}, "stages": {}}
  for stage in fusion.STAGES:
    names = [c.name for c in fusion.stage_candidates(stage, candidates)]
    if not names:
      raise InputError(f"stage {stage}: no candidate among the configured feature sets and families")
    oof[stage], per_fold = choice.nested({n: outer[n] for n in names}, {n: inner[n] for n in names}, y, fold_ids,
                                         rule)
    kept, aucs = choice.final({n: outer[n] for n in names}, y, rule)
    record["candidate_oof_auc"].update(aucs)
    chosen = by_name[kept]
    fitted[stage] = fusion.Stage(chosen.inputs, chosen.family, seed).fit(train_df, images, y)
    record["stages"][stage] = {"nested_oof_auc": metrics.roc_auc(y, oof[stage]), "chosen": kept,
                               "chosen_oof_auc": aucs[kept], "chosen_per_fold": per_fold}
    logging.info("stage %s: nested out-of-fold AUC %.4f; per fold %s; fitted on all rows: %s (its own "
                 "out-of-fold AUC %.4f)", stage, record["stages"][stage]["nested_oof_auc"],
                 ", ".join(f"{k}: {n}" for k, n in per_fold.items()), kept, aucs[kept])
  return oof, fitted, record


def context_feature_aucs(train_df, images):
  """{image column: AUC of the column alone over the training rows} (larger = more malignant)."""
  y = train_df["target"].to_numpy()
  return {c: metrics.roc_auc(y, images[:, i]) for i, c in enumerate(fusion.IMAGE_COLUMNS)}


def _hidden_labels(data_dir, test_df):
  """Test labels of a synthetic set (its generator's), aligned to test.csv, or None for real data."""
  path = os.path.join(data_dir, HIDDEN_LABELS)
  if not os.path.isfile(path):
    return None
  labels = pd.read_csv(path).set_index("image_name")["target"]
  return labels.reindex(test_df["image_name"]).to_numpy() if set(test_df["image_name"]) <= set(labels.index) else None


def _write_tables(workdir, oof_df, test_stages):
  """oof.csv, submission.csv (the fused test probabilities) and test_stages.csv; process 0 only."""
  if not distributed.is_primary():
    return
  files.write_csv(oof_df, os.path.join(workdir, "oof.csv"))
  files.write_csv(test_stages[["image_name", "prediction"]].rename(columns={"prediction": "target"}),
                  os.path.join(workdir, "submission.csv"))
  files.write_csv(test_stages, os.path.join(workdir, "test_stages.csv"))


def _write_report(workdir, oof_df, train_df, seed, choice_record):
  """The clinical report of the out-of-fold predictions (stages image / tabular / fused, fused calibrated)."""
  if not distributed.is_primary():
    return None
  table = oof_df.merge(train_df[["image_name", *clinical.CONTEXT_COLUMNS]], on="image_name", how="left")
  return clinical.write_report(workdir, table, REPORT_STAGES, "Patient-level ensemble, out of fold",
                               calibrated={"fused": "prediction"}, seed=seed, choice=choice_record)


def train(config, workdir, start_time=None):
  """The whole ensemble (see the module doc); returns the results dict."""
  start = start_time or time.time()
  if "ensemble" not in config:
    raise InputError("config has no `ensemble` section (use configs/ensemble.py or configs/ensemble_demo.py)")
  candidates = fusion.candidates(tuple(config.ensemble.feature_sets), tuple(config.ensemble.families))
  rule = str(config.ensemble.choice)
  if rule not in choice.RULES:
    raise InputError(f"config.ensemble.choice={rule!r} must be one of {', '.join(choice.RULES)}")
  setup.resolve(config)  # Refuses a bad image config before any data is generated.
  os.makedirs(workdir, exist_ok=True)
  # The record covers what the folds and data depend on; the `ensemble` section (second stage, refitted on
  # every run) may change between runs of the same workdir.
  identity.check_config(workdir, _without_ensemble(config))  # Before the synthetic set is (re)generated.
  data_dir = _data_dir(config, workdir)
  data = sources.resolve(data_dir)
  extra_files = [f for one in external.open_sets(config.get("extra_data", "")) for f in one.files()]
  identity.check_or_record(workdir, identity.of_data(_without_ensemble(config), workdir, data.train_df.attrs["path"],
                                                     data.test_df.attrs["path"],
                                                     data.train_files + data.test_files + extra_files))
  train_df, test_df = data.train_df.reset_index(drop=True), data.test_df.reset_index(drop=True)
  seed = int(config.seed)
  fold_ids = folds_lib.assign_folds(train_df, int(config.num_folds), seed)  # The image folds' own split.
  folds_lib.check_folds_have_both_classes(train_df, fold_ids, range(int(config.num_folds)))
  per_fold = train_folds(config, workdir, data_dir)
  components = int(config.ensemble.style_components)
  images, image_probs = image_stage(train_df, fold_ids, per_fold, components)
  per_fold_test = test_outputs(test_df, per_fold)
  spaces = test_spaces(test_df, per_fold_test, components)
  y = train_df["target"].to_numpy()
  oof, stages, choices = fit_stages(train_df, images, fold_ids, candidates, seed, rule)
  fused = fusion.calibrate_oof(oof["fusion"], y, fold_ids)
  final = fitted_lib.FittedEnsemble(folds=tuple(o.fold for o in per_fold), fold_steps=tuple(o.step for o in per_fold),
                                    spaces=spaces, stages=stages,
                                    calibrator=calibration.PlattCalibrator.fit(oof["fusion"], y))
  # The test rows go through the same FittedEnsemble.predict as new image files (the predict command).
  test_pred = final.predict(test_df, per_fold_test)
  test_image_probs, test_fused = test_pred["pred_image"].to_numpy(), test_pred["prediction"].to_numpy()
  test = {k: test_pred[f"pred_{k}"].to_numpy() for k in fusion.STAGES}
  calibrator = final.calibrator
  fusion_sha256 = fitted_lib.save(final, workdir) if distributed.is_primary() else None

  oof_df = pd.DataFrame({"image_name": train_df["image_name"], "patient_id": train_df["patient_id"],
                         "fold": fold_ids, "target": y, "prediction": fused, "pred_image": image_probs,
                         **{f"pred_{k}": v for k, v in oof.items()}})
  test_stages = pd.DataFrame({"image_name": test_df["image_name"], "prediction": test_fused,
                              "pred_image": test_image_probs, **{f"pred_{k}": v for k, v in test.items()}})
  _write_tables(workdir, oof_df, test_stages)

  stage_auc = {"image": metrics.roc_auc(y, image_probs), **{k: metrics.roc_auc(y, oof[k]) for k in fusion.STAGES},
               "fused": metrics.roc_auc(y, fused)}
  labels = _hidden_labels(data_dir, test_df)
  test_auc = None
  if labels is not None:
    test_auc = {"image": _auc(labels, test_image_probs), **{k: _auc(labels, v) for k, v in test.items()},
                "fused": _auc(labels, test_fused)}
  report = _write_report(workdir, oof_df, train_df, seed, {"rule": rule, **choices})
  results = {
      "task": "ensemble", "stage_oof_auc": stage_auc, "test_auc": test_auc,
      "candidate_oof_auc": choices["candidate_oof_auc"], "stages": choices["stages"], "choice_rule": rule,
      "chosen": {k: v["chosen"] for k, v in choices["stages"].items()},
      "fusion_model": choices["stages"]["fusion"]["chosen"],
      "context_feature_oof_auc": context_feature_aucs(train_df, images),
      "image_fold_val_auc": [_auc(y[fold_ids == o.fold], image_probs[fold_ids == o.fold]) for o in per_fold],
      "calibration": {"a": calibrator.a, "b": calibrator.b, "malignant_rate": float(y.mean()),
                      "mean_fused_oof": float(fused.mean()), "mean_fused_test": float(test_fused.mean())},
      "report": {k: v.get("auc") for k, v in report["stages"].items()} if report else None,
      "train_rows": len(train_df), "test_rows": len(test_df),
      "embedding_dims": int(per_fold[0].val_embeddings.shape[1]),
      "fusion_file": fitted_lib.FILE, "fusion_sha256": fusion_sha256, "fold_steps": list(final.fold_steps),
      "data_dir": data_dir, "wall_seconds": time.time() - start}
  write_results(workdir, results, config)
  logging.info("out-of-fold AUC: %s; test AUC: %s", " ".join(f"{k} {v:.4f}" for k, v in stage_auc.items()),
               "-" if test_auc is None else " ".join(f"{k} {v:.4f}" for k, v in test_auc.items() if v is not None))
  return results


def predict(config, workdir):
  """The ensemble predicts as part of its run; a rerun reuses finished folds and their cached outputs."""
  return train(config, workdir)


def train_table(config, workdir):
  """The training table of the run's data (for `--mode=data`)."""
  return sources.resolve(_data_dir(config, workdir)).train_df
