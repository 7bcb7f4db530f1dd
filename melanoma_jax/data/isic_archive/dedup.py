"""Images the archive sets must not repeat: those in the 2020 data, and those of 2018 that 2019 also holds.

ISIC ids are unique across the archive, so the same id is the same image:
- an image whose id is in the 2020 training table (`image_name` of train.csv; the embedded one by default) is
  left out, so an external image never duplicates (or leaks into the validation folds as) a 2020 image;
- ISIC 2019 contains HAM10000 (2018). The 2019 set keeps its copy; the 2018 set leaves out every id the 2019
  ground truth lists when that download is in the same manual folder, so both sets together hold each image
  once. Without the 2019 download there, nothing can be checked and the report says so.
The report (counts and the first ids) goes into the dataset's metadata.json and the command's output.
"""
import os

import pandas as pd

from melanoma_jax.data import metadata
from melanoma_jax.data.isic_archive import download
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

MAX_LISTED = 10  # Ids named in a report per reason; the count is always whole.


def ids_2020(path=None):
  """The image names of a 2020 training table (default: the embedded train.csv)."""
  path = os.fspath(path or metadata.EMBEDDED_TRAIN_CSV)
  if not os.path.isfile(path):
    raise InputError(f"{path}: 2020 training table not found (--exclude_2020)")
  try:
    names = pd.read_csv(path, usecols=["image_name"], dtype=str)["image_name"]
  except ValueError as e:  # pandas: usecols names a column the file lacks, or the file is not a CSV.
    raise InputError(f"{path}: not a 2020 training table with an image_name column "
                     f"({str(e).splitlines()[0]})") from None
  return set(names.dropna().str.strip()), os.path.abspath(path)


def _entry(ids, **extra):
  ids = sorted(ids)
  return {"count": len(ids), "ids": ids[:MAX_LISTED], **extra}


def deduplicate(table, year, manual_dir, exclude_2020=None):
  """(the rows of `table` to write, the report) for one year's table of `download.read_download`."""
  in_2020, source = ids_2020(exclude_2020)
  ids = set(table["image_name"])
  excluded_2020 = ids & in_2020
  report = {"year": int(year), "listed": len(table),
            "without_metadata": int(table.attrs.get("without_metadata", 0)),
            "excluded": {"in_2020": _entry(excluded_2020, source=source, source_sha256=files.sha256(source))}}
  leave_out = set(excluded_2020)
  other = 2019 if int(year) == 2018 else 2018
  other_ids = download.listed_ids(manual_dir, other)
  report[f"{other}_download"] = "absent" if other_ids is None else "found"
  if other_ids is not None:
    shared = (ids - excluded_2020) & other_ids
    if other == 2019:
      report["excluded"]["in_2019"] = _entry(shared, note="the 2019 set holds them")
      leave_out |= shared
    else:
      report["also_in_2018"] = _entry(shared, note="kept here; the 2018 set leaves them out")
  kept = table[~table["image_name"].isin(leave_out)].reset_index(drop=True)
  report["written"] = len(kept)
  if kept.empty:
    raise InputError(f"{os.path.join(os.fspath(manual_dir), download.layout(year).ground_truth_csv)}: every one "
                     f"of its {len(table)} image(s) is a duplicate (in the 2020 data or the 2019 set); "
                     "nothing to write")
  return kept, report


def report_lines(report):
  """The report as short lines for the command's output."""
  lines = [f"ISIC {report['year']}: {report['written']} of {report['listed']} listed image(s) written"]
  for reason, entry in report["excluded"].items():
    where = {"in_2020": f"in the 2020 data ({entry.get('source', '')})",
             "in_2019": "in the 2019 set (written there)"}.get(reason, reason)
    lines.append(f"  left out {entry['count']} image(s) also {where}" + _some(entry))
  if "also_in_2018" in report:
    entry = report["also_in_2018"]
    lines.append(f"  kept {entry['count']} image(s) the 2018 download also holds (the 2018 set leaves them "
                 "out)" + _some(entry))
  if report.get("2019_download") == "absent":  # Only the 2018 set leaves shared images out.
    lines.append("  no 2019 download beside this one: images the 2019 set also holds were not checked")
  if report["without_metadata"]:
    lines.append(f"  {report['without_metadata']} image(s) have no metadata row (age, sex, site blank)")
  return lines


def _some(entry):
  return f": {', '.join(entry['ids'])}{', ...' if entry['count'] > len(entry['ids']) else ''}" if entry["count"] else ""
