"""Tests of the ISIC archive builder (melanoma_jax/data/isic_archive) on synthetic 2019 and 2018 downloads."""
import contextlib
import io
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from melanoma_jax.data import isic_archive
from melanoma_jax.data import metadata
from melanoma_jax.data import pipeline
from melanoma_jax.data import records
from melanoma_jax.data import synthetic
from melanoma_jax.data.isic_archive import command
from melanoma_jax.data.isic_archive import sites
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

SIZE = 32  # Built image side; the synthetic downloads are drawn at 64 px, so every image is resized.
FILES = {2019: ("ISIC_2019_Training_Input", "ISIC_2019_Training_GroundTruth.csv", "ISIC_2019_Training_Metadata.csv"),
         2018: ("ISIC2018_Task3_Training_Input", "ISIC2018_Task3_Training_GroundTruth.csv", "HAM10000_metadata.csv")}


def _run(argv):
  """The command's (exit status, stdout lines, stderr lines), run in this process."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    status = command.main(argv)
  return status, out.getvalue().splitlines(), err.getvalue().splitlines()


def _argv(year, manual_dir, data_dir, *extra):
  return [f"--year={year}", f"--image_size={SIZE}", f"--manual_dir={manual_dir}", f"--data_dir={data_dir}", *extra]


def _rows(directory, **load_kwargs):
  return [{k: (v.decode() if isinstance(v, bytes) and k != "image" else v) for k, v in r.items()}
          for r in isic_archive.load(directory, **load_kwargs).as_numpy_iterator()]


@pytest.fixture(scope="module")
def downloads(tmp_path_factory):
  """One folder with a 2019 download (24 images, 2 of them 2020 ids) and a 2018 one (14, 3 shared with 2019)."""
  folder = tmp_path_factory.mktemp("archive") / "downloads"
  made = {2019: synthetic.write_archive(folder, 2019, num_images=24, seed=0, image_size=64, num_in_2020=2),
          2018: synthetic.write_archive(folder, 2018, num_images=14, seed=0, image_size=64, num_overlap=3)}
  return folder, made


@pytest.fixture(scope="module")
def built(downloads, tmp_path_factory):
  """{year: (status, stdout lines, stderr lines)} of the command on both downloads, into one data_dir."""
  folder, _ = downloads
  data_dir = tmp_path_factory.mktemp("archive") / "tfds"
  return {year: _run(_argv(year, folder, data_dir)) for year in (2019, 2018)}


def _directory(built, year):
  status, out, err = built[year]
  assert status == 0, err
  return out[-1]


def _copy_layout(downloads, tmp_path, year):
  folder, _ = downloads
  copy = tmp_path / "downloads"
  copy.mkdir()
  shutil.copytree(folder / FILES[year][0], copy / FILES[year][0])
  for name in FILES[year][1:]:
    shutil.copy(folder / name, copy / name)
  return copy


# ---------------------------------------------------------------------------------------------------------
# The synthetic downloads.

def test_synthetic_layouts_overlap_and_refuse_to_overwrite(downloads):
  folder, made = downloads
  classes_2019, classes_2018 = made[2019]["classes"], made[2018]["classes"]
  assert set(classes_2019.values()) == set(isic_archive.CLASSES) - {"UNK"}
  assert set(classes_2018.values()) == set(isic_archive.CLASSES) - {"UNK", "SCC"}
  shared = sorted(set(classes_2019) & set(classes_2018))
  assert len(shared) == 3 and all(classes_2019[i] == classes_2018[i] for i in shared)
  with open(folder / FILES[2019][0] / f"{shared[0]}.jpg", "rb") as a, \
      open(folder / FILES[2018][0] / f"{shared[0]}.jpg", "rb") as b:
    assert a.read() == b.read()  # The same image in both downloads, as in the real archive.
  assert any(n.endswith("_downsampled.jpg") for n in os.listdir(folder / FILES[2019][0]))
  with pytest.raises(InputError, match="already exists"):
    synthetic.write_archive(folder, 2019, num_images=4)


# ---------------------------------------------------------------------------------------------------------
# Building.

def test_every_image_once_with_its_class_and_metadata(downloads, built):
  folder, made = downloads
  in_2020 = set(pd.read_csv(metadata.EMBEDDED_TRAIN_CSV, usecols=["image_name"])["image_name"])
  rows = {year: _rows(_directory(built, year)) for year in (2019, 2018)}
  names = {year: [r["image_name"] for r in rows[year]] for year in rows}
  assert all(len(n) == len(set(n)) for n in names.values())
  assert not set(names[2019]) & set(names[2018])  # Both sets together hold each image once.
  assert set(names[2019]) == set(made[2019]["classes"]) - in_2020
  assert set(names[2018]) == set(made[2018]["classes"]) - set(made[2019]["classes"])
  meta = {2019: pd.read_csv(folder / FILES[2019][2], dtype=str, keep_default_na=False).set_index("image"),
          2018: pd.read_csv(folder / FILES[2018][2], dtype=str, keep_default_na=False).set_index("image_id")}
  site_column, age_column = {2019: "anatom_site_general", 2018: "localization"}, {2019: "age_approx", 2018: "age"}
  for year in (2019, 2018):
    for r in rows[year]:
      diagnosis = made[year]["classes"][r["image_name"]]
      assert isic_archive.CLASSES[r["diagnosis"]] == diagnosis
      assert r["target"] == int(diagnosis == "MEL")
      source = meta[year].loc[r["image_name"]]
      assert r["anatom_site_general_challenge"] == sites.site_2020(source[site_column[year]])
      assert r["anatom_site_general_challenge"] in sites.SITES_2020 + ("",)
      assert r["sex"] == (source["sex"] if source["sex"] in ("male", "female") else "")
      assert r["lesion_id"] == source["lesion_id"]
      age = source[age_column[year]]
      assert (math.isnan(r["age_approx"]) if age == "" else r["age_approx"] == float(age))
  assert any(math.isnan(r["age_approx"]) for r in rows[2019])  # Blanks were drawn, and read as NaN.


def test_site_sex_and_age_mapping():
  expected = {"anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso", "back": "torso",
              "trunk": "torso", "abdomen": "torso", "chest": "torso", "face": "head/neck", "scalp": "head/neck",
              "ear": "head/neck", "neck": "head/neck", "head/neck": "head/neck",
              "upper extremity": "upper extremity", "hand": "upper extremity",
              "lower extremity": "lower extremity", "foot": "lower extremity", "acral": "palms/soles",
              "palms/soles": "palms/soles", "genital": "oral/genital", "oral/genital": "oral/genital",
              "unknown": "", "": "", None: "", float("nan"): "", "elbow crease": ""}
  assert {k: sites.site_2020(k) for k in expected} == expected
  assert [sites.sex(v) for v in ("male", "female", "unknown", "", None)] == ["male", "female", "", "", ""]
  assert math.isnan(sites.age("")) and sites.age("45.0") == 45.0


def test_duplicates_reported_in_output_and_metadata(built):
  _, out_2019, _ = built[2019]
  _, out_2018, _ = built[2018]
  report_2019 = isic_archive.duplicates(_directory(built, 2019))
  report_2018 = isic_archive.duplicates(_directory(built, 2018))
  assert report_2019["excluded"]["in_2020"]["count"] == 2 and report_2019["written"] == 22
  assert report_2019["also_in_2018"]["count"] == 3
  assert report_2018["excluded"]["in_2019"]["count"] == 3 and report_2018["written"] == 11
  assert report_2018["excluded"]["in_2020"]["count"] == 0
  text_2019, text_2018 = "\n".join(out_2019), "\n".join(out_2018)
  assert "22 of 24 listed image(s) written" in text_2019
  assert "left out 2 image(s) also in the 2020 data" in text_2019
  assert all(i in text_2019 for i in report_2019["excluded"]["in_2020"]["ids"])
  assert "left out 3 image(s) also in the 2019 set" in text_2018
  assert all(i in text_2018 for i in report_2018["excluded"]["in_2019"]["ids"])


def test_printed_directory_is_readable_by_tfds(built):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  directory = _directory(built, 2019)
  assert directory.endswith(os.path.join("isic_archive", f"2019_{SIZE}", "1.0.0"))
  read = tfds.builder_from_directory(directory)
  assert read.info.splits["train"].num_examples == 22
  assert read.info.features["image"].shape == (SIZE, SIZE, 3)
  assert list(read.info.features["diagnosis"].names) == list(isic_archive.CLASSES)
  image = next(iter(read.as_dataset(split="train").take(1)))["image"]
  assert image.shape == (SIZE, SIZE, 3)


def test_rebuild_reuses_and_reports(downloads, built):
  folder, _ = downloads
  directory = _directory(built, 2019)
  status, out, _ = _run(_argv(2019, folder, os.path.dirname(os.path.dirname(os.path.dirname(directory)))))
  assert status == 0 and out[-1] == directory and "22 of 24" in out[0]


def test_python_m_command_prints_the_directory_last(downloads, built):
  # One run in a fresh process (the other tests call command.main in this one, for time): the module's wiring.
  folder, _ = downloads
  directory = _directory(built, 2018)
  data_dir = os.path.dirname(os.path.dirname(os.path.dirname(directory)))
  done = subprocess.run([sys.executable, "-m", "melanoma_jax.data.isic_archive", *_argv(2018, folder, data_dir)],
                        capture_output=True, text=True, check=False, timeout=120)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.splitlines()[-1] == directory


def test_exclude_2020_option_and_2018_alone(downloads, tmp_path):
  folder, made = downloads
  first = sorted(made[2018]["classes"])[-1]  # A 2018-only image, named in a stand-in 2020 table.
  table = tmp_path / "train.csv"
  pd.DataFrame({"image_name": [first, "ISIC_0000000"], "target": [0, 0]}).to_csv(table, index=False)
  alone = _copy_layout(downloads, tmp_path, 2018)  # Without the 2019 download: nothing to leave out for it.
  status, out, err = _run(_argv(2018, alone, tmp_path / "tfds", f"--exclude_2020={table}"))
  assert status == 0, err
  report = isic_archive.duplicates(out[-1])
  assert {k: v for k, v in report["excluded"]["in_2020"].items() if k != "source_sha256"} == {
      "count": 1, "ids": [first], "source": str(table)}
  assert report["2019_download"] == "absent" and report["written"] == 13
  assert any("images the 2019 set also holds were not checked" in line for line in out)
  status, out, err = _run(_argv(2018, alone, tmp_path / "tfds"))  # The same set, asked for with 2020's table.
  assert status == 1 and len(err) == 1 and "already built leaving out the ids of another 2020 table" in err[0]


def _drop_ground_truth(copy):
  os.remove(copy / FILES[2019][1])
  return FILES[2019][1], "file not found"


def _drop_metadata(copy):
  os.remove(copy / FILES[2019][2])
  return FILES[2019][2], "file not found"


def _drop_image(copy):
  name = sorted(os.listdir(copy / FILES[2019][0]))[-1]
  os.remove(copy / FILES[2019][0] / name)
  return name, "is absent"


def _corrupt_image(copy):
  name = sorted(os.listdir(copy / FILES[2019][0]))[-2]  # Not one of the 2020 ids, which are never read.
  with open(copy / FILES[2019][0] / name, "wb") as f:
    f.write(b"\xff\xd8 not a JPEG")
  return name, "corrupt or unreadable image"


def _two_classes(copy):
  truth = pd.read_csv(copy / FILES[2019][1])
  truth.loc[5, "NV"] = 1.0 - truth.loc[5, "NV"]  # Row 5 gains or loses a 1: two classes or none.
  truth.to_csv(copy / FILES[2019][1], index=False, float_format="%.1f")
  return FILES[2019][1], "(line 7) is not one-hot"


@pytest.mark.parametrize("damage", [_drop_ground_truth, _drop_metadata, _drop_image, _corrupt_image, _two_classes],
                         ids=["missing_ground_truth", "missing_metadata", "absent_image", "unreadable_jpeg",
                              "not_one_hot"])
def test_bad_download_is_one_line_naming_the_file(downloads, tmp_path, damage):
  copy = _copy_layout(downloads, tmp_path, 2019)
  name, problem = damage(copy)
  data_dir = tmp_path / "tfds"
  status, out, err = _run(_argv(2019, copy, data_dir))
  assert status == 1 and not out
  assert len(err) == 1 and err[0].startswith("error: ") and name in err[0] and problem in err[0], err
  assert not os.path.exists(data_dir / "isic_archive" / f"2019_{SIZE}" / "1.0.0")  # Nothing that looks built,
  assert not [n for n in os.listdir(data_dir / "isic_archive" / f"2019_{SIZE}") if "incomplete" in n]  # nor half.


def test_configs():
  assert isic_archive.config_for(2019, 512) is next(c for c in isic_archive.IsicArchive.BUILDER_CONFIGS
                                                    if c.name == "2019_512")
  custom = isic_archive.config_for("2018", 300)
  assert (custom.name, custom.year, custom.image_size) == ("2018_300", 2018, 300)
  with pytest.raises(InputError, match="year must be one of 2018, 2019"):
    isic_archive.config_for(2017, 512)
  assert "ISIC_2019_Training_GroundTruth.csv" in isic_archive.MANUAL_DOWNLOAD_INSTRUCTIONS


# ---------------------------------------------------------------------------------------------------------
# The reader.

def test_reader_matches_the_2020_parser(downloads, built, tmp_path):
  folder, _ = downloads
  frame = pd.DataFrame({"image_name": ["ISIC_1"], "patient_id": ["IP_1"], "sex": ["male"], "age_approx": [40.0],
                        "anatom_site_general_challenge": ["torso"], "diagnosis": ["nevus"], "target": [0]})
  jpeg = records.load_resized_jpeg(str(folder / FILES[2019][0] / os.listdir(folder / FILES[2019][0])[0]), SIZE)
  files = records.write_resized_records(frame, [jpeg], tmp_path, "train", 1, records.fit_codes(frame))
  parsed = pipeline._records(files).element_spec  # pylint: disable=protected-access
  directory = _directory(built, 2019)
  spec = isic_archive.load(directory).element_spec
  for key in ("image", "image_name"):
    assert spec[key] == parsed[key], key
  assert spec["target"].dtype == tf().int64 and spec["diagnosis"].dtype == tf().int64  # As the target lookup.
  assert set(spec) == set(isic_archive.reader.FEATURES)
  raw = next(iter(isic_archive.load(directory)))
  decoded = next(iter(isic_archive.load(directory, image_size=SIZE)))
  np.testing.assert_array_equal(decoded["image"].numpy(), pipeline.decode_image(raw["image"], SIZE).numpy())
  assert decoded["image"].dtype == tf().float32 and decoded["image"].shape == (SIZE, SIZE, 3)
  # The bytes are what the TFRecord converter's resizing makes of the download's JPEG.
  source = folder / FILES[2019][0] / f"{raw['image_name'].numpy().decode()}.jpg"
  if not source.exists():
    source = folder / FILES[2019][0] / f"{raw['image_name'].numpy().decode()}_downsampled.jpg"
  assert raw["image"].numpy() == records.load_resized_jpeg(str(source), SIZE)


def test_process_shares_are_disjoint_and_cover(built):
  directory = _directory(built, 2019)
  everything = [r["image_name"] for r in _rows(directory)]
  shares = [[r["image_name"] for r in _rows(directory, process_index=i, process_count=3)] for i in range(3)]
  assert sorted(sum(shares, [])) == sorted(everything)
  assert all(not set(a) & set(b) for i, a in enumerate(shares) for b in shares[i + 1:])
  assert max(map(len, shares)) - min(map(len, shares)) <= 1
  with pytest.raises(InputError, match="process_index"):
    isic_archive.load(directory, process_index=3, process_count=3)


def test_reader_refuses_a_folder_that_is_not_a_built_set(tmp_path):
  with pytest.raises(InputError, match="not a built dataset directory"):
    isic_archive.load(tmp_path)
