"""Tests of the plain synthetic generator: determinism, flat skin, patient styles measured from pixels, an
image-only classifier at chance, the written set, refusals, the command line, the config field's run identity.

Every style property is measured from the pixels (the mean colour and the area of the pixels that differ
from the skin colour), not read from the generator's parameters.
"""
import io
import json
import os

import ml_collections
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from configs import image as image_config
from melanoma_jax.data import records
from melanoma_jax.data import sources
from melanoma_jax.data import synthetic
from melanoma_jax.data.pipeline import ImagePipeline
from melanoma_jax.data.synthetic import __main__ as synthetic_cli
from melanoma_jax.data.synthetic import manifest as manifest_lib
from melanoma_jax.data.synthetic import plain
from melanoma_jax.image import setup
from melanoma_jax.training import identity
from melanoma_jax.utils.errors import InputError

SIZE = 32
SKIN = np.round(np.asarray(plain.SKIN_RGB) * 255.0)
LESION_LEVELS = 12  # A pixel more than this many levels from the skin in some channel is lesion.
TINY = dict(num_patients=6, num_test_patients=2, image_size=SIZE, seed=0, min_malignant=2, num_shards=2)


def _pixels(jpeg):
  return np.asarray(Image.open(io.BytesIO(jpeg)), np.float64)


def _features(jpeg):
  """[mean R, G, B of the lesion in [0, 1], lesion area as a share of the image], from the pixels."""
  image = _pixels(jpeg)
  lesion = np.abs(image - SKIN).max(-1) > LESION_LEVELS
  return np.concatenate([image[lesion].mean(0) / 255.0, [lesion.mean()]])


def _patients(first, count, benign=4, seed=0):
  """Measured features [patients, benign + 1, 4] of `benign` benign lesions and then one melanoma each."""
  return np.array([[_features(plain.render_plain_image(seed, f"b{p}_{i}", f"IP_{p}", False, SIZE))
                    for i in range(benign)] + [_features(plain.render_plain_image(seed, f"m{p}", f"IP_{p}", True,
                                                                                  SIZE))]
                   for p in range(first, first + count)])


@pytest.fixture(scope="module")
def measured():
  """Two disjoint cohorts of 60 patients, features standardised by the first cohort's benign lesions."""
  fit, held_out = _patients(0, 60), _patients(60, 60)
  mean, std = fit[:, :-1].reshape(-1, 4).mean(0), fit[:, :-1].reshape(-1, 4).std(0)
  return (fit - mean) / std, (held_out - mean) / std


def _flat(features):
  """(features [n, 4], labels [n]) of a cohort: 1 for each patient's melanoma (the last lesion)."""
  labels = np.zeros(features.shape[:2], int)
  labels[:, -1] = 1
  return features.reshape(-1, features.shape[-1]), labels.reshape(-1)


def _within_patient_distance(cohort):
  """[patients, lesions]: each lesion's distance to the nearest other lesion of its own patient."""
  d = np.linalg.norm(cohort[:, :, None] - cohort[:, None, :], axis=-1)
  d[:, np.arange(cohort.shape[1]), np.arange(cohort.shape[1])] = np.inf
  return d.min(-1)


# ---------------------------------------------------------------------------------------------------------
# Rendering.

def test_plain_images_are_pure_functions_of_seed_and_ids():
  rows = [(f"ISIC_{i}", f"IP_{i % 3}", i % 4 == 0) for i in range(8)]
  first = [plain.render_plain_image(0, *row, SIZE) for row in rows]
  backwards = [plain.render_plain_image(0, *row, SIZE) for row in reversed(rows)][::-1]
  assert first == backwards
  assert len(set(first)) == len(rows)  # Every image its own jitter.
  assert plain.render_plain_image(1, *rows[0], SIZE) != first[0]
  assert _pixels(first[0]).shape == (SIZE, SIZE, 3)


def _ring(size, width=2):
  """The outer `width`-pixel ring of the image, the four corners included."""
  ring = np.ones((size, size), bool)
  ring[width:-width, width:-width] = False
  return ring


def _ring_deviation(image):
  """(largest, mean) difference in levels of the ring's pixels from the plain skin colour."""
  deviation = np.abs(image.astype(np.float64)[_ring(image.shape[0])] - SKIN)
  return float(deviation.max()), float(deviation.mean())


