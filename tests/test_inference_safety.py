"""What the inference commands refuse, as a user or an attacker would try them: outputs over inputs or a run's
files, folders holding others' files, paths that cannot be written; odd file names and formats in preds.csv;
per-file failures that must stay per file; image bombs.

One tiny model is trained once through main.py on 75x75 synthetic lesions (module fixture); every refusal is
asserted to come before the model loads (`loading.load_predictor` is replaced by a failure).
"""
import glob
import os
import re

import pandas as pd
import pytest

import helpers
from melanoma_jax import export
from melanoma_jax import predict as predict_cli
from melanoma_jax.data import records
from melanoma_jax.inference import loading, tf_export

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model trained for 1 epoch on 12 patients' 75x75 synthetic lesions (about 15 s)."""
  return helpers.train_tiny(tmp_path_factory.mktemp("safety") / "run")


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
                   (tmp_path / "a_file" / "deeper" / "p.csv", "is a file"), (tmp_path, "is a folder"),
                   (tmp_path / ("y" * 300 + ".csv"), "file name too long")]:
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


NAMES = ["a,b.jpg", 'quote"d.jpg', "new\nline.jpg", "carriage\rreturn.jpg", "ünïcödé 病变.jpg", "plain.jpg",
         '=HYPERLINK("x.example","y").jpg', "+1.jpg", "-2.jpg", "@SUM(A1).jpg", "\ttab.jpg", "'quoted.jpg",
         "' spaced ', \"all\"\r\n.jpg"]


def test_every_file_name_reads_back_and_none_is_a_formula(workdir, jpegs, tmp_path, capsys):
  import csv  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import preds_csv  # pylint: disable=g-import-not-at-top
  images, out = tmp_path / "odd", tmp_path / "p.csv"
  images.mkdir()
  data = next(iter(jpegs.values()))
  for name in NAMES:
    (images / name).write_bytes(data)
  not_utf8 = os.fsdecode(b"latin\xe9.jpg")  # Linux allows any bytes but "/" and NUL in a name.
  (images / not_utf8).write_bytes(data)
  assert predict_cli.command(str(workdir), str(images), str(out)) == 0, capsys.readouterr().err
  frame = pd.read_csv(out, keep_default_na=False)
  with open(out, newline="", encoding="utf-8") as f:
    parsed = list(csv.reader(f))
  assert len(frame) == len(parsed) - 1 == len(NAMES) + 1
  for values in (list(frame["image"]), [row[0] for row in parsed[1:]]):
    assert sorted(preds_csv.file_name(v) for v in values if v != "latin\\udce9.jpg") == sorted(NAMES)
    assert not [v for v in values if v.startswith(preds_csv.FORMULA_STARTS)]  # Nothing a spreadsheet runs.
  assert (frame["error"] == "").all() and len(set(frame["probability"])) == 1  # Every copy scored alike.
  assert set(frame["image"]) >= {"'=HYPERLINK(\"x.example\",\"y\").jpg", "'-2.jpg", "''quoted.jpg", "a,b.jpg"}


def _gif_webp_bmp(data):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  image = Image.open(io.BytesIO(data))
  encoded = {}
  for fmt in ("GIF", "WEBP", "BMP"):
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    encoded[fmt] = buffer.getvalue()
  return encoded


def test_other_formats_and_links_out_get_their_own_error_row(workdir, jpegs, tmp_path, capsys):
  images, out = tmp_path / "mixed", tmp_path / "p.csv"
  images.mkdir()
  good = next(iter(jpegs.values()))
  (images / "good.jpg").write_bytes(good)
  encoded = _gif_webp_bmp(good)
  (images / "anim.gif").write_bytes(encoded["GIF"])
  (images / "webp_named.jpg").write_bytes(encoded["WEBP"])
  (images / "bitmap.bmp").write_bytes(encoded["BMP"])
  (images / "notes.txt").write_text("not an image")
  (tmp_path / "outside.jpg").write_bytes(good)
  (images / "escape.jpg").symlink_to(tmp_path / "outside.jpg")
  (images / "inside_link.jpg").symlink_to(images / "good.jpg")
  os.mkfifo(images / "pipe.jpg")  # Opening it for reading would wait for a writer forever.
  (images / "sub").mkdir()
  (images / ".DS_Store").write_bytes(b"\0")
  (images / "labels.csv").write_text("image_name\n")
  assert predict_cli.command(str(workdir), str(images), str(out)) == 0
  err = capsys.readouterr().err
  rows = pd.read_csv(out, keep_default_na=False).set_index("image")
  assert sorted(rows.index) == ["anim.gif", "bitmap.bmp", "escape.jpg", "good.jpg", "inside_link.jpg", "notes.txt",
                                "pipe.jpg", "webp_named.jpg"]
  want = {"anim.gif": "a GIF image; only JPEG and PNG are read",
          "webp_named.jpg": "a WebP image; only JPEG and PNG are read",
          "bitmap.bmp": "a BMP image; only JPEG and PNG are read",
          "notes.txt": "not a decodable JPEG or PNG (unknown format)",
          "escape.jpg": "a link out of the images folder; not followed", "pipe.jpg": "not a regular file"}
  for name, error in want.items():
    assert rows.loc[name, "error"] == error and rows.loc[name, "probability"] == "", name
    assert f"{name}: {error}" in err
  assert rows.loc["good.jpg", "probability"] == rows.loc["inside_link.jpg", "probability"] != ""
  assert "Traceback" not in err


