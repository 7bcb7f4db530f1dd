"""Tests of the synthetic lesion generator: determinism, real metadata rows, records, reuse."""
import glob
import hashlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_jax.data import metadata
from melanoma_jax.data import records
from melanoma_jax.data import synthetic
from melanoma_jax.data.synthetic import __main__ as synthetic_cli
from melanoma_jax.utils.errors import InputError

SIZE = 32
# A tiny dataset: 5 train patients (at least 2 malignant images), 2 test patients, 32 px, 2 shards.
TINY = dict(num_patients=5, num_test_patients=2, image_size=SIZE, seed=0, min_malignant=2, num_shards=2)


def _decode(jpeg):
  return np.asarray(Image.open(io.BytesIO(jpeg)))


def _examples(out_dir, split, codes=None):
  return [ex for path in sorted(glob.glob(os.path.join(out_dir, f"{split}*.tfrec")))
          for ex in records.read_examples(path, codes)]


def _read_bytes(path):
  with open(path, "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def train_df(real_train_csv):
  return metadata.load_metadata(real_train_csv, "train")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("synthetic") / "tiny"
  return synthetic.generate_dataset(out_dir, **TINY)


# ---------------------------------------------------------------------------------------------------------
# Rendering.

def test_render_lesion_shape_dtype_and_determinism():
  style = synthetic.patient_style(0, "IP_1")
  first = synthetic.render_lesion(synthetic.stable_rng(0, "ISIC_1", 1), style, True, 40)
  again = synthetic.render_lesion(synthetic.stable_rng(0, "ISIC_1", 1), style, True, 40)
  other = synthetic.render_lesion(synthetic.stable_rng(0, "ISIC_2", 1), style, True, 40)
  assert first.shape == (40, 40, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert first.std() > 5  # Not a flat image.


def test_render_image_is_stable_across_processes_and_seeds():
  args = ("ISIC_0015719", "IP_3075186", True, SIZE)
  here = synthetic.render_image(0, *args)
  code = ("import sys; from melanoma_jax.data import synthetic; "
          f"sys.stdout.buffer.write(synthetic.render_image(0, *{args!r}))")
  env = dict(os.environ, PYTHONHASHSEED="123")
  there = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))).stdout
  assert here == there
  assert synthetic.render_image(1, *args) != here
  assert _decode(here).shape == (SIZE, SIZE, 3)


def test_default_renders_are_pinned():
  """The default generator's bytes, ordinary and ugly-duckling, as first released: another generator added
  beside it must leave them alone. (A new Pillow/libjpeg or numpy may change them too: then re-pin, after
  checking with the old environment that the drawing code is unchanged.)"""
  rows = [("ISIC_0015719", "IP_3075186", True), ("ISIC_0052212", "IP_2842074", False),
          ("ISIC_0068279", "IP_6890425", False)]
  digest = hashlib.sha256()
  for ugly_duckling in (0.0, 1.0):
    for row in rows:
      digest.update(synthetic.render_image(0, *row, 48, ugly_duckling))
  assert digest.hexdigest() == "dc4a7257c541ece313d13e86e40c25c4de4c65dd3503bf2f4a954cb61514575a"


def _dark_area(image):
  """Share of the central disc clearly darker than the skin (the image's 75th luminance percentile)."""
  lum = image.astype(np.float32).mean(-1)
  n = image.shape[0]
  yy, xx = np.mgrid[:n, :n]
  disc = np.hypot(yy - (n - 1) / 2, xx - (n - 1) / 2) < 0.45 * n
  return float((lum[disc] < 0.75 * np.percentile(lum[disc], 75)).mean())


