"""Tests of W/fusion.zip (ensemble/fitted.py): exact round trips, and one-line refusals of missing, corrupt,
other-version, tampered and old pickled files, none of which runs the code a tampered file carries."""
import io
import json
import os
import pathlib
import pickle
import re
import zipfile

import numpy as np
import pandas as pd
import pytest
import skops.io as sio
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression

from melanoma_jax.data import folds as folds_lib
from melanoma_jax.ensemble import fitted, fusion, task
from melanoma_jax.evaluation import calibration
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "melanoma_jax"
# Each stage's family and inputs: both families, a gradient-boosting and a logistic stage each with tabular
# inputs, image columns of two different sets.
CANDIDATES = {"tabular": "hgb", "image_context": "hgb", "fusion": "logistic"}
INPUTS = {"tabular": fusion.Inputs((), True), "image_context": fusion.Inputs(fusion.IMAGE_SETS["style"], False),
          "fusion": fusion.Inputs(fusion.IMAGE_SETS["all"], True)}


def _table(n_patients, seed):
  """A small metadata table: patients with 3-8 images, about a quarter malignant."""
  rng = np.random.default_rng(seed)
  rows = []
  for p in range(n_patients):
    for i in range(rng.integers(3, 9)):
      rows.append({"image_name": f"I{seed}_{p}_{i}", "patient_id": f"P{seed}_{p}",
                   "sex": rng.choice(["male", "female", None]), "age_approx": float(rng.integers(3, 9) * 10),
                   "anatom_site_general_challenge": rng.choice(["torso", "head/neck", "upper extremity"]),
                   "target": int(rng.uniform() < 0.25)})
  return pd.DataFrame(rows)


def _fold_outputs(df, folds, seed, dims=6):
  """[(probabilities, embeddings)] of `folds` made-up fold models: embeddings share a per-patient offset."""
  rng = np.random.default_rng(seed)
  offsets = {p: rng.normal(size=dims) for p in df["patient_id"].unique()}
  base = np.stack([offsets[p] for p in df["patient_id"]])
  return [(rng.uniform(0.02, 0.98, len(df)), base + 0.3 * rng.normal(size=(len(df), dims))) for _ in range(folds)]


@pytest.fixture(scope="module")
def ensemble():
  """(FittedEnsemble with hgb and logistic stages, test table, per-fold test outputs), fitted once."""
  with pytest.MonkeyPatch.context() as patch:
    # A short boosting run with small leaves, so the trees really split on these few rows.
    patch.setitem(fusion.FAMILIES, "hgb", lambda seed: HistGradientBoostingClassifier(
        max_iter=20, min_samples_leaf=5, random_state=seed))
    train, test = _table(40, 0), _table(12, 1)
    fold_ids = folds_lib.assign_folds(train, 3, 0)
    y = train["target"].to_numpy()
    rng = np.random.default_rng(2)
    images = rng.normal(size=(len(train), len(fusion.IMAGE_COLUMNS))) + y[:, None]
    stages = {name: fusion.Stage(INPUTS[name], candidate, seed).fit(train, images, y)
              for seed, (name, candidate) in enumerate(CANDIDATES.items())}
    oof, _ = fusion.candidate_oof(fusion.Candidate("all", True, "logistic"), train, images, y, fold_ids)
  per_fold_test = _fold_outputs(test, 3, 3)
  final = fitted.FittedEnsemble((0, 1, 2), (30, 31, 32), task.test_spaces(test, per_fold_test), stages,
                                calibration.PlattCalibrator.fit(oof, y))
  return final, test, per_fold_test


def _saved(ensemble, workdir):
  return workdir / fitted.FILE, fitted.save(ensemble[0], str(workdir))


def _members(path):
  with zipfile.ZipFile(path) as archive:
    return {name: archive.read(name) for name in archive.namelist()}


def _rewrite(path, **replace):
  """Rewrites the zip at `path` with members replaced (name with '.' as '__', e.g. stage_fusion__skops)."""
  members = _members(path)
  members.update({name.replace("__", "."): data for name, data in replace.items()})
  with zipfile.ZipFile(path, "w") as archive:
    for name, data in members.items():
      archive.writestr(name, data)


