"""Metadata validation, leakage refusal, patient-grouped folds, TFRecord layouts and corrupt files."""
import io
import os
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_jax.data import folds, metadata, records, sources
from melanoma_jax.utils.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _jpeg(seed, size=16):
  rng = np.random.default_rng(seed)
  buffer = io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buffer, format="JPEG")
  return buffer.getvalue()


@pytest.fixture(scope="module")
def real_train(real_train_csv):
  return metadata.load_metadata(real_train_csv)


@pytest.fixture(scope="module")
def real_test(real_test_csv):
  return metadata.load_metadata(real_test_csv, "test")


# --------------------------------------------------------------------------------------------- metadata
def test_real_metadata_loads_with_missing_values_kept(real_train, real_test):
  assert len(real_train) == 33126 and int(real_train["target"].sum()) == 584
  assert real_train["patient_id"].nunique() == 2056 and len(real_test) == 10982
  assert real_train["sex"].isna().sum() == 65
  assert real_train["age_approx"].isna().sum() == 68
  assert real_train["anatom_site_general_challenge"].isna().sum() == 527


def _write(tmp_path, df, name="train.csv"):
  path = tmp_path / name
  df.to_csv(path, index=False)
  return path


@pytest.mark.parametrize("mutate, message", [
    (lambda df: df.drop(columns=["patient_id"]), "missing required column(s) patient_id"),
    (lambda df: pd.concat([df, df.iloc[:1]]), "image_name has 1 duplicate"),
    (lambda df: df.assign(target=[0, 2, 1]), "target must be 0 or 1"),
    (lambda df: df.assign(age_approx=["45", "old", "50"]), "age_approx has non-numeric value 'old'"),
    (lambda df: df.iloc[:0], "no rows"),
])
def test_metadata_errors_name_file_and_column(tmp_path, real_train, mutate, message):
  path = _write(tmp_path, mutate(real_train.head(3).copy()))
  with pytest.raises(InputError, match="train.csv") as error:
    metadata.load_metadata(path)
  assert message in str(error.value)


def test_missing_metadata_file(tmp_path):
  with pytest.raises(InputError, match="nowhere.csv: metadata file not found"):
    metadata.load_metadata(tmp_path / "nowhere.csv")


def test_leakage_check_refuses_shared_patients(real_train, real_test):
  assert "none shared" in metadata.check_leakage(real_train, real_test)
  leaking = pd.concat([real_test, real_train.iloc[:3][list(metadata.BASE_COLUMNS)]], ignore_index=True)
  with pytest.raises(InputError, match=r"3 patient_id\(s\) in both train and test.*IP_7279968"):
    metadata.check_leakage(real_train, leaking)