def test_a_saliency_map_that_cannot_be_written_fails_only_its_row(workdir, jpegs, tmp_path, capsys):
  images, out, maps = tmp_path / "names", tmp_path / "p.csv", tmp_path / "maps"
  images.mkdir()
  long_name = "x" * 249 + ".jpg"  # 253 bytes: a valid image name, but its map's name would be 257.
  for name in ("good.jpg", long_name, "$x^{2$.jpg"):  # The last: text, never matplotlib's math mode.
    (images / name).write_bytes(next(iter(jpegs.values())))
  assert predict_cli.command(str(workdir), str(images), str(out), str(maps)) == 0
  err = capsys.readouterr().err
  rows = pd.read_csv(out, keep_default_na=False).set_index("image")
  assert rows.loc[long_name, "error"] == "saliency map not written (File name too long)", err
  assert rows.loc[long_name, "probability"] == rows.loc["good.jpg", "probability"] != ""
  assert rows.loc["good.jpg", "error"] == rows.loc["$x^{2$.jpg", "error"] == ""
  assert sorted(os.listdir(maps)) == sorted([predict_cli.SALIENCY_MARKER, "good.jpg.png", "$x^{2$.jpg.png"])
  assert "Traceback" not in err and f"{long_name}: saliency map not written" in err


