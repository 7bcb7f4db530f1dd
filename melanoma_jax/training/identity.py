"""A run's identity: what defines the model a workdir holds, recorded before its first checkpoint.

WORKDIR/run.json holds every config field that changes what the checkpoints mean (task, model, image size,
folds and fold, seed, optimizer, batch, data source, ...) plus the data's digests: one of its CSVs
(`data.csv_sha256`) and the sha256 of every file the run reads (`data.files`: the CSVs and record files by
name), recomputed on every run (`data_files`; a cache in the workdir skips files whose size and modification
time are unchanged). A later train or predict on the same workdir compares its config and data with that
record alone, before restoring anything, and refuses a mismatch with one line naming the files that changed
or else the fields that differ (a record made before `data.files` existed is compared without it). In a multi-process run every process
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
DATA_FILES = "data.files"  # The record's {file name: sha256} of the data.
FILE_DIGESTS = "data_hashes.json"  # The cache of `data_files` (a workdir's own file).
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
    "optimizer.schedule": "seed",
    "target": "melanoma",
    "extra_data": "",
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


def data_files(paths, workdir):
  """{file name: sha256} of the files a run reads (its CSVs and record files), by name so a data folder that
  moves is still the same data; recomputed from the bytes, through WORKDIR's cache (see the module doc)."""
  digests = files.sha256_cached(paths, os.path.join(workdir, FILE_DIGESTS), write=distributed.is_primary())
  names = {}
  for path in paths:
    name = os.path.basename(path)
    names[name if name not in names else os.path.abspath(path)] = digests[path]
  return names


def of(config, digest, data_files=None):  # pylint: disable=redefined-outer-name
  """The identity of a run of `config` on data whose `data_digest` is `digest` and whose files hash to
  `data_files` (a `data_files` dict; None: not compared)."""
  fields = _flatten(config.to_dict() if hasattr(config, "to_dict") else dict(config))
  identity = {k: v for k, v in sorted(fields.items())
              if k not in MAY_CHANGE and not (k in ADDED and v == ADDED[k])}
  identity["data.csv_sha256"] = digest
  if data_files is not None:
    identity[DATA_FILES] = dict(sorted(data_files.items()))
  return json.loads(json.dumps(identity, default=str))  # As it reads back from run.json.


def _short(digest):
  return f"{digest[:12]}..." if digest else "absent"


def _changed_files(recorded, current):
  """One line on the files whose bytes differ from the record, or "" (also "" when either lacks them)."""
  if not isinstance(recorded, dict) or not isinstance(current, dict):
    return ""
  changed = [n for n in sorted(set(recorded) | set(current)) if recorded.get(n) != current.get(n)]
  shown = []
  for name in changed[:3]:
    if name not in current:
      shown.append(f"{name} (recorded, now not among the data)")
    elif name not in recorded:
      shown.append(f"{name} (new: not among the recorded data)")
    else:
      shown.append(f"{name} (sha256 {_short(recorded[name])} now {_short(current[name])})")
  more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
  return ", ".join(shown) + more


def of_data(config, workdir, train_csv, test_csv, record_files=()):
  """`of(config, ...)` with the digests of the data in `train_csv`, `test_csv` and `record_files`."""
  return of(config, data_digest(train_csv, test_csv),
            data_files([train_csv, test_csv, *record_files], workdir))


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
    checkpoints = os.path.join(workdir, "checkpoints")
    # The checkpoint manager creates the directory before this check: only steps in it are an older run's.
    if os.path.isdir(checkpoints) and os.listdir(checkpoints):
      logging.warning("%s has checkpoints but no %s (made before runs were recorded); recording this run's "
                      "config as its identity", workdir, RECORD)
    with files.atomic_path(path) as tmp, open(tmp, "w") as f:
      json.dump(identity, f, indent=2, sort_keys=True)
    return
  _compare(path, read_record(path), identity)


def read_record(path):
  """The identity recorded in `path` (a run.json); one-line InputError when unreadable."""
  try:
    with open(path) as f:
      recorded = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: unreadable run record ({e}); use another --workdir") from None
  if not isinstance(recorded, dict):
    raise InputError(f"{path}: not a run record (a JSON object of fields); use another --workdir")
  return recorded


def _compare(path, recorded, identity):
  files_changed = _changed_files(recorded.get(DATA_FILES), identity.get(DATA_FILES))
  if files_changed:
    raise InputError(f"{path}: the data of this run changed since it was recorded: {files_changed}; restore "
                     "the recorded data or use another --workdir")
  if DATA_FILES not in recorded or DATA_FILES not in identity:  # A record made before file digests existed.
    recorded, identity = ({k: v for k, v in d.items() if k != DATA_FILES} for d in (recorded, identity))
  differ = [k for k in sorted(set(recorded) | set(identity)) if recorded.get(k) != identity.get(k)]
  if differ:
    shown = ", ".join(f"{k} {recorded.get(k)!r} -> {identity.get(k)!r}" for k in differ[:4])
    more = f" and {len(differ) - 4} more" if len(differ) > 4 else ""
    raise InputError(f"{path}: this workdir holds a run of another config or data ({shown}{more}); use another "
                     f"--workdir, or the recorded values (only {', '.join(sorted(MAY_CHANGE))} may change)")


def for_checkpoint(identity):
  """What a checkpoint's meta keeps of the run's identity (`check_checkpoint`): its config fields."""
  return {k: v for k, v in identity.items() if not k.startswith("data.")}


def check_checkpoint(workdir, meta, checkpoint, identity=None):  # pylint: disable=redefined-outer-name
  """Raises InputError when the run whose checkpoint (a path, for the message) carries `meta` is not the run
  `identity` describes (None: WORKDIR/run.json's record). An edited `model.name` or `image_size` in run.json
  would otherwise restore into another model or predict at another size; a run.json deleted to train on
  with another config would otherwise resume this run's checkpoints. A checkpoint saved before meta carried
  the run ("run") is not compared."""
  saved = meta.get("run") if isinstance(meta, dict) else None
  if not isinstance(saved, dict):
    return
  path = os.path.join(workdir, RECORD)
  if identity is None:
    now = for_checkpoint(read_record(path)) if os.path.exists(path) else {}
  else:
    now = for_checkpoint(identity)
  differ = [k for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
  if not differ:
    return
  shown = ", ".join(f"{k} {saved.get(k)!r} in the checkpoint, {now.get(k)!r} here" for k in differ[:3])
  shown += f" and {len(differ) - 3} more" if len(differ) > 3 else ""
  if identity is None:
    raise InputError(f"{path}: does not describe the run of {checkpoint} ({shown}); it was edited after "
                     "training: restore the recorded values")
  raise InputError(f"{checkpoint}: holds a run of another config ({shown}); use another --workdir, or the "
                   "checkpoint's values")


def check_config(workdir, config):
  """Raises InputError when WORKDIR's record holds another config than `config` (the data left out): called
  before a run generates or reads its data, so a run of another config never regenerates the recorded run's
  synthetic set."""
  path = os.path.join(workdir, RECORD)
  if os.path.exists(path):
    recorded = {k: v for k, v in read_record(path).items() if not k.startswith("data.")}
    _compare(path, recorded, {k: v for k, v in of(config, None).items() if not k.startswith("data.")})


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