def test_malignant_lesion_is_the_ugly_duckling_of_its_patient():
  wins = []
  for p in range(25):
    style = synthetic.patient_style(0, f"IP_{p}")
    malignant = _dark_area(synthetic.render_lesion(synthetic.stable_rng(0, f"m{p}", 1), style, True, 48))
    for b in range(5):
      benign = synthetic.render_lesion(synthetic.stable_rng(0, f"b{p}_{b}", 1), style, False, 48)
      wins.append(malignant > _dark_area(benign))
  # Chance is 0.5; larger, darker, multi-coloured melanomas win most within-patient comparisons.
  assert np.mean(wins) > 0.8


def test_benign_lesions_of_a_patient_resemble_each_other_more_than_other_patients():
  def nevus_colour(patient, index):
    params = synthetic.make_lesion_params(synthetic.stable_rng(0, f"{patient}_{index}", 1),
                                          synthetic.patient_style(0, patient), False)
    return np.asarray(params.base_rgb)
  colours = np.array([[nevus_colour(f"IP_{p}", i) for i in range(6)] for p in range(20)])
  within = np.mean([np.linalg.norm(c - c.mean(0), axis=1).mean() for c in colours])
  between = np.linalg.norm(colours.mean(1) - colours.mean((0, 1)), axis=1).mean()
  assert within < 0.5 * between


def test_render_rejects_tiny_size():
  with pytest.raises(InputError, match="image size"):
    synthetic.render_lesion(np.random.default_rng(0), synthetic.patient_style(0, "IP_1"), False, 4)


# ---------------------------------------------------------------------------------------------------------
# Choosing patients.

def test_default_subset_keeps_real_imbalance_with_enough_malignant(train_df):
  chosen = synthetic.select_patients(train_df, synthetic.DEFAULT_NUM_PATIENTS, seed=0)
  rows = train_df[train_df["patient_id"].isin(chosen)]
  assert len(chosen) == synthetic.DEFAULT_NUM_PATIENTS == len(set(chosen))
  assert 3000 <= len(rows) <= 5000
  assert rows["target"].sum() >= synthetic.DEFAULT_MIN_MALIGNANT
  assert abs(rows["target"].mean() - train_df["target"].mean()) < 0.006
  assert synthetic.select_patients(train_df, 250, seed=0) == chosen
  assert synthetic.select_patients(train_df, 250, seed=1) != chosen


def test_min_malignant_swaps_in_malignant_patients(train_df):
  def malignant(ids):
    return int(train_df.loc[train_df["patient_id"].isin(ids), "target"].sum())
  plain = synthetic.select_patients(train_df, 40, seed=0, min_malignant=0)
  topped = synthetic.select_patients(train_df, 40, seed=0, min_malignant=30)
  assert malignant(plain) < 30 <= malignant(topped)
  assert len(topped) == 40


def test_all_patients_when_none_or_zero(train_df):
  assert len(synthetic.select_patients(train_df, None)) == 2056
  assert len(synthetic.select_patients(train_df, 0)) == 2056


# ---------------------------------------------------------------------------------------------------------
# The generated dataset.

def test_csvs_are_the_real_rows_of_the_chosen_patients(tiny, real_train_csv, real_test_csv):
  for split, source in (("train", real_train_csv), ("test", real_test_csv)):
    written = metadata.load_metadata(tiny[f"{split}_csv"], split)
    real = metadata.load_metadata(source, split)
    expected = real[real["patient_id"].isin(set(written["patient_id"]))]
    pd.testing.assert_frame_equal(written.reset_index(drop=True), expected.reset_index(drop=True))
    real_lines = set(_read_bytes(source).decode().splitlines())
    assert set(_read_bytes(tiny[f"{split}_csv"]).decode().splitlines()) <= real_lines  # Empty stays empty.
  written = metadata.load_metadata(tiny["train_csv"], "train")
  assert written["patient_id"].nunique() == 5 == tiny["train_patients"]
  assert int(written["target"].sum()) == tiny["train_malignant"] >= 2
  assert tiny["test_patients"] == 2