def _png_bomb(path, side):
  """A `side` x `side` 1-bit grey PNG of zeros, written row by row (never held decoded): a few tens of KB on
  disk, `side`^2 x 3 bytes once decoded to RGB."""
  import struct  # pylint: disable=g-import-not-at-top
  import zlib  # pylint: disable=g-import-not-at-top

  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  row, packer = b"\0" * (1 + (side + 7) // 8), zlib.compressobj(9)  # Filter byte, then 8 pixels a byte.
  body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
  header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# The predict command of the tiny model peaks near 900 MB with or without the bomb; decoding a 10000x10000 bomb
# (a quarter of this one) peaked at 2400 MB before images were checked by their header.
# The bomb decoded would take 1.2 GB more (RGB) than the same folder without it; refused by its header it takes
# none. Compared with that folder in the same test, not with a fixed figure: the process's own peak (JAX, TF,
# compilation without a warm cache) differs from machine to machine.
BOMB_EXTRA_BOUND_MB = 400


def _peak_predict(workdir, images, out):
  script = ("import resource, sys\nfrom melanoma_jax import predict\n"
            "code = predict.command(sys.argv[1], sys.argv[2], sys.argv[3])\n"
            "print('peak_rss_mb', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\nsys.exit(code)\n")
  proc = helpers.python("-c", script, str(workdir), str(images), str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return int(proc.stdout.split("peak_rss_mb")[-1])


def test_an_image_bomb_gets_its_error_row_and_no_memory(workdir, jpegs, tmp_path):
  plain, images, out = tmp_path / "plain", tmp_path / "bombs", tmp_path / "p.csv"
  for folder in (plain, images):
    folder.mkdir()
    for name, data in jpegs.items():
      (folder / f"{name}.jpg").write_bytes(data)
  _png_bomb(images / "bomb.png", 20000)  # 1.2 GB as RGB, 4.8 GB as the float image the resize reads.
  assert (images / "bomb.png").stat().st_size < 100_000
  baseline = _peak_predict(workdir, plain, tmp_path / "plain.csv")
  peak = _peak_predict(workdir, images, out)
  rows = pd.read_csv(out, keep_default_na=False).set_index("image")
  assert rows.loc["bomb.png", "error"] == ("20000x20000 = 400000000 pixels is over --max_pixels=40000000; "
                                          "raise it to read this image")
  assert (rows.drop("bomb.png")["probability"] != "").all() and len(rows) == len(jpegs) + 1
  assert peak < baseline + BOMB_EXTRA_BOUND_MB, (peak, baseline)


def test_the_limits_are_flags(workdir, jpegs, tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  images, out = tmp_path / "limited", tmp_path / "p.csv"
  images.mkdir()
  jpeg = next(iter(jpegs.values()))
  (images / "photo.jpg").write_bytes(jpeg)
  buffer = io.BytesIO()
  Image.new("RGB", (20, 20)).save(buffer, "PNG")
  (images / "small.png").write_bytes(buffer.getvalue())
  assert len(buffer.getvalue()) < 1000 < len(jpeg)
  proc = helpers.python("-m", "melanoma_jax.predict", f"--workdir={workdir}", f"--images={images}", f"--out={out}",
                 "--max_file_mb=0.001", "--max_pixels=100")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  rows = pd.read_csv(out, keep_default_na=False).set_index("image")
  assert rows.loc["photo.jpg", "error"] == (f"{len(jpeg)} bytes is over --max_file_mb=0.001 (1048 bytes); "
                                           "raise it to read this file")
  assert rows.loc["small.png", "error"] == "20x20 = 400 pixels is over --max_pixels=100; raise it to read this image"


def test_saved_model_scores_a_batch_around_its_broken_images(workdir, jpegs, tmp_path, capsys):
  """One fresh TensorFlow process (no melanoma_jax) serves a batch of good and bad images: each bad one gets
  probability NaN and its own error, the good ones the predict command's probabilities."""
  import json  # pylint: disable=g-import-not-at-top
  good = list(jpegs.values())[:2]
  encoded = _gif_webp_bmp(good[0])
  bomb = tmp_path / "bomb.png"
  _png_bomb(bomb, 20000)
  batch = {"good0": good[0], "empty": b"", "no_header": good[1][:300], "cut": good[1][:len(good[1]) // 2],
           "text": b"not an image",
           "bmp": encoded["BMP"], "webp": encoded["WEBP"], "bomb": bomb.read_bytes(), "good1": good[1]}
  images = tmp_path / "batch"
  images.mkdir()
  for name, data in batch.items():
    (images / name).write_bytes(data)
  out = tmp_path / "exported"
  export.run(str(workdir), str(out), platforms=("cpu",))
  assert predict_cli.command(str(workdir), str(images), str(tmp_path / "p.csv")) == 0
  capsys.readouterr()
  rows = pd.read_csv(tmp_path / "p.csv", keep_default_na=False).set_index("image")
  script = ("import json, sys, tensorflow as tf\n"
            "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
            "names = json.loads(sys.argv[3])\n"
            "got = serve(image_bytes=tf.constant([open(sys.argv[2] + '/' + n, 'rb').read() for n in names]))\n"
            "print(json.dumps({'probability': [None if p != p else float(p) for p in got['probability'].numpy()],\n"
            "  'error': [e.decode() for e in got['error'].numpy()], 'ours': 'melanoma_jax' in sys.modules}))\n")
  proc = helpers.python("-c", script, str(out), str(images), json.dumps(list(batch)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert not got["ours"]
  served = dict(zip(batch, zip(got["probability"], got["error"])))
  for name in ("good0", "good1"):
    assert served[name][1] == "" and abs(served[name][0] - float(rows.loc[name, "probability"])) < 1e-5
  assert served["cut"] == (None, "not a decodable JPEG or PNG")  # Its header passed; decoding failed.
  assert rows.loc["cut", "error"].startswith("not a decodable JPEG or PNG (")  # With TF's words.
  for name in ("empty", "no_header", "text", "bmp", "webp", "bomb"):  # The predict command's own reasons ...
    # ... less what libjpeg printed, which predict catches per file and a SavedModel call cannot.
    assert served[name] == (None, rows.loc[name, "error"].split("; the decoder said: ")[0]), name
  assert served["bomb"][1].startswith("20000x20000 = 400000000 pixels is over --max_pixels")


# ---------------------------------------------------------------------------------------------------------
# One lock protocol: predict and export read a workdir under its shared lock, never while a run trains there.

def test_predict_and_export_refuse_a_workdir_while_it_trains(workdir, folder, tmp_path, capsys):
  from melanoma_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  out = tmp_path / "p.csv"
  with workdir_lib.lock(str(workdir)):  # What main.py holds for a whole training run.
    code = predict_cli.command(str(workdir), str(folder), str(out))
    _refused(capsys, code, f"{workdir} is being trained by process {os.getpid()}",
             "predict or export when that run has ended")
    with pytest.raises(InputError, match="is being trained by process"):
      export.run(str(workdir), str(tmp_path / "exported"))
  assert not out.exists() and not (tmp_path / "exported").exists()
  # Readers share the lock with each other, and a run cannot start while one reads.
  with workdir_lib.read_lock(str(workdir)), workdir_lib.read_lock(str(workdir)):
    with pytest.raises(InputError, match=r"is in use by .*\(or by a predict or export reading it\)"):
      with workdir_lib.lock(str(workdir)):
        pass
  assert predict_cli.command(str(workdir), str(folder), str(out)) == 0  # Released: predicted.
  err = capsys.readouterr().err
  assert "warning" not in err and "best checkpoint of epoch 1" in err  # Which checkpoint, on the terminal.


def test_an_unfinished_run_is_predicted_with_a_warning_or_refused(workdir, folder, tmp_path, capsys):
  import shutil  # pylint: disable=g-import-not-at-top
  unfinished = tmp_path / "unfinished"
  shutil.copytree(workdir, unfinished)
  (unfinished / "results.json").unlink()  # As a run killed before it ends leaves it.
  out = tmp_path / "p.csv"
  assert predict_cli.command(str(unfinished), str(folder), str(out)) == 0
  err = capsys.readouterr().err
  assert (f"warning: {unfinished}: training has not finished (no results.json; latest checkpoint: epoch 1); "
          "using the best checkpoint so far") in err
  code = predict_cli.command(str(unfinished), str(folder), str(tmp_path / "q.csv"), require_finished=True)
  _refused(capsys, code, "training has not finished", "--require_finished refuses it")
  assert not (tmp_path / "q.csv").exists()


@pytest.mark.parametrize("field, value, shown", [
    ("model.name", "inception_resnet_v2", "model.name 'tiny' in the checkpoint, 'inception_resnet_v2' here"),
    ("image_size", 99, "image_size 75 in the checkpoint, 99 here"),
])
def test_an_edited_run_json_is_refused_in_one_line(workdir, folder, tmp_path, capsys, field, value, shown):
  """run.json fields the loader uses are checked against the checkpoint's own record of the run: another
  model would restore into the wrong tree, another image_size would predict at another size without a word."""
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  edited = tmp_path / "edited"
  shutil.copytree(workdir, edited, ignore=shutil.ignore_patterns("data"))
  record = json.loads((edited / "run.json").read_text())
  record[field] = value
  (edited / "run.json").write_text(json.dumps(record))
  out = tmp_path / "p.csv"
  code = predict_cli.command(str(edited), str(folder), str(out))
  _refused(capsys, code, f"{edited / 'run.json'}: does not describe the run of {edited / 'checkpoints'}", shown,
           "restore the recorded values")
  assert not out.exists()
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  with pytest.raises(InputError, match=re.escape(shown)):
    export.run(str(edited), str(tmp_path / "exported"))
  assert not (tmp_path / "exported").exists()


def test_a_run_of_its_own_synthetic_set_refuses_an_edited_file_and_never_regenerates_it(workdir, tmp_path):
  """A run that generated WORKDIR/data: a user's same-size edit there (a flipped label) is refused, naming
  train.csv, and the edit stays."""
  import shutil  # pylint: disable=g-import-not-at-top
  copy = tmp_path / "run"
  shutil.copytree(workdir, copy)
  train_csv = copy / "data" / "train.csv"
  edited = train_csv.read_text().replace(",0\n", ",1\n", 1)
  train_csv.write_text(edited)
  proc = helpers.python("main.py", "--config=configs/demo.py", f"--workdir={copy}", "--config.model.name=tiny",
                 "--config.image_size=75", "--config.per_device_batch_size=2", "--config.num_epochs=1",
                 "--config.synthetic.num_patients=12", "--config.log_every_steps=100", "--jax_cache_dir=",
                 "--mode=predict")
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {train_csv}: changed after the synthetic data generator wrote it (same size, "
                         "other bytes)"), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and train_csv.read_text() == edited
