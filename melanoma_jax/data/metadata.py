"""Load and validate the SIIM-ISIC metadata CSVs; check train/test patient leakage.

Missing values (sex, age_approx, site) stay missing (NaN): what to do with them is the model's choice.
"""
import os
import pathlib

import numpy as np
import pandas as pd

from melanoma_jax.utils.errors import InputError

EMBEDDED_DIR = pathlib.Path(__file__).resolve().parent / "siim_isic_2020"
EMBEDDED_TRAIN_CSV = EMBEDDED_DIR / "train.csv"
EMBEDDED_TEST_CSV = EMBEDDED_DIR / "test.csv"

BASE_COLUMNS = ("image_name", "patient_id", "sex", "age_approx", "anatom_site_general_challenge")
TRAIN_COLUMNS = BASE_COLUMNS + ("target",)
_STRING_COLUMNS = ("image_name", "patient_id", "sex", "anatom_site_general_challenge",
                   "diagnosis", "benign_malignant")


MIN_AGE, MAX_AGE = 0, 120


def read_table(path, source, not_found="file not found", **read_csv):
  """`pd.read_csv(path, **read_csv)`, or a one-line InputError beginning with `source` (the path, or the
  flag that named it): "`not_found`" for a missing file, "not a readable CSV (...)" for one pandas cannot
  parse. The one CSV reader of the metadata tables, the archive's download and --metadata."""
  if not os.path.isfile(path):
    raise InputError(f"{source}: {not_found}")
  try:
    return pd.read_csv(path, **read_csv)
  except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
    raise InputError(f"{source}: not a readable CSV ({str(e).splitlines()[0]})") from None


def load_metadata(path, split="train"):
  """Reads train.csv (split='train', needs `target`) or test.csv (split='test') and validates it.

  Raises InputError naming the file and the column for: a missing file, missing columns, an empty
  table, empty or duplicate image names, missing patient ids, non-numeric or implausible ages (outside
  0-120), targets not 0/1.
  """
  if split not in ("train", "test"):
    raise ValueError(f"split must be 'train' or 'test', got {split!r}")
  path = os.fspath(path)
  df = read_table(path, path, "metadata file not found", dtype={c: "string" for c in _STRING_COLUMNS})
  required = TRAIN_COLUMNS if split == "train" else BASE_COLUMNS
  missing = [c for c in required if c not in df.columns]
  if missing:
    raise InputError(f"{path}: missing required column(s) {', '.join(missing)} "
                     f"(has {', '.join(map(str, df.columns))})")
  if df.empty:
    raise InputError(f"{path}: no rows")
  check_filled(df, ("image_name", "patient_id"), path)
  duplicated = df["image_name"].duplicated()
  if duplicated.any():
    first = df.loc[duplicated, "image_name"].iloc[0]
    raise InputError(f"{path}: column image_name has {int(duplicated.sum())} duplicate(s), e.g. {first}")
  df["age_approx"] = parse_ages(df["age_approx"], path)
  if "target" in df.columns:
    target = pd.to_numeric(df["target"], errors="coerce")
    bad = ~target.isin([0, 1])
    if bad.any():
      raise InputError(f"{path}: column target must be 0 or 1, found {df.loc[bad, 'target'].iloc[0]!r} "
                       f"in {int(bad.sum())} row(s)")
    df["target"] = target.astype("int64")
  for column in ("sex", "anatom_site_general_challenge", "diagnosis", "benign_malignant"):
    if column in df.columns:
      df[column] = df[column].astype(object).where(df[column].notna(), np.nan)
  for column in ("image_name", "patient_id"):
    df[column] = df[column].astype(str)
  df.attrs["path"] = path
  return df


def check_filled(df, columns, source):
  """Raises InputError naming `source`, the column, the count and the first line (header = line 1) when a
  row of one of `columns` is empty or blank."""
  for column in columns:
    empty = df[column].isna() | (df[column].str.strip() == "")
    if empty.any():
      raise InputError(f"{source}: column {column} is empty in {int(empty.sum())} row(s), "
                       f"first at line {int(np.argmax(empty.to_numpy())) + 2}")


def parse_ages(values, source):
  """`age_approx` values as float64 (missing stays NaN); InputError naming `source` and the line for a
  non-numeric value or an age outside MIN_AGE-MAX_AGE."""
  age = pd.to_numeric(values, errors="coerce")
  bad = (age.isna() & values.notna()).to_numpy()
  if bad.any():
    first = int(np.argmax(bad))
    raise InputError(f"{source}: column age_approx has non-numeric value {values.iloc[first]!r} at line {first + 2}")
  implausible = (age.notna() & ~age.between(MIN_AGE, MAX_AGE)).to_numpy()
  if implausible.any():  # Min-Max scaling would squash every other age into a sliver of [0, 1].
    first = int(np.argmax(implausible))
    raise InputError(f"{source}: column age_approx has implausible value {age.iloc[first]:g} at line {first + 2} "
                     f"(ages must be {MIN_AGE}-{MAX_AGE}; {int(implausible.sum())} such row(s))")
  return age.astype("float64")


def check_leakage(train_df, test_df, max_listed=5):
  """Raises InputError when any patient_id is in both tables; returns a one-line report otherwise."""
  shared = sorted(set(train_df["patient_id"]) & set(test_df["patient_id"]))
  train_path = train_df.attrs.get("path", "train")
  test_path = test_df.attrs.get("path", "test")
  if shared:
    raise InputError(
        f"{train_path} and {test_path}: {len(shared)} patient_id(s) in both train and test "
        f"(data leakage), e.g. {', '.join(shared[:max_listed])}")
  return (f"leakage check passed: {train_df['patient_id'].nunique()} train patients and "
          f"{test_df['patient_id'].nunique()} test patients, none shared")
