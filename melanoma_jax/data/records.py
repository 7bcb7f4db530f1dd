"""TFRecords of both layouts SIIM-ISIC users have, and a JPEG folder -> TFRecord converter.

Layouts (detected per file by `detect_layout`):
- "resized": the widely used melanoma-NxN sets. Keys `image` (JPEG bytes), `image_name` (bytes) and, in
  train records, `patient_id`, `sex`, `age_approx`, `anatom_site_general_challenge`, `diagnosis`, `target`,
  all int64, categorical fields integer-coded (codes in `codes.json` beside the shards; -1 = missing).
  Test records have only `image` and `image_name`.
- "competition": the competition's own `tfrecords/train*.tfrec` / `test*.tfrec`: `image`, `image_name` and,
  for train, `target`; other fields (if any) are strings. Fields the records lack are joined from the CSV
  by `image_name`.

Shards are named `{split}{index:02d}-{count}.tfrec`, so the count is known without reading them.

Convert a folder of JPEGs (the ISIC archive / Kaggle `jpeg/` layout) plus a CSV:
  python -m melanoma_jax.data.records --csv train.csv --images jpeg/train --out out --size 512 --split train
"""
import argparse
import glob
import io
import json
import logging
import os
import re
import sys
import time

import numpy as np
import pandas as pd

from melanoma_jax.data import metadata
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

CATEGORICAL_FIELDS = ("patient_id", "sex", "anatom_site_general_challenge", "diagnosis")
INT_FIELDS = ("patient_id", "sex", "age_approx", "anatom_site_general_challenge", "diagnosis", "target")
MISSING_CODE = -1
CODES_FILE = "codes.json"


# ---------------------------------------------------------------------------------------------------------
# Integer codes of categorical fields.

def fit_codes(*dfs):
  """{field: sorted categories} over the given tables; a category's code is its index."""
  codes = {}
  for field in CATEGORICAL_FIELDS:
    values = set()
    for df in dfs:
      if field in df.columns:
        values.update(str(v) for v in df[field].dropna().unique())
    codes[field] = sorted(values)
  return codes


def save_codes(codes, path):
  with open(path, "w") as f:
    json.dump({"missing": MISSING_CODE, "codes": codes}, f, indent=1, sort_keys=True)


def load_codes(path):
  if not os.path.isfile(path):
    raise InputError(f"{path}: codes file not found")
  try:
    with open(path) as f:
      return json.load(f)["codes"]
  except (json.JSONDecodeError, KeyError) as e:
    raise InputError(f"{path}: not a codes file ({e})") from e


def _encode_field(codes, field, value):
  if value is None or (isinstance(value, float) and np.isnan(value)) or value is pd.NA:
    return MISSING_CODE
  if field in CATEGORICAL_FIELDS:
    try:
      return codes[field].index(str(value))
    except ValueError:
      raise InputError(f"value {value!r} of {field} has no integer code (codes.json lacks it)") from None
  return int(value)


def decode_field(codes, field, code):
  """Inverse of the integer coding: a string (categorical), float age, int target, or None if missing."""
  if code == MISSING_CODE:
    return None
  if field in CATEGORICAL_FIELDS:
    return codes[field][code]
  if field == "age_approx":
    return float(code)
  return int(code)


# ---------------------------------------------------------------------------------------------------------
# Writing.

def _bytes_feature(value):
  return tf().train.Feature(bytes_list=tf().train.BytesList(value=[value]))


def _int_feature(value):
  return tf().train.Feature(int64_list=tf().train.Int64List(value=[int(value)]))


def encode_example(image_bytes, row, codes, split):
  """One serialized tf.train.Example in the resized layout; test records carry only image and name."""
  feature = {"image": _bytes_feature(image_bytes),
             "image_name": _bytes_feature(str(row["image_name"]).encode())}
  if split == "train":
    for field in INT_FIELDS:
      feature[field] = _int_feature(_encode_field(codes, field, row.get(field)))
  return tf().train.Example(features=tf().train.Features(feature=feature)).SerializeToString(deterministic=True)