def test_main_data_mode_refuses_leakage(tmp_path, real_train, real_test):
  """The `main.py` leakage step: a one-line error and a non-zero exit."""
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  real_train.head(50).to_csv(data_dir / "train.csv", index=False)
  leak = pd.concat([real_test.head(5), real_train.head(2)[list(metadata.BASE_COLUMNS)]])
  leak.to_csv(data_dir / "test.csv", index=False)
  proc = subprocess.run(
      [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={tmp_path / 'w'}",
       f"--config.data_dir={data_dir}", "--mode=data", "--jax_cache_dir="],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and "data leakage" in last and "Traceback" not in proc.stderr


# --------------------------------------------------------------------------------------------- folds
def test_folds_group_patients_and_stratify(real_train):
  fold_ids = folds.assign_folds(real_train, num_folds=5, seed=0)
  per_patient = pd.Series(fold_ids).groupby(real_train["patient_id"].to_numpy()).nunique()
  assert per_patient.max() == 1  # No patient in two folds.
  summary = folds.fold_summary(real_train, fold_ids)
  overall = real_train["target"].mean()
  assert len(summary) == 5
  assert np.all(np.abs(summary["rate"] - overall) < 0.002), summary
  assert np.all(np.abs(summary["images"] / len(real_train) - 0.2) < 0.01), summary
  np.testing.assert_array_equal(fold_ids, folds.assign_folds(real_train, 5, seed=0))
  assert not np.array_equal(fold_ids, folds.assign_folds(real_train, 5, seed=1))


def test_fold_errors(real_train):
  with pytest.raises(InputError, match="num_folds"):
    folds.assign_folds(real_train, num_folds=1)
  folds.check_folds_have_both_classes(real_train, folds.assign_folds(real_train, 5, seed=0), range(5))
  subset = real_train.head(200)
  fold_ids = folds.assign_folds(subset, num_folds=5, seed=0)
  with pytest.raises(InputError, match="fold 2 of 5 leaves the validation split with only one class"):
    folds.check_folds_have_both_classes(subset.assign(target=(fold_ids != 2).astype(int)), fold_ids, [2])
  with pytest.raises(InputError, match="fold 1 of 5 leaves the training split with only one class"):
    only_in_fold_1 = (np.arange(200) == np.flatnonzero(fold_ids == 1)[0]).astype(int)
    folds.check_folds_have_both_classes(subset.assign(target=only_in_fold_1), fold_ids, [1])


# --------------------------------------------------------------------------------------------- records
def test_resized_layout_round_trip(tmp_path, real_train, real_test):
  train = real_train[real_train["sex"].isna() | real_train["anatom_site_general_challenge"].isna()].head(4)
  train = pd.concat([train, real_train[real_train["target"] == 1].head(3)], ignore_index=True)
  test = real_test.head(3)
  codes = records.fit_codes(real_train, real_test)
  images = [_jpeg(i) for i in range(len(train))]
  paths = records.write_resized_records(train, images, tmp_path, "train", 2, codes)
  test_paths = records.write_resized_records(test, [_jpeg(10 + i) for i in range(3)], tmp_path, "test", 1,
                                             codes)
  records.save_codes(codes, tmp_path / "codes.json")
  assert [os.path.basename(p) for p in paths] == ["train00-4.tfrec", "train01-3.tfrec"]
  assert records.detect_layout(paths[0]) == "resized"
  loaded_codes = records.load_codes(tmp_path / "codes.json")
  got = [e for p in paths for e in records.read_examples(p, loaded_codes)]
  assert [e["image"] for e in got] == images
  for example, (_, row) in zip(got, train.iterrows()):
    for field in ("image_name", "patient_id", "sex", "anatom_site_general_challenge", "diagnosis", "target"):
      want = None if pd.isna(row[field]) else row[field]
      assert example[field] == want, field
    assert example["age_approx"] == (None if pd.isna(row["age_approx"]) else row["age_approx"])
  test_got = list(records.read_examples(test_paths[0]))
  assert [sorted(e) for e in test_got] == [["image", "image_name"]] * 3
  assert [e["image_name"] for e in test_got] == list(test["image_name"])


def test_competition_layout_round_trip_joins_csv(tmp_path, real_train):
  train = real_train.head(5)
  images = [_jpeg(i) for i in range(5)]
  paths = records.write_competition_records(train, images, tmp_path / "tfrecords", "train", 1)
  assert records.detect_layout(paths[0]) == "competition"
  got = list(records.read_examples(paths[0], table=train))
  assert [e["image"] for e in got] == images
  for example, (_, row) in zip(got, train.iterrows()):
    assert example["target"] == row["target"] and example["patient_id"] == row["patient_id"]
    assert example["sex"] == (None if pd.isna(row["sex"]) else row["sex"])
  # A data_dir in the Kaggle layout (CSVs beside tfrecords/) resolves to those files.
  train.to_csv(tmp_path / "train.csv", index=False)
  metadata.load_metadata(metadata.EMBEDDED_TEST_CSV, "test").head(2).to_csv(tmp_path / "test.csv", index=False)
  records.write_competition_records(pd.read_csv(tmp_path / "test.csv"), images[:2], tmp_path / "tfrecords",
                                    "test", 1)
  data = sources.resolve(str(tmp_path))
  assert data.layout == "competition" and data.train_files == paths


def test_truncated_and_garbage_records_name_the_file(tmp_path, real_train):
  path = records.write_resized_records(real_train.head(3), [_jpeg(i) for i in range(3)], tmp_path, "train",
                                       1, records.fit_codes(real_train.head(3)))[0]
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) - 7)
  with pytest.raises(InputError, match=r"train00-3.tfrec: corrupt or truncated TFRecord after 2 good"):
    list(records.read_examples(path))
  garbage = tmp_path / "train99-1.tfrec"
  garbage.write_bytes(b"this is not a tfrecord file at all")
  with pytest.raises(InputError, match="train99-1.tfrec: corrupt or truncated"):
    records.detect_layout(str(garbage))
  with pytest.raises(InputError, match="no test\\*.tfrec files"):
    records.list_record_files(str(tmp_path), "test")


