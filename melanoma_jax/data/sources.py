"""Where the image data of a run lives: CSVs + TFRecords of a data_dir, validated and leakage-checked.

A data_dir is either the Kaggle competition folder (`train.csv`, `test.csv`, `tfrecords/train*.tfrec`,
`tfrecords/test*.tfrec`), a resized set (`train*.tfrec`, `test*.tfrec` and the CSVs side by side), or the
synthetic set this project generates (the resized layout).
"""
import dataclasses
import os
from typing import List

import pandas as pd

from melanoma_jax.data import metadata, records
from melanoma_jax.utils.errors import InputError


@dataclasses.dataclass(frozen=True)
class ImageData:
  data_dir: str
  train_df: pd.DataFrame
  test_df: pd.DataFrame
  train_files: List[str]
  test_files: List[str]
  layout: str
  leakage_report: str


def _find_csv(data_dir, name):
  for path in (os.path.join(data_dir, name), os.path.join(data_dir, "..", name)):
    if os.path.isfile(path):
      return path
  raise InputError(f"{os.path.join(data_dir, name)}: metadata file not found")


def csv_paths(data_dir):
  """(train.csv, test.csv) of `data_dir` (beside its records, or one folder up as in the Kaggle layout), or
  of the real ISIC 2020 metadata embedded in the package when `data_dir` is ""."""
  if not data_dir:
    return metadata.EMBEDDED_TRAIN_CSV, metadata.EMBEDDED_TEST_CSV
  return _find_csv(data_dir, "train.csv"), _find_csv(data_dir, "test.csv")


def resolve(data_dir):
  """Validates the CSVs and finds the record files of `data_dir`; refuses leaking patients."""
  if not os.path.isdir(data_dir):
    raise InputError(f"{data_dir}: data directory not found")
  train_csv, test_csv = csv_paths(data_dir)
  train_df, test_df = metadata.load_metadata(train_csv, "train"), metadata.load_metadata(test_csv, "test")
  report = metadata.check_leakage(train_df, test_df)
  train_files = records.list_record_files(data_dir, "train")
  test_files = records.list_record_files(data_dir, "test")
  layout = records.detect_layout(train_files[0])
  return ImageData(data_dir, train_df, test_df, train_files, test_files, layout, report)
