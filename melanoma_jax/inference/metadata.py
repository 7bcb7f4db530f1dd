"""--metadata=CSV for the predict command: one row of tabular metadata per image file, for ensemble fusion.

Columns: `image_name` (or `image`), `patient_id`, `sex`, `age_approx`, `anatom_site_general_challenge`
(test.csv's columns; others are ignored). A row belongs to the file whose name without its extension equals
the row's image name (itself with or without a .jpg/.jpeg/.png extension). sex, age and site may be empty
(the tabular encoder has a missing state for each); a missing column, an empty image name or patient id, a
duplicate image name or a non-numeric or implausible age (data/metadata.py's rules) is refused with one line naming the CSV and the column.
"""
import os

import pandas as pd

from melanoma_jax.data import metadata
from melanoma_jax.inference.images import EXTENSIONS
from melanoma_jax.utils.errors import InputError

NAME_COLUMNS = ("image_name", "image")
COLUMNS = ("patient_id", "sex", "age_approx", "anatom_site_general_challenge")


def key(name):
  """The matching key of a file or image name: its name without a .jpg/.jpeg/.png extension (any case)."""
  name = os.path.basename(str(name).strip())
  stem, ext = os.path.splitext(name)
  return stem if ext.lower() in EXTENSIONS else name


def read(path):
  """DataFrame of the CSV's rows indexed by `key(image name)`: patient_id (str), sex and
  anatom_site_general_challenge (object, NaN when empty), age_approx (float64); attrs["path"] = path."""
  path = os.fspath(path)
  df = metadata.read_table(path, f"--metadata={path}", dtype=str, keep_default_na=True)
  return table_of(df, f"--metadata={path}", path)


def table_of(df, source, path):
  """The table `read` gives, of a DataFrame of strings (a CSV's, or the model server's per-image metadata):
  the same columns, checks and dtypes; refusals name `source`, attrs["path"] = `path`."""
  name_column = next((c for c in NAME_COLUMNS if c in df.columns), None)
  missing = ([] if name_column else ["image_name (or image)"]) + [c for c in COLUMNS if c not in df.columns]
  if missing:
    raise InputError(f"{source}: missing column(s) {', '.join(missing)}")
  metadata.check_filled(df, (name_column, "patient_id"), source)
  keys = df[name_column].map(key)
  duplicated = keys.duplicated()
  if duplicated.any():
    raise InputError(f"{source}: column {name_column} names image {keys[duplicated].iloc[0]} twice")
  age = metadata.parse_ages(df["age_approx"], source)
  # The dtypes data/metadata.py gives test.csv, so the tabular encoder sees identical values.
  table = pd.DataFrame({"image_name": df[name_column].astype(str).to_numpy(),
                        "patient_id": df["patient_id"].str.strip().astype(str).to_numpy(),
                        "sex": df["sex"].astype(object).where(df["sex"].notna(), float("nan")).to_numpy(),
                        "age_approx": age.to_numpy(),
                        "anatom_site_general_challenge": df["anatom_site_general_challenge"].astype(object).where(
                            df["anatom_site_general_challenge"].notna(), float("nan")).to_numpy()},
                       index=pd.Index(keys.to_numpy(), name="key"))
  table.attrs["path"] = path
  return table
