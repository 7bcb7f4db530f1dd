"""The manual downloads of each challenge year: where the files are, and one table of what they say.

`read_download(manual_dir, year)` reads the ground-truth and metadata CSVs of one year, checks them and the
listed images against the download (one InputError line naming the file and the problem), and returns a
DataFrame with one row per image: image_name (the ISIC id, without the archive's `_downsampled` suffix),
path (the JPEG), diagnosis (a class of CLASSES), age_approx (float, NaN when blank), sex and
anatom_site_general_challenge (2020 vocabulary, "" when unknown), lesion_id ("" when blank).
"""
import dataclasses
import os
import re

import numpy as np
import pandas as pd

from melanoma_jax.data import diagnosis as diagnosis_lib
from melanoma_jax.data import metadata
from melanoma_jax.data.isic_archive import sites
from melanoma_jax.utils.errors import InputError

# The ISIC 2019 classes; 2020's diagnoses and 2018's are mapped onto them. UNK is empty in the 2019
# training set but kept, so the class indices are the same in every year and in the 2020 mapping.
CLASSES = diagnosis_lib.CLASSES  # The ISIC 2019 classes, the diagnosis target's (MEL first).
MELANOMA = diagnosis_lib.CLASSES[diagnosis_lib.MEL]
SUFFIX = "_downsampled"  # The archive's name for images it stores smaller than the original.


@dataclasses.dataclass(frozen=True)
class Layout:
  """One year's download: the image folder, the CSVs, and how their columns read."""
  year: int
  images_dir: str
  ground_truth_csv: str
  class_columns: dict  # {CSV column: class of CLASSES}
  metadata_csv: str
  metadata_columns: dict  # {CSV column: our column}; "image_name" is the key joined on.


LAYOUTS = {
    2019: Layout(
        year=2019, images_dir="ISIC_2019_Training_Input",
        ground_truth_csv="ISIC_2019_Training_GroundTruth.csv",
        class_columns={c: c for c in CLASSES},
        metadata_csv="ISIC_2019_Training_Metadata.csv",
        metadata_columns={"image": "image_name", "age_approx": "age_approx", "sex": "sex",
                          "anatom_site_general": "site", "lesion_id": "lesion_id"}),
    2018: Layout(
        year=2018, images_dir="ISIC2018_Task3_Training_Input",
        ground_truth_csv="ISIC2018_Task3_Training_GroundTruth.csv",
        class_columns={"MEL": "MEL", "NV": "NV", "BCC": "BCC", "AKIEC": "AK", "BKL": "BKL", "DF": "DF",
                       "VASC": "VASC"},
        metadata_csv="HAM10000_metadata.csv",
        metadata_columns={"image_id": "image_name", "age": "age_approx", "sex": "sex",
                          "localization": "site", "lesion_id": "lesion_id"}),
}
YEARS = tuple(sorted(LAYOUTS))
COLUMNS = ("image_name", "path", "diagnosis", "age_approx", "sex", "anatom_site_general_challenge",
           "lesion_id")

_PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def layout(year):
  try:
    return LAYOUTS[int(year)]
  except (KeyError, ValueError, TypeError):
    raise InputError(f"year must be one of {', '.join(map(str, YEARS))}, got {year!r}") from None


def isic_id(name):
  """The ISIC id of an archive image name: the name without the `_downsampled` suffix."""
  name = str(name).strip()
  return name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name


def _read_csv(path, columns):
  df = metadata.read_table(path, path, "file not found (part of the manual download; see "
                           "MANUAL_DOWNLOAD_INSTRUCTIONS)", dtype=str, keep_default_na=False)
  missing = [c for c in columns if c not in df.columns]
  if missing:
    raise InputError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(map(str, df.columns))})")
  if df.empty:
    raise InputError(f"{path}: no rows")
  return df