def _refusal(workdir, pattern):
  """Asserts fitted.load(workdir) raises a one-line InputError that names the file and matches `pattern`."""
  with pytest.raises(InputError) as info:
    fitted.load(str(workdir))
  message = str(info.value)
  assert "\n" not in message and re.search(pattern, message), message
  return message


class _MakesDirectory:
  """Unpickled (or built by skops, when trusted), it creates the folder `marker`: proof that code ran."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return os.makedirs, (self.marker,)

  def __setstate__(self, state):
    os.makedirs(state["marker"])
    self.__dict__.update(state)


def _pickle_payload(marker, proof):
  """Pickled bytes that create the folder `marker` when loaded; shown live by loading a twin for `proof`."""
  pickle.loads(pickle.dumps(_MakesDirectory(proof)))
  assert proof.is_dir()
  return pickle.dumps(_MakesDirectory(marker))


# ---------------------------------------------------------------------------------------------------------
# Round trip.

def test_a_round_trip_predicts_exactly_the_same(ensemble, tmp_path):
  final, test, per_fold_test = ensemble
  path, digest = _saved(ensemble, tmp_path)
  assert fitted.FILE == "fusion.zip" and fitted.VERSION == 3
  assert digest == files.sha256(path) and sorted(os.listdir(tmp_path)) == [fitted.FILE]  # No temporary left.
  assert set(_members(path)) == {fitted.DOCUMENT, fitted.SPACES, "stage_tabular.skops",
                                 "stage_image_context.skops", "stage_fusion.skops"}
  loaded = fitted.load(str(tmp_path))
  assert loaded.folds == (0, 1, 2) and loaded.fold_steps == (30, 31, 32) and loaded.version == 3
  assert loaded.calibrator == final.calibrator
  assert list(loaded.stages) == list(CANDIDATES)
  for name, stage in loaded.stages.items():
    original = final.stages[name]
    assert (stage.inputs, stage.family, stage.seed) == (original.inputs, original.family, original.seed)
    assert stage.preprocessor == original.preprocessor and type(stage.estimator) is type(original.estimator)
  for mine, theirs in zip(loaded.spaces, final.spaces):
    for field in ("mean", "scale", "style", "principal"):
      np.testing.assert_array_equal(getattr(mine, field), getattr(theirs, field))
  before, after = final.predict(test, per_fold_test), loaded.predict(test, per_fold_test)
  assert list(before.columns) == ["pred_image", "pred_tabular", "pred_image_context", "pred_fusion", "prediction"]
  assert before["pred_tabular"].nunique() > 5  # The trees split: their round trip is really exercised.
  pd.testing.assert_frame_equal(before, after, check_exact=True)


def test_the_description_is_plain_json_and_the_arrays_need_no_pickle(ensemble, tmp_path):
  path, _ = _saved(ensemble, tmp_path)
  members = _members(path)
  document = json.loads(members[fitted.DOCUMENT])
  assert document["version"] == 3 and document["folds"] == [0, 1, 2]
  assert document["calibrator"] == {"a": ensemble[0].calibrator.a, "b": ensemble[0].calibrator.b}
  assert document["stages"]["fusion"]["preprocessor"] == ensemble[0].stages["fusion"].preprocessor.to_dict()
  assert document["stages"]["image_context"]["preprocessor"] is None
  with np.load(io.BytesIO(members[fitted.SPACES]), allow_pickle=False) as arrays:
    assert sorted(arrays) == sorted(f"{f}_{k}" for f in ("mean", "scale", "style", "principal") for k in range(3))
  for name, candidate in CANDIDATES.items():
    data = members[f"stage_{name}.skops"]
    assert set(sio.get_untrusted_types(data=data)) <= set(fitted.TRUSTED_TYPES[candidate])


def test_no_code_loading_reader_is_left_in_the_package():
  banned = re.compile(r"pickle\.loads?\(|joblib\.load|allow_pickle\s*=\s*True|read_pickle|dill\.load|"
                      r"cloudpickle\.load|marshal\.loads?\(")
  found = [f"{p}:{n}" for p in sorted(PACKAGE.rglob("*.py"))
           for n, line in enumerate(p.read_text().splitlines(), 1) if banned.search(line)]
  assert not found


# ---------------------------------------------------------------------------------------------------------
# Refusals, each one line naming the file.

def test_a_missing_file_is_refused_with_the_rerun_advice(tmp_path):
  _refusal(tmp_path, rf"^{re.escape(str(tmp_path / fitted.FILE))}: missing .*rerun the same main.py command on "
                     r"this workdir: finished folds and their cached outputs are reused$")


def test_an_old_pickle_alone_is_refused_unloaded_and_replaced_by_a_refit(ensemble, tmp_path):
  marker = tmp_path / "ran"
  (tmp_path / fitted.LEGACY_FILE).write_bytes(_pickle_payload(marker, tmp_path / "proof"))
  _refusal(tmp_path, rf"^{re.escape(str(tmp_path / 'fusion.pkl'))}: an ensemble fitted by an older version, "
                     r"saved as a pickle, which this version never loads .*rerun the same main.py command on this "
                     r"workdir to refit it from the cached fold outputs")
  assert not marker.exists()
  _saved(ensemble, tmp_path)  # The refit: the new file replaces the pickle.
  assert not (tmp_path / fitted.LEGACY_FILE).exists()
  assert fitted.load(str(tmp_path)).folds == (0, 1, 2) and not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "flipped", "pickle", "not_json",
                                    "no_estimator", "no_spaces", "bad_space", "bad_stage"])
def test_a_corrupt_or_truncated_file_is_refused(ensemble, tmp_path, damage):
  path, _ = _saved(ensemble, tmp_path)
  data = path.read_bytes()
  marker = tmp_path / "ran"
  if damage == "empty":
    path.write_bytes(b"")
  elif damage == "truncated":
    path.write_bytes(data[:len(data) // 2])
  elif damage == "garbage":
    path.write_bytes(np.random.default_rng(0).bytes(4096))
  elif damage == "flipped":  # Bytes changed inside a member: its CRC no longer matches.
    middle = len(data) // 2
    path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 8]) + data[middle + 8:])
  elif damage == "pickle":  # The whole file a pickle under the new name.
    path.write_bytes(_pickle_payload(marker, tmp_path / "proof"))
  else:
    document = json.loads(_members(path)[fitted.DOCUMENT])
    if damage == "not_json":
      _rewrite(path, fitted__json=b"{\"format\": ")
    elif damage == "no_estimator":
      members = _members(path)
      del members["stage_fusion.skops"]
      with zipfile.ZipFile(path, "w") as archive:
        for name, member in members.items():
          archive.writestr(name, member)
    elif damage == "no_spaces":
      document["spaces"] = 4
      _rewrite(path, fitted__json=json.dumps(document).encode())
    elif damage == "bad_space":
      buffer = io.BytesIO()
      np.savez(buffer, **{f"{f}_{k}": np.zeros((2, 2)) for f in ("mean", "scale", "style", "principal") for k in range(3)})
      _rewrite(path, spaces__npz=buffer.getvalue())
    elif damage == "bad_stage":
      document["stages"]["fusion"]["inputs"] = {"image": "yes", "tabular": True}
      _rewrite(path, fitted__json=json.dumps(document).encode())
  _refusal(tmp_path, rf"^{re.escape(str(path))}: unreadable, corrupt or truncated \(\w+: .*\); rerun the same "
                     r"main.py command on this workdir to rewrite it$")
  assert not marker.exists()


@pytest.mark.parametrize("version", [2, 4, "3", None])
def test_another_format_version_is_refused(ensemble, tmp_path, version):
  path, _ = _saved(ensemble, tmp_path)
  document = json.loads(_members(path)[fitted.DOCUMENT])
  document["version"] = version
  _rewrite(path, fitted__json=json.dumps(document).encode())
  _refusal(tmp_path, rf"^{re.escape(str(path))}: format version {re.escape(repr(version))}, this code reads 3; "
                     r"rerun the same main.py command on this workdir to rewrite it$")


def test_a_file_of_another_format_is_refused(ensemble, tmp_path):
  path, _ = _saved(ensemble, tmp_path)
  _rewrite(path, fitted__json=json.dumps({"format": "something else", "version": 3}).encode())
  _refusal(tmp_path, r"fusion.zip: fitted.json is not a fitted ensemble's description$")


def test_a_pickle_in_place_of_an_estimator_is_refused_without_running_it(ensemble, tmp_path):
  path, _ = _saved(ensemble, tmp_path)
  marker = tmp_path / "ran"
  _rewrite(path, stage_fusion__skops=_pickle_payload(marker, tmp_path / "proof"))
  _refusal(tmp_path, r"fusion.zip: unreadable, corrupt or truncated \(BadZipFile: ")
  assert not marker.exists()


def test_an_estimator_of_untrusted_types_is_refused_without_running_it(ensemble, tmp_path):
  path, _ = _saved(ensemble, tmp_path)
  marker = tmp_path / "ran"
  payload = sio.dumps(_MakesDirectory(marker))
  # The payload is live: trusting its type, skops builds it and it creates its folder.
  sio.loads(sio.dumps(_MakesDirectory(tmp_path / "proof")), trusted=sio.get_untrusted_types(data=payload))
  assert (tmp_path / "proof").is_dir()
  _rewrite(path, stage_image_context__skops=payload)
  _refusal(tmp_path, r"fusion.zip: stage_image_context.skops names types a hgb estimator is not made of "
                     r"\(\S*_MakesDirectory\); refused unloaded, as a tampered file")
  assert not marker.exists()


def test_only_the_types_of_the_stages_own_estimator_are_trusted(ensemble, tmp_path):
  path, _ = _saved(ensemble, tmp_path)
  x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
  # Types skops would load by default, but not the logistic stage's own estimator's.
  for other, name in [(DummyClassifier().fit(x, y), "sklearn.dummy.DummyClassifier"),
                      (HistGradientBoostingClassifier(max_iter=2).fit(x, y), "numpy.random.PCG64")]:
    _rewrite(path, stage_fusion__skops=sio.dumps(other))
    _refusal(tmp_path, rf"stage_fusion.skops names types a logistic estimator is not made of \(.*{name}")
  assert sio.get_untrusted_types(data=sio.dumps(DummyClassifier().fit(x, y))) == []


def test_an_estimator_that_does_not_fit_its_stage_is_refused(ensemble, tmp_path):
  path, _ = _saved(ensemble, tmp_path)
  x, y = np.random.default_rng(0).normal(size=(20, 3)), np.arange(20) % 2
  _rewrite(path, stage_fusion__skops=sio.dumps(LogisticRegression().fit(x, y)))
  _refusal(tmp_path, r"stage_fusion.skops: a LogisticRegression over 3 features, the logistic stage needs a "
                     r"LogisticRegression over \d+; refused as a tampered file$")
  logistic = sio.loads(_members(_saved(ensemble, tmp_path)[0])["stage_fusion.skops"],
                       trusted=list(fitted.TRUSTED_TYPES["logistic"]))
  logistic.coef_ = logistic.coef_[:, :3]
  _rewrite(path, stage_fusion__skops=sio.dumps(logistic))
  _refusal(tmp_path, r"stage_fusion.skops: logistic model with coefficients, intercept, classes of shapes "
                     r"\(\(1, 3\), \(1,\), \(2,\)\); refused as a tampered file$")


@pytest.mark.parametrize("field, value", [("left", 10 ** 6), ("right", 0), ("feature_idx", 500),
                                          ("is_categorical", 1)])
def test_gradient_boosting_trees_that_point_out_of_bounds_are_refused(ensemble, tmp_path, field, value):
  path, _ = _saved(ensemble, tmp_path)
  hgb = sio.loads(_members(path)["stage_tabular.skops"], trusted=list(fitted.TRUSTED_TYPES["hgb"]))
  tree = next(p for per_iteration in hgb._predictors for p in per_iteration if not p.nodes["is_leaf"][0])
  tree.nodes[field][0] = value  # The root: an inner node.
  _rewrite(path, stage_tabular__skops=sio.dumps(hgb))
  _refusal(tmp_path, r"stage_tabular.skops: hgb model with tree \d+ pointing outside itself.*; refused as a "
                     r"tampered file$")
