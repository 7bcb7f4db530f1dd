"""The predict command's CSV: every file name reads back as written, and none is run as a spreadsheet formula.

* Every text field is quoted (`csv.QUOTE_NONNUMERIC`), so a name holding a comma, a quote (doubled), a line
  feed or a carriage return reads back as one field of one row with `pandas.read_csv` and the `csv` module.
  The file is UTF-8; a name that is not valid UTF-8 (possible on Linux) is written with backslash escapes.
* A name beginning with `=`, `+`, `-`, `@`, a tab or a carriage return would be read as a formula by a
  spreadsheet (CSV injection); as OWASP advises, such a name is written with a single quote `'` in front, in
  the `image` column itself (a separate display column would leave the formula in the name column). So that
  every name stays recoverable, a name beginning with `'` gets one too: the file name is the `image` value
  with one leading `'` removed, if it has one (`file_name`).
"""
import csv

from melanoma_jax.utils import files

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def cell(name: str):
  """The `image` value written for file name `name`: `name`, with a leading `'` when it needs one."""
  name = name.encode("utf-8", "backslashreplace").decode("utf-8")
  return "'" + name if name.startswith(FORMULA_STARTS + ("'",)) else name


def file_name(value: str):
  """The file name an `image` value was written for (the inverse of `cell` for UTF-8 names)."""
  return value[1:] if value.startswith("'") else value


def write(rows, columns, path):
  """Writes `rows` (dicts with the `columns`, `image` a file name) to `path` atomically, as the module says."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  frame = pd.DataFrame([dict(row, image=cell(row["image"])) for row in rows], columns=columns)
  return files.write_csv(frame, path, quoting=csv.QUOTE_NONNUMERIC, encoding="utf-8")
