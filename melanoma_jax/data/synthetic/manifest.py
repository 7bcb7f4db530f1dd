"""The manifest: what a finished dataset holds and what it was made with, the key to reusing a folder.

It is written last, so a folder without one is incomplete; a folder whose manifest holds other parameters, or
whose files are missing, is generated again. A listed file whose bytes differ from the manifest's sha256 was
changed by someone else (an edited train.csv): the folder is refused, never generated again over that edit.
"""
import hashlib
import json
import os

from melanoma_jax.data.synthetic import generators
from melanoma_jax.data.synthetic import render
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

GENERATOR_VERSION = 1
MANIFEST = "synthetic.json"


def _source_sha256():
  """One hash of every module of this package (a `sha256sum` listing of them, hashed)."""
  package_dir = os.path.dirname(os.path.abspath(__file__))
  names = sorted(n for n in os.listdir(package_dir) if n.endswith(".py"))
  listing = "".join(f"{files.sha256(os.path.join(package_dir, n))}  {n}\n" for n in names)
  return hashlib.sha256(listing.encode("utf-8")).hexdigest()


def dataset_params(num_patients, num_test_patients, image_size, seed, min_malignant, num_shards, train_csv,
                   test_csv, ugly_duckling=0.0, generator=generators.DEFAULT):
  """What determines the dataset's content (the manifest's key to reuse a finished folder).

  Includes a hash of the generator's source, so a changed generator never reuses an older dataset.
  `ugly_duckling` is recorded only when set and `generator` only when not "dermoscopy" (the default), so an
  ordinary set's parameters read as they always did.
  """
  extra = {"ugly_duckling": float(ugly_duckling)} if ugly_duckling else {}
  if generator != generators.DEFAULT:
    extra["generator"] = generator
  return {**extra, "generator_version": GENERATOR_VERSION, "generator_sha256": _source_sha256(),
          "num_patients": num_patients,
          "num_test_patients": num_test_patients, "image_size": image_size, "seed": seed,
          "min_malignant": min_malignant, "num_shards": num_shards, "jpeg_quality": render.JPEG_QUALITY,
          "train_csv_sha256": files.sha256(train_csv), "test_csv_sha256": files.sha256(test_csv)}


def complete_manifest(out_dir, params):
  """The manifest of out_dir if it is complete (every listed file, with its bytes) and made with `params`;
  None when there is none, it holds other parameters or a file is missing. InputError naming the file when a
  listed file was changed after it was written."""
  try:
    with open(os.path.join(out_dir, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  listed = manifest.get("files", {}) if isinstance(manifest, dict) else None
  if not isinstance(listed, dict):
    return None
  complete = True
  for name, entry in sorted(listed.items()):
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
      complete = False
      continue
    size = os.path.getsize(path)
    if size != entry.get("bytes") or files.sha256(path) != entry.get("sha256"):
      what = "same size, other bytes" if size == entry.get("bytes") else f"{entry.get('bytes')} -> {size} bytes"
      raise InputError(f"{path}: changed after the synthetic data generator wrote it ({what}); not generating the "
                       "set again over it: restore or delete the file (the set is then generated again), or "
                       "move the folder and give it as data_dir to use it as it is")
  return manifest if complete and manifest.get("params") == params else None


def write_manifest(out_dir, params, counts):
  """Lists every file of out_dir (bytes, sha256) with params and counts in the manifest; returns it."""
  listing = {name: {"bytes": os.path.getsize(os.path.join(out_dir, name)),
                    "sha256": files.sha256(os.path.join(out_dir, name))}
             for name in sorted(os.listdir(out_dir))}
  manifest = {"params": params, "counts": counts, "files": listing}
  with open(os.path.join(out_dir, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return manifest