def test_plain_skin_is_one_colour_without_hair_light_or_vignette():
  for p in range(8):
    style = plain.plain_style(0, f"IP_{p}")
    for name, malignant in (("b", False), ("m", True)):
      drawn = plain.render_plain_lesion(synthetic.stable_rng(0, f"{name}{p}", 1), style, malignant, SIZE)
      assert _ring_deviation(drawn) == (0.0, 0.0), (p, name)  # Before JPEG: exactly the skin colour.
      jpeg = plain.render_plain_image(0, f"{name}{p}", f"IP_{p}", malignant, SIZE)
      largest, mean = _ring_deviation(_pixels(jpeg))
      assert largest <= 12 and mean <= 2, (p, name)  # After JPEG: its ringing and chroma subsampling only.
      assert _features(jpeg)[3] > 0.03  # And there is a lesion.
  # The same measure sees the default generator's skin texture, light and dermoscope corners.
  assert min(_ring_deviation(_pixels(synthetic.render_image(0, f"b{p}", f"IP_{p}", False, SIZE)))[1]
             for p in range(8)) > 5


def test_benign_lesions_of_a_plain_patient_agree_far_more_than_across_patients(measured):
  benign = measured[0][:, :-1]
  within = np.linalg.norm(benign - benign.mean(1, keepdims=True), axis=-1).mean()
  between = np.linalg.norm(benign.mean(1) - benign.mean((0, 1)), axis=-1).mean()
  assert within < 0.3 * between


def test_plain_melanoma_is_unremarkable_alone_but_unlike_its_patient(measured):
  fit, held_out = measured
  x_fit, y_fit = _flat(fit)
  x_held, y_held = _flat(held_out)
  image_only = roc_auc_score(y_held, LogisticRegression().fit(x_fit, y_fit).decision_function(x_held))
  within_patient = roc_auc_score(y_held, _within_patient_distance(held_out).reshape(-1))
  print(f"plain generator: image-only AUC {image_only:.3f}, within-patient AUC {within_patient:.3f}")
  assert abs(image_only - 0.5) < 0.15
  assert within_patient > 0.9
  # A melanoma looks like some other patient's mole: its nearest benign lesion of another patient is as near
  # as a benign lesion's is, while its own patient's lesions are far.
  benign = held_out[:, :-1]
  def nearest_stranger(p, lesion):
    others = np.delete(benign, p, axis=0).reshape(-1, benign.shape[-1])
    return np.linalg.norm(others - lesion, axis=-1).min()
  melanoma = np.array([nearest_stranger(p, held_out[p, -1]) for p in range(len(held_out))])
  benign_nearest = np.array([nearest_stranger(p, held_out[p, 0]) for p in range(len(held_out))])
  assert np.median(melanoma) < 1.5 * np.median(benign_nearest)
  assert np.median(melanoma) < 0.5 * np.median(_within_patient_distance(held_out)[:, -1])


def test_plain_render_rejects_tiny_size():
  with pytest.raises(InputError, match="image size"):
    plain.render_plain_image(0, "ISIC_1", "IP_1", False, 4)


# ---------------------------------------------------------------------------------------------------------
# The written set.