def encode_competition_example(image_bytes, row, split):
  """One serialized record in the competition layout: image, image_name and (train) target."""
  feature = {"image": _bytes_feature(image_bytes),
             "image_name": _bytes_feature(str(row["image_name"]).encode())}
  if split == "train":
    feature["target"] = _int_feature(row["target"])
  return tf().train.Example(features=tf().train.Features(feature=feature)).SerializeToString(deterministic=True)


def shard_ranges(num_rows, num_shards):
  """Contiguous, near-equal [start, stop) row ranges; never an empty shard."""
  num_shards = max(1, min(num_shards, num_rows))
  bounds = np.linspace(0, num_rows, num_shards + 1).round().astype(int)
  return list(zip(bounds[:-1], bounds[1:]))


def write_resized_records(df, jpeg_bytes, out_dir, split, num_shards, codes):
  """Writes df's rows with the JPEGs of `jpeg_bytes` (same order) as resized-layout shards.

  Each shard is written to a temporary name and renamed when complete, so a killed run never leaves a
  file that looks whole. Returns the shard paths.
  """
  return _write_shards(df, jpeg_bytes, out_dir, split, num_shards,
                       lambda image, row: encode_example(image, row, codes, split))


def write_competition_records(df, jpeg_bytes, out_dir, split, num_shards):
  """Like write_resized_records, in the competition layout (other fields are joined from the CSV)."""
  return _write_shards(df, jpeg_bytes, out_dir, split, num_shards,
                       lambda image, row: encode_competition_example(image, row, split))


def _write_shards(df, jpeg_bytes, out_dir, split, num_shards, encode):
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  if df.empty:
    raise InputError(f"no {split} rows to write to {out_dir}")
  os.makedirs(out_dir, exist_ok=True)
  rows = df.to_dict("records")
  images = iter(jpeg_bytes)
  paths = []
  for index, (start, stop) in enumerate(shard_ranges(len(rows), num_shards)):
    path = os.path.join(out_dir, f"{split}{index:02d}-{stop - start}.tfrec")
    tmp = path + ".partial"
    with tf().io.TFRecordWriter(tmp) as writer:
      for row in rows[start:stop]:
        try:
          image = next(images)
        except StopIteration:
          raise ValueError(f"fewer images than the {len(rows)} rows of the {split} table") from None
        writer.write(encode(image, row))
    os.replace(tmp, path)
    paths.append(path)
  return paths


# ---------------------------------------------------------------------------------------------------------
# Reading.

def list_record_files(data_dir, split):
  """Sorted `{split}*.tfrec` files in data_dir or data_dir/tfrecords; InputError if there are none."""
  for folder in (data_dir, os.path.join(data_dir, "tfrecords")):
    files = sorted(glob.glob(os.path.join(folder, f"{split}*.tfrec")))
    if files:
      return files
  raise InputError(f"{data_dir}: no {split}*.tfrec files (looked in it and in its tfrecords/ folder)")


def iter_serialized(path):
  """Yields the serialized records of one file; InputError naming the file if it is corrupt or truncated."""
  if not os.path.isfile(path):
    raise InputError(f"{path}: TFRecord file not found")
  count = 0
  try:
    for record in tf().data.TFRecordDataset(path):
      count += 1
      yield record.numpy()
  except (tf().errors.DataLossError, tf().errors.InvalidArgumentError) as e:
    detail = re.search(r"(truncated|corrupted) record at \d+", str(e.message))
    raise InputError(f"{path}: corrupt or truncated TFRecord after {count} good record(s)"
                     + (f" ({detail.group(0)})" if detail else "")) from None