def test_records_round_trip(tiny):
  out_dir = tiny["out_dir"]
  codes = records.load_codes(os.path.join(out_dir, records.CODES_FILE))
  csv = pd.read_csv(tiny["train_csv"])
  examples = _examples(out_dir, "train", codes)
  assert len(tiny["train_records"]) == 2
  assert [ex["image_name"] for ex in examples] == list(csv["image_name"])
  for ex, row in zip(examples, csv.itertuples()):
    assert (ex["patient_id"], ex["target"], ex["age_approx"]) == (row.patient_id, row.target, row.age_approx)
    site = row.anatom_site_general_challenge
    assert ex["anatom_site_general_challenge"] == (None if pd.isna(site) else site)
    assert _decode(ex["image"]).shape == (SIZE, SIZE, 3)
  test_examples = _examples(out_dir, "test")
  assert [ex["image_name"] for ex in test_examples] == list(pd.read_csv(tiny["test_csv"])["image_name"])
  assert set(test_examples[0]) == {"image", "image_name"}
  hidden = pd.read_csv(os.path.join(out_dir, "test_hidden_labels.csv"))
  assert list(hidden["image_name"]) == [ex["image_name"] for ex in test_examples]


def test_records_hold_the_default_renders(tiny):
  csv = pd.read_csv(tiny["train_csv"])
  images = [ex["image"] for ex in _examples(tiny["out_dir"], "train")]
  assert images == [synthetic.render_image(0, row.image_name, row.patient_id, row.target == 1, SIZE)
                    for row in csv.itertuples()]


def test_same_seed_gives_identical_bytes_other_seed_differs(tiny, tmp_path):
  again = synthetic.generate_dataset(tmp_path / "again", **TINY)
  for name in ("train.csv", "test.csv", "test_hidden_labels.csv"):
    assert _read_bytes(os.path.join(again["out_dir"], name)) == _read_bytes(os.path.join(tiny["out_dir"], name))
  for split in ("train", "test"):
    assert ([ex["image"] for ex in _examples(again["out_dir"], split)]
            == [ex["image"] for ex in _examples(tiny["out_dir"], split)])
  other = synthetic.generate_dataset(tmp_path / "other", **dict(TINY, seed=1))
  assert (_read_bytes(os.path.join(other["out_dir"], "train.csv"))
          != _read_bytes(os.path.join(tiny["out_dir"], "train.csv")))


def test_second_call_reuses_a_complete_dataset(tiny):
  out_dir = tiny["out_dir"]
  before = {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in os.listdir(out_dir)}
  again = synthetic.generate_dataset(out_dir, **TINY)
  assert again["reused"] and not tiny["reused"]
  assert {n: os.stat(os.path.join(out_dir, n)).st_mtime_ns for n in os.listdir(out_dir)} == before
  assert again["train_records"] == tiny["train_records"]


def test_an_incomplete_dataset_is_regenerated_cleanly(tmp_path):
  first = synthetic.generate_dataset(tmp_path / "ds", **TINY)
  shard = first["train_records"][0]
  good = _read_bytes(shard)
  os.remove(shard)  # Lost after the fact: the set is incomplete.
  (tmp_path / "ds.partial").mkdir()  # A scratch folder of an earlier, killed run ...
  (tmp_path / "ds.partial" / ".synthetic-partial").write_text("")  # ... carries the generator's mark.
  second = synthetic.generate_dataset(tmp_path / "ds", **TINY)
  assert not second["reused"]
  assert _read_bytes(shard) == good
  assert os.path.isfile(os.path.join(second["out_dir"], synthetic.MANIFEST))
  assert not os.path.exists(second["out_dir"] + ".partial")
  with open(os.path.join(second["out_dir"], synthetic.MANIFEST)) as f:
    manifest = json.load(f)
  assert manifest["params"]["image_size"] == SIZE and set(manifest["files"]) == (
      set(os.listdir(second["out_dir"])) - {synthetic.MANIFEST})


