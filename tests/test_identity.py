"""A run's data identity by content: file digests recomputed on every run (through a cache keyed by size,
modification time and inode), changed files named, records made before file digests still matching, and a
run of another config refused before its data is generated or read."""
import json
import os

import pytest

from configs import image as image_config
from melanoma_jax.training import identity
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError


def _data(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "train.csv").write_text("image_name,patient_id,target\na,p1,0\nb,p2,1\n")
  (data / "test.csv").write_text("image_name,patient_id\nc,p3\n")
  (data / "train00-2.tfrec").write_bytes(bytes(range(256)) * 64)
  return [str(data / n) for n in ("train.csv", "test.csv", "train00-2.tfrec")]


def _identity(paths, workdir, config=None):
  return identity.of_data(config or image_config.get_config(), str(workdir), *paths[:2], paths[2:])


def test_same_size_edits_of_any_data_file_are_refused_naming_the_file(tmp_path):
  paths = _data(tmp_path)
  workdir = tmp_path / "run"
  workdir.mkdir()
  identity.check_or_record(str(workdir), _identity(paths, workdir))
  recorded = json.loads((workdir / "run.json").read_text())
  assert recorded["data.files"] == {os.path.basename(p): files.sha256(p) for p in paths}
  identity.check_or_record(str(workdir), _identity(paths, workdir))  # Unchanged data matches.

  record = paths[2]
  original = open(record, "rb").read()
  with open(record, "r+b") as f:  # One byte, same size: the cache must not hide it.
    f.seek(1000)
    f.write(b"\xff")
  with pytest.raises(InputError) as e:
    identity.check_or_record(str(workdir), _identity(paths, workdir))
  message = str(e.value)
  assert message.startswith(f"{workdir / 'run.json'}: the data of this run changed since it was recorded: "
                            "train00-2.tfrec (sha256 ") and "\n" not in message
  with open(record, "wb") as f:
    f.write(original)

  csv = paths[0]
  text = open(csv).read()
  with open(csv, "w") as f:
    f.write(text.replace("a,p1,0", "a,p1,1"))  # A flipped label.
  with pytest.raises(InputError, match=r"changed since it was recorded: train\.csv \(sha256 "):
    identity.check_or_record(str(workdir), _identity(paths, workdir))
  with open(csv, "w") as f:
    f.write(text)
  os.remove(record)
  with pytest.raises(InputError, match=r"train00-2\.tfrec \(recorded, now not among the data\)"):
    identity.check_or_record(str(workdir), _identity(paths[:2], workdir))


def test_the_cache_skips_unchanged_files_and_rereads_changed_ones(tmp_path):
  paths = _data(tmp_path)
  cache = str(tmp_path / "hashes.json")
  digests = files.sha256_cached(paths, cache)
  assert digests == {p: files.sha256(p) for p in paths}
  # A forged entry for an unchanged file is believed: the file was not read again.
  saved = json.loads(open(cache).read())
  saved[os.path.realpath(paths[2])][3] = "f" * 64
  with open(cache, "w") as f:
    json.dump(saved, f)
  assert files.sha256_cached(paths, cache)[paths[2]] == "f" * 64
  with open(paths[2], "ab") as f:  # Any write moves the modification time (and here the size).
    f.write(b"x")
  assert files.sha256_cached(paths, cache)[paths[2]] == files.sha256(paths[2])
  with open(cache, "w") as f:
    f.write("not json")  # A damaged cache costs a reread, nothing else.
  assert files.sha256_cached(paths, cache) == {p: files.sha256(p) for p in paths}


def test_a_record_made_before_file_digests_still_matches(tmp_path):
  paths = _data(tmp_path)
  workdir = tmp_path / "run"
  workdir.mkdir()
  current = _identity(paths, workdir)
  old = {k: v for k, v in current.items() if k != "data.files"}
  (workdir / "run.json").write_text(json.dumps(old))
  identity.check_or_record(str(workdir), current)
  assert "data.files" not in json.loads((workdir / "run.json").read_text())  # Not rewritten.
  with open(paths[0], "a") as f:
    f.write("d,p4,0\n")
  with pytest.raises(InputError, match="data.csv_sha256"):
    identity.check_or_record(str(workdir), _identity(paths, workdir))


def test_another_config_is_refused_before_the_data_is_read(tmp_path):
  paths = _data(tmp_path)
  workdir = tmp_path / "run"
  workdir.mkdir()
  identity.check_config(str(workdir), image_config.get_config())  # No record yet: nothing to compare.
  identity.check_or_record(str(workdir), _identity(paths, workdir))
  for path in paths:
    os.remove(path)  # check_config never needs the data.
  identity.check_config(str(workdir), image_config.get_config())
  other = image_config.get_config()
  other.synthetic.num_patients = 7
  with pytest.raises(InputError, match=r"another config or data \(synthetic\.num_patients \d+ -> 7\)"):
    identity.check_config(str(workdir), other)


def test_only_a_workdir_with_checkpoint_steps_is_called_an_older_run(tmp_path, caplog):
  """The checkpoint manager makes an empty checkpoints/ before the record is written: a fresh run is not
  warned about as a run "made before runs were recorded"; one with saved steps is."""
  paths = _data(tmp_path)
  for name, steps in (("fresh", []), ("older", ["2"])):
    workdir = tmp_path / name
    (workdir / "checkpoints").mkdir(parents=True)
    for step in steps:
      (workdir / "checkpoints" / step).mkdir()
    caplog.clear()
    with caplog.at_level("WARNING"):
      identity.check_or_record(str(workdir), _identity(paths, workdir))
    assert ("made before runs were recorded" in caplog.text) == bool(steps), (name, caplog.text)
    assert (workdir / identity.RECORD).exists()