def _parse_raw(serialized, path):
  try:
    example = tf().train.Example.FromString(serialized)
  except Exception as e:  # pylint: disable=broad-except  (protobuf's DecodeError)
    raise InputError(f"{path}: a record is not a tf.train.Example ({e})") from None
  fields = {}
  for key, feature in example.features.feature.items():
    kind = feature.WhichOneof("kind")
    values = list(getattr(feature, kind).value) if kind else []
    fields[key] = values[0] if len(values) == 1 else values
  return fields


def _check_required(fields, path, index):
  """`fields`, after checking that `image` and `image_name` each hold one bytes value."""
  for key in ("image", "image_name"):
    if key not in fields:
      raise InputError(f"{path}: record {index} has no '{key}' feature (has {', '.join(sorted(fields))})")
    if not isinstance(fields[key], bytes):
      raise InputError(f"{path}: record {index}'s '{key}' feature must be one bytes value, found "
                       f"{type(fields[key]).__name__} {str(fields[key])[:40]}")
  return fields


def detect_layout(path):
  """'resized' if the first record has int64 metadata fields, else 'competition'."""
  for serialized in iter_serialized(path):
    _check_required(_parse_raw(serialized, path), path, 0)
    example = tf().train.Example.FromString(serialized)
    kinds = {k: f.WhichOneof("kind") for k, f in example.features.feature.items()}
    if kinds.get("patient_id") == "int64_list" or kinds.get("sex") == "int64_list":
      return "resized"
    return "competition"
  raise InputError(f"{path}: no records")


def read_examples(path, codes=None, table=None):
  """Yields every record of a file as a dict: `image` bytes, `image_name` str, other fields as stored.

  With `codes`, integer-coded categorical fields of the resized layout are decoded back to strings
  (None where missing). With `table` (a metadata DataFrame), fields the record lacks are joined from the
  table's row of the same image_name (None where the table has a missing value).
  """
  rows = table.set_index("image_name") if table is not None else None
  for index, serialized in enumerate(iter_serialized(path)):
    fields = _check_required(_parse_raw(serialized, path), path, index)
    fields["image_name"] = fields["image_name"].decode()
    for key, value in list(fields.items()):
      if isinstance(value, bytes) and key != "image":
        fields[key] = value.decode()
      elif codes is not None and key in INT_FIELDS and isinstance(value, int):
        fields[key] = decode_field(codes, key, value)
    if rows is not None:
      if fields["image_name"] not in rows.index:
        raise InputError(f"{path}: image {fields['image_name']} is not in {table.attrs.get('path', 'the CSV')}")
      for key, value in rows.loc[fields["image_name"]].items():
        if key not in fields:
          fields[key] = None if pd.isna(value) else value
    yield fields


# ---------------------------------------------------------------------------------------------------------
# JPEG folder -> TFRecords.