def _ids(df, column, path):
  """The ISIC ids of `column`, checked: plain file names, none blank, none twice."""
  names = df[column].str.strip()
  for line, name in enumerate(names, start=2):
    if not _PLAIN_NAME.match(name):
      raise InputError(f"{path}: image name {name!r} at line {line} is not a plain file name")
  ids = names.map(isic_id)
  twice = ids.duplicated()
  if twice.any():
    line = int(np.argmax(twice.to_numpy())) + 2
    raise InputError(f"{path}: image {ids[twice].iloc[0]} is listed twice (again at line {line})")
  return names, ids


def _diagnoses(df, lay, path):
  """The class of each ground-truth row; InputError for a row that is not one-hot."""
  columns = list(lay.class_columns)
  values = df[columns].apply(lambda c: pd.to_numeric(c.str.strip(), errors="coerce")).to_numpy(np.float64)
  bad = ~(np.isin(values, (0.0, 1.0)).all(axis=1) & (values.sum(axis=1) == 1.0))
  if bad.any():
    row = int(np.argmax(bad))
    raise InputError(f"{path}: the row of {df['image'].iloc[row].strip()} (line {row + 2}) is not one-hot over "
                     f"{', '.join(columns)}: {', '.join(df[columns].iloc[row])} ({int(bad.sum())} such row(s))")
  return [lay.class_columns[columns[i]] for i in values.argmax(axis=1)]


def _image_path(images_dir, name):
  """The JPEG of a listed name: as listed, or the id with or without the `_downsampled` suffix."""
  base = isic_id(name)
  for candidate in (name, base, base + SUFFIX):
    path = os.path.join(images_dir, candidate + ".jpg")
    if os.path.isfile(path):
      return path
  return None


def _metadata(manual_dir, lay):
  path = os.path.join(manual_dir, lay.metadata_csv)
  df = _read_csv(path, lay.metadata_columns)
  df = df[list(lay.metadata_columns)].rename(columns=lay.metadata_columns)
  _, df["image_name"] = _ids(df, "image_name", path)
  ages = df["age_approx"].str.strip().replace("", np.nan)
  df["age_approx"] = metadata.parse_ages(ages, path).to_numpy()
  return df.set_index("image_name")


def read_download(manual_dir, year):
  """The checked table of one year's download (see the module docstring); InputError on a bad download."""
  lay = layout(year)
  manual_dir = os.fspath(manual_dir)
  if not os.path.isdir(manual_dir):
    raise InputError(f"{manual_dir}: manual download folder not found")
  truth_path = os.path.join(manual_dir, lay.ground_truth_csv)
  truth = _read_csv(truth_path, ("image",) + tuple(lay.class_columns))
  names, ids = _ids(truth, "image", truth_path)
  diagnoses = _diagnoses(truth, lay, truth_path)
  meta = _metadata(manual_dir, lay)
  images_dir = os.path.join(manual_dir, lay.images_dir)
  if not os.path.isdir(images_dir):
    raise InputError(f"{images_dir}: image folder not found (part of the manual download)")
  rows = []
  for line, (name, image_id, diagnosis) in enumerate(zip(names, ids, diagnoses), start=2):
    path = _image_path(images_dir, name)
    if path is None:
      raise InputError(f"{os.path.join(images_dir, name + '.jpg')}: image listed in {lay.ground_truth_csv} "
                       f"(line {line}) is absent")
    info = meta.loc[image_id] if image_id in meta.index else {}
    rows.append({"image_name": image_id, "path": path, "diagnosis": diagnosis,
                 "age_approx": sites.age(info.get("age_approx")), "sex": sites.sex(info.get("sex")),
                 "anatom_site_general_challenge": sites.site_2020(info.get("site")),
                 "lesion_id": str(info.get("lesion_id", "") or "").strip()})
  table = pd.DataFrame(rows, columns=COLUMNS)
  table.attrs["without_metadata"] = int((~table["image_name"].isin(meta.index)).sum())
  return table


def listed_ids(manual_dir, year):
  """The ISIC ids a year's ground-truth CSV lists, or None when that download is not in manual_dir."""
  path = os.path.join(os.fspath(manual_dir), layout(year).ground_truth_csv)
  if not os.path.isfile(path):
    return None
  return set(_ids(_read_csv(path, ("image",)), "image", path)[1])
