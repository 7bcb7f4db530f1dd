"""A run's identity: what defines the model a workdir holds, recorded before its first checkpoint.

WORKDIR/run.json holds every config field that changes what the checkpoints mean (task, model, image size,
folds and fold, seed, optimizer, batch, data source, ...) plus a hash of the data's CSVs. A later train or
predict on the same workdir compares its config with that record alone, before restoring anything, and
refuses a mismatch with one line naming the fields that differ. In a multi-process run every process
checks an existing record, process 0 alone writes a new one, and the others check it after a barrier. Fields that may change between runs of the
same model (`MAY_CHANGE`: more epochs, logging, prediction-time settings) are left out of the record.
"""
import hashlib
import json
import os

from absl import logging

from melanoma_jax.training import distributed
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

RECORD = "run.json"
# Fields a rerun may change: they extend or observe a run without changing what its checkpoints hold.
MAY_CHANGE = frozenset({
    "num_epochs",  # Extends a run (or, tabular, raises the early-stopping ceiling).
    "log_every_steps", "checkpoints_to_keep", "tta", "skip_corrupt", "calibrate",
    "model.remat", "model.kernels",  # How the same values are computed.
})


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
  identity = {k: v for k, v in sorted(fields.items()) if k not in MAY_CHANGE}
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
