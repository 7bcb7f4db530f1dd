"""A run's identity: what defines the model a workdir holds, recorded before its first checkpoint.

WORKDIR/run.json holds every config field that changes what the checkpoints mean (task, model, image size,
folds and fold, seed, optimizer, batch, data source, ...) plus a hash of the data's CSVs. A later train or
predict on the same workdir compares its config with that record alone, before restoring anything, and
refuses a mismatch with one line naming the fields that differ. In a multi-process run every process
checks an existing record, process 0 alone writes a new one, and the others check it after a barrier. Fields
that may change between runs of the same model (`MAY_CHANGE`: more epochs, logging, prediction-time settings)
are left out of the record. So are fields added to the config after runs were recorded (`ADDED`) while they
hold the value every earlier run had, so a workdir recorded before such a field existed still matches; any
other value is recorded and compared.

`recorded_config(workdir)` gives the config of the run a workdir holds, with no --config: results.json's
full config (written when training finishes), run.json's fields over it (authoritative for every field that
defines the model, and present whenever there is a checkpoint), then each `MAY_CHANGE` field neither holds
at its default there (a run that never finished predicts without TTA), and each `ADDED` field neither holds
at the value earlier runs had, where its section exists (a tabular run gets no synthetic section).
"""
import hashlib
import json
import os

import ml_collections
from absl import logging

from melanoma_jax.training import distributed
from melanoma_jax.training.results import NAME as RESULTS
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

RECORD = "run.json"
# Fields a rerun may change, with the value prediction uses when a run recorded none: they extend or
# observe a run without changing what its checkpoints hold.
MAY_CHANGE = {
    "num_epochs": 1,  # Extends a run (or, tabular, raises the early-stopping ceiling).
    "log_every_steps": 1, "checkpoints_to_keep": 1, "tta": False, "skip_corrupt": False, "calibrate": False,
    "model.remat": False, "model.kernels": "auto",  # How the same values are computed.
}
# Fields added to the config after runs were recorded, with the value every earlier run had.
ADDED = {
    "synthetic.generator": "dermoscopy",  # Another generator also changes the data digest (its record files).
}


def _flatten(tree, prefix=""):
  flat = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      flat.update(_flatten(value, name + "."))
    else:
      flat[name] = list(value) if isinstance(value, tuple) else value
  return flat


def csv_digest(*paths):
  """sha256 of the files' bytes, in order (the data's tables, whose rows and labels define a run)."""
  return files.sha256(*paths)


def data_digest(train_csv, test_csv):
  """The digest of a run's data: its two CSVs and, for a synthetic set, the sha256 of every record file its
  manifest (synthetic.json beside train.csv) lists, so a set regenerated with other images but the same
  tables is another run's data, while a byte-identical regeneration (a new generator version drawing the
  same images) is not. Real record files are not hashed: they are too large to read on every run."""
  digest = csv_digest(train_csv, test_csv)
  manifest = os.path.join(os.path.dirname(os.path.abspath(train_csv)), "synthetic.json")
  if not os.path.isfile(manifest):
    return digest
  with open(manifest, encoding="utf-8") as f:
    listed = json.load(f).get("files", {})
  records = sorted((name, entry.get("sha256")) for name, entry in listed.items() if name.endswith(".tfrec"))
  return hashlib.sha256(json.dumps([digest, records]).encode("utf-8")).hexdigest()


def of(config, digest):
  """The identity of a run of `config` on data whose `data_digest` is `digest`."""
  fields = _flatten(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  identity = {k: v for k, v in sorted(fields.items())
              if k not in MAY_CHANGE and not (k in ADDED and v == ADDED[k])}
  identity["data.csv_sha256"] = digest
  return json.loads(json.dumps(identity, default=str))  # As it reads back from run.json.


def check_or_record(workdir, identity, record=True):
  """Raises InputError unless `identity` matches WORKDIR's record; records it where there is none (and
  `record`: prediction only checks). Every process of a run must call it."""
  path = os.path.join(workdir, RECORD)
  existed = os.path.exists(path)
  # Every process sees the same record, so a refusal happens in all of them before the barrier.
  _check_or_record(workdir, path, identity, record=record and distributed.is_primary())
  distributed.barrier("run.json")
  if not existed and not distributed.is_primary():
    _check_or_record(workdir, path, identity, record=False)  # Process 0's new record.


def _check_or_record(workdir, path, identity, record):
  if not os.path.exists(path):
    if not record:
      return
    if os.path.isdir(os.path.join(workdir, "checkpoints")):
      logging.warning("%s has checkpoints but no %s (made before runs were recorded); recording this run's "
                      "config as its identity", workdir, RECORD)
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
      json.dump(identity, f, indent=2, sort_keys=True)
    return
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: unreadable run record ({e}); use another --workdir") from None
  differ = [k for k in sorted(set(recorded) | set(identity)) if recorded.get(k) != identity.get(k)]
  if differ:
    shown = ", ".join(f"{k} {recorded.get(k)!r} -> {identity.get(k)!r}" for k in differ[:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    raise InputError(f"{path}: this workdir holds a run of another config or data ({shown}{more}); use another "
                     f"--workdir, or the recorded values (only {', '.join(sorted(MAY_CHANGE))} may change)")


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: unreadable ({e})") from None


def _set(tree, dotted, value):
  *parents, leaf = dotted.split(".")
  for parent in parents:
    tree = tree.setdefault(parent, {})
  tree[leaf] = value


def _has(tree, dotted):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return False
    tree = tree[part]
  return True


def recorded_config(workdir, overrides=None) -> ml_collections.ConfigDict:
  """The config of the run in `workdir` (see the module doc), then `overrides` ({dotted name: value})."""
  run_path, results_path = os.path.join(workdir, RECORD), os.path.join(workdir, RESULTS)
  if not os.path.isdir(workdir):
    raise InputError(f"{workdir}: workdir not found")
  if not os.path.exists(run_path) and not os.path.exists(results_path):
    raise InputError(f"{workdir}: not a training run (neither {RECORD} nor {RESULTS}); train with main.py first")
  tree = _read_json(results_path).get("config", {}) if os.path.exists(results_path) else {}
  for field, value in (_read_json(run_path) if os.path.exists(run_path) else {}).items():
    if not field.startswith("data."):  # data.csv_sha256: the data's hash, not a config field.
      _set(tree, field, value)
  for field, value in MAY_CHANGE.items():
    if not _has(tree, field):
      _set(tree, field, value)
  for field, value in ADDED.items():
    section = field.rpartition(".")[0]
    if not _has(tree, field) and (not section or _has(tree, section)):
      _set(tree, field, value)
  for field, value in (overrides or {}).items():
    _set(tree, field, value)
  return ml_collections.ConfigDict(tree)


def task_of(workdir):
  """The task of the run in `workdir` ("image", "ensemble", "tabular"); InputError if it holds no run."""
  return recorded_config(workdir).get("task", "image")
