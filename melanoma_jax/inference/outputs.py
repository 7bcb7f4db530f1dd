"""Output folders this project may write into: new or empty ones, or ones it made before (marked).

A folder made by these commands holds a marker file; a non-empty folder without it belongs to someone else
and is refused, so a mistyped --saliency or --out never mixes our files into (or replaces) a user's folder.
"""
import json
import os

from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError


def is_ours(folder, marker):
  return os.path.isfile(os.path.join(folder, marker))


def check_writable(folder, marker, flag):
  """Raises InputError if `folder` exists and is not a folder, or is non-empty without `marker`."""
  if os.path.exists(folder) and not os.path.isdir(folder):
    raise InputError(f"{flag}={folder}: exists and is not a folder")
  if os.path.isdir(folder) and os.listdir(folder) and not is_ours(folder, marker):
    raise InputError(f"{flag}={folder}: a non-empty folder this project did not create (no {marker}); "
                     "choose a new or empty folder")


def claim(folder, marker, flag, info):
  """Creates `folder` (after `check_writable`) and writes the marker, a JSON record of `info`."""
  check_writable(folder, marker, flag)
  os.makedirs(folder, exist_ok=True)
  with files.atomic_path(os.path.join(folder, marker)) as tmp, open(tmp, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