@pytest.fixture(scope="module")
def plain_set(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("plain") / "set"
  return synthetic.generate_dataset(out_dir, generator="plain", ugly_duckling=1.0, num_workers=2, **TINY)


def test_plain_set_records_its_generator_and_holds_plain_renders(plain_set):
  out_dir = plain_set["out_dir"]
  with open(os.path.join(out_dir, synthetic.MANIFEST)) as f:
    params = json.load(f)["params"]
  assert params["generator"] == "plain" and params["ugly_duckling"] == 1.0
  with open(os.path.join(out_dir, "SYNTHETIC.md")) as f:
    assert "PLAIN GENERATOR" in f.read()
  # Rendered in two spawned processes, byte-equal to this process's renders of each row's own label.
  truth = pd.read_csv(os.path.join(out_dir, "test_hidden_labels.csv"))
  for split, csv, targets in (("train", plain_set["train_csv"], None), ("test", plain_set["test_csv"], truth)):
    rows = pd.read_csv(csv)
    labels = rows["target"] if targets is None else targets["target"]
    examples = [ex for path in sorted(plain_set[f"{split}_records"]) for ex in records.read_examples(path)]
    assert [ex["image"] for ex in examples] == [
        plain.render_plain_image(0, name, patient, target == 1, SIZE)
        for name, patient, target in zip(rows["image_name"], rows["patient_id"], labels)]
  assert plain_set["train_malignant"] >= 2
  again = synthetic.generate_dataset(out_dir, generator="plain", ugly_duckling=1.0, **TINY)
  assert again["reused"]


def test_default_manifest_params_do_not_name_a_generator(real_train_csv, real_test_csv):
  args = (6, 2, SIZE, 0, 2, 2, real_train_csv, real_test_csv, 1.0)
  assert "generator" not in manifest_lib.dataset_params(*args)
  assert "generator" not in manifest_lib.dataset_params(*args, generator="dermoscopy")
  assert manifest_lib.dataset_params(*args, generator="plain")["generator"] == "plain"


def test_plain_set_reads_back_through_the_pipeline(plain_set):
  data = sources.resolve(plain_set["out_dir"])
  assert data.layout == "resized" and len(data.train_files) == 2 and len(data.test_files) == 2
  targets = dict(zip(data.train_df["image_name"], data.train_df["target"].astype(int)))
  patients = sorted(data.train_df["patient_id"].unique())
  malignant = set(data.train_df.loc[data.train_df["target"] == 1, "patient_id"])
  val_patients = {sorted(malignant)[0], *[p for p in patients if p not in malignant][:1]}
  val = list(data.train_df.loc[data.train_df["patient_id"].isin(val_patients), "image_name"])
  train = [n for n in data.train_df["image_name"] if n not in set(val)]
  pipe = ImagePipeline(data.train_files, data.test_files, targets, train, val, image_size=SIZE, global_batch=4,
                       num_devices=1)
  seen = {}
  for batch, names in pipe.device_batches(pipe.val_dataset(), data.train_files):
    for name, y, mask, x in zip(names, batch["y"][0], batch["mask"][0], batch["x"][0]):
      if mask:
        seen[name] = y
        assert x.shape == (SIZE, SIZE, 3) and x.std() > 0.01  # A lesion on the skin.
  assert seen == {n: float(targets[n]) for n in val}


# ---------------------------------------------------------------------------------------------------------
# Refusals and the command line.

@pytest.mark.parametrize("kwargs, message", [
    (dict(generator="nope", ugly_duckling=1.0), "generator must be one of dermoscopy, plain, got 'nope'"),
    (dict(generator="plain", ugly_duckling=0.5), "generator 'plain' draws only ugly-duckling sets"),
    (dict(generator="plain"), "set ugly_duckling=1.0, got 0.0"),
])
def test_unknown_generator_and_plain_without_ugly_duckling_are_refused(tmp_path, kwargs, message):
  with pytest.raises(InputError, match=message) as refusal:
    synthetic.generate_dataset(tmp_path / "x", **TINY, **kwargs)
  assert "\n" not in str(refusal.value)
  assert not os.path.exists(tmp_path / "x") and not os.path.exists(tmp_path / "x.partial")


def test_cli_draws_a_plain_set_and_refuses_an_unknown_generator(tmp_path, capsys):
  argv = ["--num_patients", "3", "--num_test_patients", "1", "--image_size", "16", "--min_malignant", "1"]
  assert synthetic_cli.main(["--out", str(tmp_path / "cli"), *argv, "--generator", "plain",
                             "--ugly_duckling", "1"]) == 0
  with open(tmp_path / "cli" / synthetic.MANIFEST) as f:
    assert json.load(f)["params"]["generator"] == "plain"
  capsys.readouterr()
  assert synthetic_cli.main(["--out", str(tmp_path / "bad"), *argv, "--generator", "nope"]) == 1
  assert capsys.readouterr().err.strip().splitlines() == [
      "error: generator must be one of dermoscopy, plain, got 'nope'"]


# ---------------------------------------------------------------------------------------------------------
# The config field and the run identity.

def test_config_passes_the_generator_only_when_not_the_default():
  config = image_config.get_config()
  assert config.synthetic.generator == "dermoscopy"
  assert "generator" not in setup.resolve(config, num_devices=8, processes=(0, 1)).synthetic_kwargs
  config.synthetic.generator, config.synthetic.ugly_duckling = "plain", 1.0
  assert setup.resolve(config, num_devices=8, processes=(0, 1)).synthetic_kwargs["generator"] == "plain"


def _without_generator(config):
  tree = config.to_dict()
  del tree["synthetic"]["generator"]
  return ml_collections.ConfigDict(tree)


def test_a_run_recorded_before_the_generator_field_still_matches(tmp_path):
  config = image_config.get_config()
  old = _without_generator(config)
  assert identity.of(old, "digest") == identity.of(config, "digest")
  plain_config = image_config.get_config()
  plain_config.synthetic.generator = "plain"
  plain_identity = identity.of(plain_config, "digest")
  assert plain_identity["synthetic.generator"] == "plain" and plain_identity != identity.of(old, "digest")
  workdir = str(tmp_path)
  identity.check_or_record(workdir, identity.of(old, "digest"))  # Recorded before the field existed.
  identity.check_or_record(workdir, identity.of(config, "digest"))  # The default matches it.
  with pytest.raises(InputError, match="synthetic.generator None -> 'plain'"):
    identity.check_or_record(workdir, plain_identity)
  assert identity.recorded_config(workdir).synthetic.generator == "dermoscopy"