def test_converter_cli_from_jpeg_folder(tmp_path, real_train):
  rows = real_train.head(4)
  images_dir = tmp_path / "jpeg"
  images_dir.mkdir()
  for i, name in enumerate(rows["image_name"]):
    Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(images_dir / f"{name}.jpg")
  rows.to_csv(tmp_path / "train.csv", index=False)
  out = tmp_path / "out"
  assert records.main(["--csv", str(tmp_path / "train.csv"), "--images", str(images_dir), "--out", str(out),
                       "--size", "24", "--num-shards", "2"]) == 0
  codes = records.load_codes(out / records.CODES_FILE)
  got = [e for p in records.list_record_files(str(out), "train") for e in records.read_examples(p, codes)]
  assert [e["image_name"] for e in got] == list(rows["image_name"])
  assert Image.open(io.BytesIO(got[0]["image"])).size == (24, 24)
  # A corrupt JPEG: named in a one-line error, or skipped and counted when asked.
  (images_dir / f"{rows['image_name'].iloc[2]}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
  with pytest.raises(InputError, match=f"{rows['image_name'].iloc[2]}.jpg: corrupt or unreadable image"):
    records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path / "out1", 24)
  summary = records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path / "out2", 24, skip_corrupt=True)
  assert summary["written"] == 3 and summary["skipped"] == 1


def _jpeg_folder(tmp_path, rows):
  images_dir = tmp_path / "jpeg"
  images_dir.mkdir()
  for i, name in enumerate(rows["image_name"]):
    Image.fromarray(np.full((30, 40, 3), 40 * i, np.uint8)).save(images_dir / f"{name}.jpg")
  return images_dir


def test_converter_never_writes_over_its_inputs(tmp_path, real_train):
  rows = real_train.head(4)
  images_dir = _jpeg_folder(tmp_path, rows)
  rows.to_csv(tmp_path / "train.csv", index=False)
  before = (tmp_path / "train.csv").read_bytes()
  with pytest.raises(InputError, match="--out would write over the input CSV"):
    records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path, 24)
  assert (tmp_path / "train.csv").read_bytes() == before
  # Shards of an earlier conversion (another shard count) would be read beside the new ones: refused.
  records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path / "out", 24, num_shards=2)
  with pytest.raises(InputError, match=r"already holds 2 train\*.tfrec shard\(s\)"):
    records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path / "out", 24, num_shards=1)
  # The test split reuses the training split's codes.json in the same folder: read, not rewritten.
  test_rows = real_train.head(2).drop(columns=["target"])
  test_rows.to_csv(tmp_path / "test.csv", index=False)
  codes = tmp_path / "out" / records.CODES_FILE
  stamp = codes.stat().st_mtime_ns
  records.convert_folder(tmp_path / "test.csv", images_dir, tmp_path / "out", 24, split="test", codes_path=codes)
  assert codes.stat().st_mtime_ns == stamp


@pytest.mark.parametrize("name", ["../outside", "/etc/passwd", "sub/dir", ".."])
def test_converter_reads_only_inside_the_images_folder(tmp_path, real_train, name):
  rows = real_train.head(3).copy()
  images_dir = _jpeg_folder(tmp_path, rows)
  rows.loc[1, "image_name"] = name
  rows.to_csv(tmp_path / "train.csv", index=False)
  with pytest.raises(InputError, match=f"image_name '{re.escape(name)}' at line 3 is not a plain file name"):
    records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path / "out", 24, skip_corrupt=True)
  assert not (tmp_path / "out").exists()


def test_converter_skips_decompression_bombs_and_missing_images(tmp_path, real_train, monkeypatch):
  from PIL import Image as PILImage  # pylint: disable=g-import-not-at-top
  rows = real_train.head(4)
  images_dir = _jpeg_folder(tmp_path, rows)
  PILImage.fromarray(np.zeros((200, 200, 3), np.uint8)).save(images_dir / f"{rows['image_name'].iloc[1]}.jpg")
  os.remove(images_dir / f"{rows['image_name'].iloc[3]}.jpg")
  rows.to_csv(tmp_path / "train.csv", index=False)
  # Pillow refuses images above twice MAX_IMAGE_PIXELS; a small limit makes the 200x200 image one.
  monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
  with pytest.raises(InputError, match="refused as a possible decompression bomb"):
    records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path / "out1", 24)
  summary = records.convert_folder(tmp_path / "train.csv", images_dir, tmp_path / "out2", 24, skip_corrupt=True)
  assert summary["written"] == 2 and summary["skipped"] == 2