@pytest.mark.parametrize("edit", ["longer", "same_size"])
def test_a_file_changed_after_generation_is_never_generated_over(tmp_path, edit):
  """An edited train.csv (a flipped label keeps its size) or a damaged shard may be the user's work: the set
  is refused naming the file, for the same parameters and for others, and nothing in it is touched."""
  first = synthetic.generate_dataset(tmp_path / "ds", **TINY)
  csv = first["train_csv"]
  text = open(csv, encoding="utf-8").read()
  edited = text + "\n" if edit == "longer" else text.replace(",0\n", ",1\n", 1)
  assert edited != text
  with open(csv, "w", encoding="utf-8") as f:
    f.write(edited)
  before = {n: _read_bytes(os.path.join(first["out_dir"], n)) for n in os.listdir(first["out_dir"])}
  for params in (TINY, dict(TINY, seed=5)):
    with pytest.raises(InputError, match=r"ds/train\.csv: changed after the synthetic data generator wrote it") as e:
      synthetic.generate_dataset(tmp_path / "ds", **params)
    assert ("same size, other bytes" in str(e.value)) == (edit == "same_size") and "\n" not in str(e.value)
  assert {n: _read_bytes(os.path.join(first["out_dir"], n)) for n in os.listdir(first["out_dir"])} == before


def test_a_folder_the_generator_did_not_write_is_never_replaced(tmp_path):
  """A resized real set (train.csv, test.csv, train00-2182.tfrec ...) looks like a generated one by its file
  names; without the generator's manifest it is not touched, nor is a scratch folder it did not make."""
  real = tmp_path / "melanoma-512"
  real.mkdir()
  for name in ("train.csv", "test.csv", "train00-2182.tfrec", "test00-687.tfrec", "codes.json"):
    (real / name).write_text("the user's data")
  with pytest.raises(InputError, match="not a dataset this generator wrote"):
    synthetic.generate_dataset(real, **TINY)
  assert sorted(os.listdir(real)) == sorted(["train.csv", "test.csv", "train00-2182.tfrec", "test00-687.tfrec",
                                             "codes.json"])
  assert all((real / n).read_text() == "the user's data" for n in os.listdir(real))
  (tmp_path / "new.partial").mkdir()
  (tmp_path / "new.partial" / "notes.txt").write_text("keep me")
  with pytest.raises(InputError, match="new.partial: exists and was not made by this generator"):
    synthetic.generate_dataset(tmp_path / "new", **TINY)
  assert (tmp_path / "new.partial" / "notes.txt").read_text() == "keep me"


def test_refuses_to_replace_a_folder_with_other_files(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(InputError, match="notes.txt"):
    synthetic.generate_dataset(tmp_path / "mine", **TINY)
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_contact_sheet_and_notice(tiny):
  with Image.open(tiny["contact_sheet"]) as sheet:
    assert sheet.size[0] >= 160 * 2 and sheet.size[1] >= 160
  with open(os.path.join(tiny["out_dir"], "SYNTHETIC.md")) as f:
    notice = f.read()
  assert "SYNTHETIC" in notice and "CC BY-NC 4.0" in notice and "10.34970/2020-ds01" in notice


def test_cli_writes_a_dataset(tmp_path, capsys):
  argv = ["--out", str(tmp_path / "cli"), "--num_patients", "3", "--num_test_patients", "1",
          "--image_size", "16", "--min_malignant", "0", "--seed", "3"]
  assert synthetic_cli.main(argv) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary["train_patients"] == 3 and summary["train_images"] > 0
  assert os.path.isfile(tmp_path / "cli" / synthetic.MANIFEST)


def test_bad_parameters_are_input_errors(tmp_path):
  with pytest.raises(InputError, match="image_size"):
    synthetic.generate_dataset(tmp_path / "x", **dict(TINY, image_size=4))
  with pytest.raises(InputError, match="num_patients"):
    synthetic.generate_dataset(tmp_path / "x", **dict(TINY, num_patients=-3))
