"""Writing a dataset: the chosen rows, their images as records, the notice and the manifest, all or nothing.

Everything is written into `out_dir.partial` and renamed to out_dir when complete, so out_dir is never
half-written; a folder that already holds a complete dataset of the same parameters is reused as is.
"""
import json
import logging
import os
import shutil
import time

import numpy as np
import pandas as pd

from melanoma_jax.data import metadata
from melanoma_jax.data import records
from melanoma_jax.data.synthetic import contact_sheet
from melanoma_jax.data.synthetic import generators
from melanoma_jax.data.synthetic import manifest as manifest_lib
from melanoma_jax.data.synthetic import patients
from melanoma_jax.utils.errors import InputError


def _auto_shards(num_rows):
  return max(1, min(16, num_rows // 250))


def _with_progress(items, total, label, every_s=5.0):
  """Yields `items` unchanged, logging images/s and the ETA every `every_s` seconds."""
  start = last = time.time()
  for done, item in enumerate(items, 1):
    yield item
    now = time.time()
    if now - last >= every_s and done < total:
      rate = done / (now - start)
      logging.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", label, done, total, rate,
                   (total - done) / rate)
      last = now


def _render_job(job):
  """generators.render_image of one job tuple; a module-level function, so a spawned pool can pickle it."""
  return generators.render_image(*job)


def _rendered(df, targets, seed, size, num_workers, label, ugly_duckling=0.0, generator=generators.DEFAULT):
  """JPEG bytes of df's rows, in order, rendered in `num_workers` processes (1: in this one)."""
  jobs = [(generator, seed, name, patient, bool(t), size, ugly_duckling)
          for name, patient, t in zip(df["image_name"], df["patient_id"], targets)]
  if num_workers <= 1:
    yield from _with_progress(map(_render_job, jobs), len(jobs), label)
    return
  import multiprocessing  # pylint: disable=g-import-not-at-top
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    yield from _with_progress(pool.imap(_render_job, jobs, chunksize=32), len(jobs), label)


_README = """# Synthetic SIIM-ISIC 2020 lesion images

The IMAGES in this folder are SYNTHETIC: drawn by `melanoma_jax.data.synthetic` (generator version {version},
seed {seed}, {size}x{size} px), not photographs of skin. They imitate dermoscopy (skin tone per patient,
dark circular corners, hair, one lesion) with a learnable but imperfect signal: a patient's benign nevi look
alike, malignant lesions follow the ABCD rule to a varying degree (some subtle), and some benign lesions are
atypical. Models trained on them say nothing about real melanoma detection.

The METADATA (`train.csv`, `test.csv`: image names, patient ids, sex, age, site, diagnosis, target) are real
rows of the SIIM-ISIC Melanoma Classification challenge 2020, for a seeded subset of {train_patients} train
patients ({train_images} images, {train_malignant} malignant) and {test_patients} test patients
({test_images} images). Source: International Skin Imaging Collaboration, SIIM-ISIC 2020 Challenge Dataset,
doi:10.34970/2020-ds01 (Rotemberg et al., Scientific Data 8, 34, 2021). License: CC BY-NC 4.0
(non-commercial use, attribution required).

The real test set has no labels; `test_hidden_labels.csv` holds the labels the generator drew for the
synthetic test images (malignant at the train rate, {test_malignant} here), to score predictions.

Files: `train*.tfrec` / `test*.tfrec` (resized layout, see `melanoma_jax/data/records.py`), `codes.json`,
`contact_sheet.png` (examples per patient: benign, then the malignant one), `synthetic.json` (manifest,
written last: a folder without it is incomplete).
"""


_PLAIN_README = """
PLAIN GENERATOR (`generator="plain"`, `melanoma_jax/data/synthetic/plain.py`): unlike the description above,
these images are NOT dermoscopy-like. Every image has the same flat skin colour (no texture, hair, uneven light
or dark corners) and one flat lesion with a soft edge. A patient's benign nevi share a colour, darkness, size and
outline; a melanoma is a typical nevus in another patient-like style, clearly unlike this patient's own. Benign
and malignant images are distributed alike: an image alone says nothing, only the patient's other images do.
"""


_PARTIAL_MARK = ".synthetic-partial"  # Marks a scratch folder as this generator's, so a rerun may clear it.


def _owned(out_dir):
  """The names in out_dir this generator wrote (its manifest's files), or None if it has no manifest."""
  try:
    with open(os.path.join(out_dir, manifest_lib.MANIFEST)) as f:
      return set(json.load(f).get("files", {})) | {manifest_lib.MANIFEST}
  except (OSError, ValueError, AttributeError):
    return None


def _check_replaceable(out_dir):
  """InputError unless out_dir is absent, empty, or a dataset this generator wrote (nothing else in it)."""
  if not os.path.lexists(out_dir):
    return
  if not os.path.isdir(out_dir) or os.path.islink(out_dir):
    raise InputError(f"{out_dir}: exists and is not a folder")
  names = os.listdir(out_dir)
  if not names:
    return
  owned = _owned(out_dir)
  if owned is None:
    raise InputError(f"{out_dir}: not empty and not a dataset this generator wrote (no readable "
                     f"{manifest_lib.MANIFEST}; holds {', '.join(sorted(names)[:5])}); not touching it, choose "
                     "an empty or new folder")
  foreign = sorted(set(names) - owned)
  if foreign:
    raise InputError(f"{out_dir}: holds files the generator did not write ({', '.join(foreign[:5])}); not "
                     "replacing it, choose an empty or new folder")


def _fresh_scratch(tmp_dir):
  """An empty tmp_dir marked as ours; an earlier one is cleared only if it carries the mark."""
  if os.path.lexists(tmp_dir):
    owned = _owned(tmp_dir) or set()
    if not (os.path.isfile(os.path.join(tmp_dir, _PARTIAL_MARK)) or set(os.listdir(tmp_dir)) <= owned):
      raise InputError(f"{tmp_dir}: exists and was not made by this generator; not touching it, move it "
                       "or choose another --out")
    shutil.rmtree(tmp_dir)
  os.makedirs(tmp_dir)
  open(os.path.join(tmp_dir, _PARTIAL_MARK), "w").close()


def _replace_dir(tmp_dir, out_dir):
  """Moves the finished tmp_dir to out_dir, first removing the files of an older dataset there (only those)."""
  _check_replaceable(out_dir)
  if os.path.lexists(out_dir):
    for name in os.listdir(out_dir):  # All of them listed in its manifest (just checked).
      os.remove(os.path.join(out_dir, name))
    os.rmdir(out_dir)
  os.replace(tmp_dir, out_dir)


def _write_dataset(tmp_dir, train_df, test_df, test_truth, params, num_workers):
  """Writes every file of the dataset into tmp_dir, the manifest last; returns the manifest."""
  seed, size = params["seed"], params["image_size"]
  train_df.to_csv(os.path.join(tmp_dir, "train.csv"), index=False)
  test_df.to_csv(os.path.join(tmp_dir, "test.csv"), index=False)
  pd.DataFrame({"image_name": test_df["image_name"], "target": test_truth}).to_csv(
      os.path.join(tmp_dir, "test_hidden_labels.csv"), index=False)
  codes = records.fit_codes(train_df, test_df)
  shards = params["num_shards"]
  ugly_duckling = params.get("ugly_duckling", 0.0)
  generator = params.get("generator", generators.DEFAULT)
  train_images = _rendered(train_df, train_df["target"], seed, size, num_workers, "train", ugly_duckling, generator)
  records.write_resized_records(train_df, train_images, tmp_dir, "train",
                                shards or _auto_shards(len(train_df)), codes)
  if len(test_df):
    test_images = _rendered(test_df, test_truth, seed, size, num_workers, "test", ugly_duckling, generator)
    records.write_resized_records(test_df, test_images, tmp_dir, "test", shards or _auto_shards(len(test_df)),
                                  codes)
  records.save_codes(codes, os.path.join(tmp_dir, records.CODES_FILE))
  contact_sheet.write(train_df, seed, size, os.path.join(tmp_dir, "contact_sheet.png"),
                      ugly_duckling=ugly_duckling, generator=generator)
  counts = {"train_patients": int(train_df["patient_id"].nunique()), "train_images": len(train_df),
            "train_malignant": int(train_df["target"].sum()),
            "test_patients": int(test_df["patient_id"].nunique()), "test_images": len(test_df),
            "test_malignant": int(np.sum(test_truth))}
  with open(os.path.join(tmp_dir, "SYNTHETIC.md"), "w") as f:
    f.write(_README.format(version=manifest_lib.GENERATOR_VERSION, seed=seed, size=size, **counts))
    if ugly_duckling:
      f.write(f"\nUGLY-DUCKLING SET (strength {ugly_duckling}): benign lesions are mostly the patient's own typical "
              "nevi and melanomas mostly typical nevi in a stranger's style; only within-patient comparison "
              "separates them.\n")
    if generator == "plain":
      f.write(_PLAIN_README)
  os.remove(os.path.join(tmp_dir, _PARTIAL_MARK))  # The manifest, written last, lists only the dataset.
  return manifest_lib.write_manifest(tmp_dir, params, counts)


def _summary(out_dir, manifest, seconds, reused):
  def shards(split):
    return [os.path.join(out_dir, n) for n in sorted(manifest["files"])
            if n.startswith(split) and n.endswith(".tfrec")]
  return {**manifest["counts"], "out_dir": os.fspath(out_dir), "reused": reused, "seconds": seconds,
          "train_records": shards("train"), "test_records": shards("test"),
          "train_csv": os.path.join(out_dir, "train.csv"), "test_csv": os.path.join(out_dir, "test.csv"),
          "contact_sheet": os.path.join(out_dir, "contact_sheet.png")}


def generate_dataset(out_dir, num_patients=patients.DEFAULT_NUM_PATIENTS, image_size=128, seed=0,
                     num_test_patients=None, train_csv=metadata.EMBEDDED_TRAIN_CSV,
                     test_csv=metadata.EMBEDDED_TEST_CSV, num_shards=None,
                     min_malignant=patients.DEFAULT_MIN_MALIGNANT, num_workers=1, ugly_duckling=0.0,
                     generator=generators.DEFAULT):
  """Draws images for a seeded patient subset of the real metadata and writes the resized-record set.

  Writes into out_dir: train.csv / test.csv (the real rows of the chosen patients), train*/test*.tfrec,
  codes.json, test_hidden_labels.csv, contact_sheet.png, SYNTHETIC.md and, last, synthetic.json. Returns
  a summary dict (counts, paths, seconds, `reused`). If out_dir already holds a complete dataset made with
  the same parameters, it is returned as is. Everything is built in `out_dir.partial` and renamed when
  done, so out_dir is never half-written. `num_patients` None or 0 takes all train patients;
  `num_test_patients` None takes the real test:train proportion; `num_shards` None picks ~250 images a
  shard (at most 16). See `patients.select_patients` for the subset and `min_malignant`.
  `ugly_duckling` in [0, 1]: the share of melanomas drawn as a stranger's typical nevus (and of benign
  lesions kept to the patient's own typical nevus), see `lesions.make_lesion_params`; 0 = the ordinary set.
  `generator` one of `generators.GENERATORS`: "dermoscopy" (the default) or "plain" (`plain`, a structurally
  different ugly-duckling set; needs ugly_duckling=1.0).
  """
  start = time.time()
  if image_size < 8:
    raise InputError(f"image_size must be >= 8 pixels, got {image_size}")
  if seed < 0:
    raise InputError(f"seed must be >= 0, got {seed}")
  if not 0.0 <= float(ugly_duckling) <= 1.0:
    raise InputError(f"ugly_duckling must be in [0, 1], got {ugly_duckling}")
  generators.check(generator, ugly_duckling)
  out_dir = os.path.abspath(os.fspath(out_dir))
  train_all = metadata.load_metadata(train_csv, "train")
  test_all = metadata.load_metadata(test_csv, "test")
  train_patients = patients.select_patients(train_all, num_patients, seed, min_malignant)
  if num_test_patients is None:
    num_test_patients = patients.default_num_test_patients(num_patients, train_all["patient_id"].nunique(),
                                                           test_all["patient_id"].nunique())
  test_patients = patients.select_test_patients(test_all, num_test_patients, seed)
  params = manifest_lib.dataset_params(len(train_patients), len(test_patients), image_size, seed,
                                       min_malignant, num_shards, train_csv, test_csv, float(ugly_duckling),
                                       generator)
  manifest = manifest_lib.complete_manifest(out_dir, params)
  if manifest is not None:
    logging.info("%s: complete synthetic dataset with these parameters found, not regenerating", out_dir)
    return _summary(out_dir, manifest, time.time() - start, reused=True)
  _check_replaceable(out_dir)
  train_df = train_all[train_all["patient_id"].isin(train_patients)]
  test_df = test_all[test_all["patient_id"].isin(test_patients)]
  metadata.check_leakage(train_df, test_df)
  tmp_dir = out_dir + ".partial"
  _fresh_scratch(tmp_dir)
  test_truth = patients.hidden_test_labels(test_df, seed)
  manifest = _write_dataset(tmp_dir, train_df, test_df, test_truth, params, num_workers)
  _replace_dir(tmp_dir, out_dir)
  seconds = time.time() - start
  logging.info("%s: %d train + %d test images in %.1f s", out_dir, len(train_df), len(test_df), seconds)
  return _summary(out_dir, manifest, seconds, reused=False)