def load_resized_jpeg(path, size, quality=95):
  """A JPEG file centre-cropped to a square and resized to size x size, re-encoded; InputError if corrupt."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise InputError(f"{path}: image file not found")
  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
      width, height = image.size
      side = min(width, height)
      left, top = (width - side) // 2, (height - side) // 2
      image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)
  except Image.DecompressionBombError as e:
    raise InputError(f"{path}: refused as a possible decompression bomb ({e}; Pillow's limit is "
                     f"{2 * Image.MAX_IMAGE_PIXELS} pixels)") from None
  except Exception as e:  # pylint: disable=broad-except  (any decoder failure is this image's failure)
    raise InputError(f"{path}: corrupt or unreadable image ({type(e).__name__}: {e})") from None
  buffer = io.BytesIO()
  image.save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def _plain_name(name, csv_path, line):
  """`name`, after checking that it names a file directly inside the images folder."""
  if (not name or name in (".", "..") or os.path.isabs(name) or "/" in name or "\\" in name
      or os.sep in name or "\0" in name):
    raise InputError(f"{csv_path}: image_name {name!r} at line {line} is not a plain file name (no path "
                     "separators, '..' or absolute paths: images are read only from --images)")
  return name


def _check_outputs(csv_path, codes_path, out_dir, split):
  """Refuses an output folder whose CSV would overwrite the input or that holds shards of another run."""
  out_csv = os.path.join(out_dir, f"{split}.csv")
  if os.path.exists(out_csv) and os.path.samefile(out_csv, csv_path):
    raise InputError(f"{out_csv}: --out would write over the input CSV; choose another output folder")
  stale = glob.glob(os.path.join(out_dir, f"{split}*.tfrec"))
  if stale:
    raise InputError(f"{out_dir}: already holds {len(stale)} {split}*.tfrec shard(s) (e.g. "
                     f"{os.path.basename(sorted(stale)[0])}) that this conversion would mix with its own; "
                     "remove them or choose another output folder")
  out_codes = os.path.join(out_dir, CODES_FILE)
  return not (codes_path and os.path.exists(out_codes) and os.path.samefile(out_codes, codes_path))


def convert_folder(csv_path, images_dir, out_dir, size, split="train", num_shards=16, codes_path=None,
                   skip_corrupt=False):
  """Converts `images_dir/<image_name>.jpg` for every CSV row into resized-layout shards + codes.json.

  Never writes over its inputs: an output folder holding the input CSV or shards of an earlier conversion
  is refused. Image names must be plain file names inside `images_dir`. An image that cannot be converted
  (missing, corrupt, a decompression bomb) raises InputError naming the file, or with skip_corrupt is
  left out and counted. Returns a summary dict.
  """
  df = metadata.load_metadata(csv_path, split)
  write_codes = _check_outputs(csv_path, codes_path, out_dir, split)
  codes = load_codes(codes_path) if codes_path else fit_codes(df)
  start, kept, skipped = time.time(), [], []
  images = []
  for i, row in enumerate(df.itertuples(index=False)):
    path = os.path.join(images_dir, _plain_name(row.image_name, csv_path, i + 2) + ".jpg")
    try:
      images.append(load_resized_jpeg(path, size))
      kept.append(i)
    except InputError as e:
      if not skip_corrupt:
        raise
      skipped.append(row.image_name)
      logging.warning("skipping %s", e)
    if (i + 1) % 500 == 0:
      rate = (i + 1) / (time.time() - start)
      logging.info("%d/%d images, %.1f images/s, ETA %.0f s", i + 1, len(df), rate, (len(df) - i - 1) / rate)
  if not kept:
    raise InputError(f"{images_dir}: none of the {len(df)} image(s) of {csv_path} could be converted")
  paths = write_resized_records(df.iloc[kept], images, out_dir, split, num_shards, codes)
  if write_codes:
    save_codes(codes, os.path.join(out_dir, CODES_FILE))
  files.write_csv(df.iloc[kept], os.path.join(out_dir, f"{split}.csv"))
  if skipped:
    logging.warning("%d image(s) skipped, e.g. %s", len(skipped), ", ".join(skipped[:5]))
  return {"written": len(kept), "skipped": len(skipped), "shards": paths, "seconds": time.time() - start}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--csv", required=True, help="train.csv or test.csv")
  parser.add_argument("--images", required=True, help="folder of <image_name>.jpg")
  parser.add_argument("--out", required=True, help="output folder for the shards, codes.json and the CSV")
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--split", choices=("train", "test"), default="train")
  parser.add_argument("--num-shards", type=int, default=16)
  parser.add_argument("--codes", default=None, help="reuse codes.json of an earlier conversion (for test)")
  parser.add_argument("--skip-corrupt", action="store_true",
                      help="skip and count images that cannot be converted (missing, corrupt, too large)")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    summary = convert_folder(args.csv, args.images, args.out, args.size, args.split, args.num_shards,
                             args.codes, args.skip_corrupt)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: v for k, v in summary.items() if k != "shards"} | {"out": args.out}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
