"""What the inference commands refuse, as a user or an attacker would try them: outputs over inputs or a run's
files, folders holding others' files, paths that cannot be written; odd file names and formats in preds.csv;
per-file failures that must stay per file; image bombs.

One tiny model is trained once through main.py on 75x75 synthetic lesions (module fixture); every refusal is
asserted to come before the model loads (`loading.load_predictor` is replaced by a failure).
"""
import glob
import os
import subprocess
import sys

import pandas as pd
import pytest

from melanoma_jax import export
from melanoma_jax import predict as predict_cli
from melanoma_jax.data import records
from melanoma_jax.inference import loading, tf_export

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
           TF_CPP_MIN_LOG_LEVEL="2")


def _python(*args, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model trained for 1 epoch on 12 patients' 75x75 synthetic lesions (about 15 s)."""
  workdir = tmp_path_factory.mktemp("safety") / "run"
  proc = _python("main.py", "--config=configs/demo.py", f"--workdir={workdir}", "--config.model.name=tiny",
                 "--config.image_size=75", "--config.per_device_batch_size=2", "--config.num_epochs=1",
                 "--config.synthetic.num_patients=12", "--config.log_every_steps=100", "--jax_cache_dir=")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def jpegs(workdir):
  """Four test-record JPEGs' bytes by image name."""
  examples = [e for p in sorted(glob.glob(str(workdir / "data" / "test*.tfrec"))) for e in records.read_examples(p)]
  return {e["image_name"]: e["image"] for e in examples[:4]}


@pytest.fixture()
def folder(tmp_path, jpegs):
  """A fresh folder of the four JPEGs."""
  images = tmp_path / "images"
  images.mkdir()
  for name, data in jpegs.items():
    (images / f"{name}.jpg").write_bytes(data)
  return images


@pytest.fixture()
def no_load(monkeypatch):
  """Fails the test if a model is loaded: refusals must come before any work."""
  def fail(*args, **kwargs):
    raise AssertionError("the model was loaded before the refusal")
  monkeypatch.setattr(loading, "load_predictor", fail)


def _refused(capsys, code, *fragments):
  """The command's exit code is 1 and stderr is one `error:` line holding every fragment."""
  err = capsys.readouterr().err
  assert code == 1, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  for fragment in fragments:
    assert fragment in lines[0], lines[0]
  return lines[0]


def _snapshot(*folders):
  return {p: open(p, "rb").read() for f in folders for p in glob.glob(os.path.join(str(f), "**"), recursive=True)
          if os.path.isfile(p)}


def test_predict_out_never_overwrites_an_input_or_the_run(workdir, folder, tmp_path, capsys, no_load):
  image = sorted(folder.iterdir())[0]
  (tmp_path / "link.csv").symlink_to(workdir / "run.json")
  before = _snapshot(workdir, folder)
  for out, why in [(image, "is an input file"), (workdir / "run.json", "inside the workdir"),
                   (workdir / "submission.csv", "inside the workdir"), (workdir / "oof.csv", "inside the workdir"),
                   (workdir / "new.csv", "inside the workdir"), (tmp_path / "link.csv", "inside the workdir"),
                   (f"{folder}/../images/{image.name}", "is an input file"),
                   (f"{workdir}/checkpoints/../run.json", "inside the workdir")]:
    code = predict_cli.command(str(workdir), str(folder), str(out))
    _refused(capsys, code, f"--out={out}", why)
  assert _snapshot(workdir, folder) == before and os.path.islink(tmp_path / "link.csv")


def test_predict_out_that_cannot_be_written_is_refused_before_work(workdir, folder, tmp_path, capsys, no_load):
  (tmp_path / "a_file").write_text("x")
  for out, why in [("/proc/x.csv", "cannot write in /proc"), (tmp_path / "a_file" / "p.csv", "is a file"),
                   (tmp_path / "a_file" / "deeper" / "p.csv", "is a file"), (tmp_path, "is a folder")]:
    _refused(capsys, predict_cli.command(str(workdir), str(folder), str(out)), f"--out={out}", why)


def test_saliency_never_goes_into_the_run_or_over_others_files(workdir, folder, tmp_path, capsys, no_load):
  out = str(tmp_path / "p.csv")
  (tmp_path / "maps_link").symlink_to(workdir)
  for maps, why in [(workdir / "maps", "inside the workdir"), (tmp_path / "maps_link", "inside the workdir"),
                    (folder, "is the --images folder"), ("/proc/maps", "cannot write in /proc")]:
    _refused(capsys, predict_cli.command(str(workdir), str(folder), out, str(maps)), f"--saliency={maps}", why)
  # A folder made by an earlier predict, where the user put a file under a name a map would take.
  maps = tmp_path / "maps"
  maps.mkdir()
  (maps / predict_cli.SALIENCY_MARKER).write_text('{"files": {}}')
  user_file = maps / predict_cli.saliency_path("", sorted(os.listdir(folder))[0])
  user_file.write_text("mine")
  _refused(capsys, predict_cli.command(str(workdir), str(folder), out, str(maps)),
           "file(s) this project did not write would be replaced")
  assert user_file.read_text() == "mine"
  user_file.unlink()
  _refused(capsys, predict_cli.command(str(workdir), str(folder), str(maps / "p.csv"), str(maps)),
           "inside the --saliency folder")


def test_export_out_refusals_are_one_line_before_work(workdir, tmp_path, capsys, no_load):
  (tmp_path / "a_file").write_text("x")
  for out, why in [(workdir / "exported", "inside the workdir"), (workdir, "inside the workdir"),
                   (tmp_path / "a_file" / "exported", "is a file"), ("/proc/exported", "cannot write in /proc")]:
    with pytest.raises(Exception, match=why) as info:
      export.run(str(workdir), str(out))
    assert type(info.value).__name__ == "InputError" and "\n" not in str(info.value)


def test_reexport_replaces_only_its_own_files(workdir, tmp_path):
  out = tmp_path / "exported"
  export.run(str(workdir), str(out), platforms=("cpu",))
  listed = set(tf_export_files(out))
  assert {"saved_model.pb", "variables/variables.index"} <= listed and set(tf_export.PLANNED) <= listed
  (out / "thesis.tex").write_text("my thesis")
  (out / "variables" / "notes.txt").write_text("my notes")
  first = (out / tf_export.MARKER).read_text()
  export.run(str(workdir), str(out), platforms=("cpu",))
  assert (out / "thesis.tex").read_text() == "my thesis" and (out / "variables" / "notes.txt").exists()
  assert (out / tf_export.MARKER).read_text() != first and (out / "saved_model.pb").exists()
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # No temporary folder left behind.
  # A copied marker does not make a user's folder ours: its files are never replaced.
  theirs = tmp_path / "theirs"
  theirs.mkdir()
  (theirs / tf_export.MARKER).write_text((out / tf_export.MARKER).read_text())
  (theirs / "saved_model.pb").write_text("not ours")
  (theirs / "thesis.tex").write_text("my thesis")
  with pytest.raises(Exception, match="file\\(s\\) this project did not write would be replaced"):
    export.run(str(workdir), str(theirs), platforms=("cpu",))
  assert (theirs / "saved_model.pb").read_text() == "not ours"


def tf_export_files(out):
  import json  # pylint: disable=g-import-not-at-top
  return json.loads((out / tf_export.MARKER).read_text())["files"]


def test_predict_again_into_its_saliency_folder_keeps_a_users_file(workdir, folder, tmp_path, capsys):
  maps, out = tmp_path / "maps", tmp_path / "p.csv"
  assert predict_cli.command(str(workdir), str(folder), str(out), str(maps)) == 0
  (maps / "thesis.tex").write_text("my thesis")
  assert predict_cli.command(str(workdir), str(folder), str(out), str(maps)) == 0, capsys.readouterr().err
  assert (maps / "thesis.tex").read_text() == "my thesis"
  assert len(list(maps.glob("*.jpg.png"))) == len(os.listdir(folder))
