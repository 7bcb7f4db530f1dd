"""The ONNX export and the ONNX engine: equal to the JAX path, the same preds.csv, the refusals, int8's AUC pair.

One tiny model is trained once through main.py on 75x75 synthetic lesions and exported once through the
command (fp32 and int8); ONNX Runtime runs the exported files in a fresh process, so nothing of the exporting
process (Keras, TensorFlow, JAX) takes part in what is compared.

Every export, Keras twin, ONNX Runtime session and int8 calibration runs in a fresh process
(tests/onnx_worker.py, the predict command): this process, which in `make test` runs every test module in
turn, never loads tf2onnx or ONNX Runtime or builds a Keras model, and the exporters' memory is returned when
their process exits. The exports of randomly initialised models (InceptionResNetV2, EfficientNet-B0, the tiny
model with 8 TTA views and a diagnosis softmax) are started first and run beside the tiny model's training
and exports.
"""
import base64
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import helpers
import serving_client
from melanoma_jax import export as export_cli
from melanoma_jax import image, models
from melanoma_jax import predict as predict_cli
from melanoma_jax.data import records
from melanoma_jax.inference import onnx_export
from melanoma_jax.utils.errors import InputError

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onnx_worker.py")


def _worker(*args, timeout=600):
  proc = helpers.python(WORKER, *map(str, args), timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def _fresh_ort(model, x, tmp_path):
  """ONNX Runtime's probabilities of `x` from `model`, in a process that loads ONNX Runtime and numpy only."""
  np.save(tmp_path / "x.npy", x)
  _worker("ort", model, tmp_path / "x.npy", tmp_path / "p.npy")
  return np.load(tmp_path / "p.npy").astype(np.float64)


@pytest.fixture(scope="module")
def random_started(tmp_path_factory):
  """onnx_worker.py random: randomly initialised models exported, started before anything else of this module:
  InceptionResNetV2 (75x75), EfficientNet-B0 (32x32, its smallest size) and the tiny model with 8 TTA views
  and a 9-class diagnosis softmax."""
  out = tmp_path_factory.mktemp("random")
  log = open(out / "stderr.txt", "w+", encoding="utf-8")  # pylint: disable=consider-using-with
  # The largest first: its conversion, the longest, runs beside the tiny model's training. The process keeps
  # what the converter held (about 12 GB for InceptionResNetV2), and the smaller models reuse it.
  proc = subprocess.Popen([sys.executable, WORKER, "random", str(out), "inception_resnet_v2:75",
                           f"efficientnet_b0:{models.min_image_size('efficientnet_b0')}", "tiny:32:8:9"],
                          cwd=helpers.REPO, env=helpers.ENV, stdout=subprocess.DEVNULL, stderr=log)
  yield proc, out, log
  if proc.poll() is None:  # A test failed before waiting for it.
    proc.kill()
    proc.wait()
  log.close()


@pytest.fixture(scope="module")
def workdir(random_started, tmp_path_factory):
  """A tiny model trained for 1 epoch on 12 patients' 75x75 synthetic lesions."""
  del random_started  # Started first, so that it runs beside this training.
  return helpers.train_tiny(tmp_path_factory.mktemp("onnx") / "run")


@pytest.fixture(scope="module")
def exports(workdir, tmp_path_factory):
  """onnx_worker.py exports: the command's export (fp32 and int8, --force: the demo's AUC pair is recorded
  either way) in exports/onnx, and the int8 bound no model meets, refused and forced (exports/bound.json)."""
  out = tmp_path_factory.mktemp("exports")
  proc = _worker("exports", workdir, out)
  assert f"exported {workdir} to {out / 'onnx'}" in proc.stdout, proc.stdout
  return out


@pytest.fixture(scope="module")
def exported(exports):
  return exports / "onnx"


@pytest.fixture(scope="module")
def trained(workdir):
  return image.load_best(str(workdir))


def _record(folder):
  with open(folder / onnx_export.MARKER, encoding="utf-8") as f:
    return json.load(f)


def test_tiny_export_in_a_fresh_process_equals_the_jax_path(exported, trained, tmp_path):
  record = _record(exported)
  assert sorted(os.listdir(exported)) == sorted([onnx_export.MARKER, "model.onnx", "model.int8.onnx"])
  assert set(record["files"]) == {"model.onnx", "model.int8.onnx"}
  contract = record["contract"]
  assert (contract["input"], contract["output"], contract["layout"]) == ("image", "probability", "NHWC")
  assert contract["shape"] == ["batch", 75, 75, 3] and contract["value_range"] == [-1.0, 1.0]
  assert contract["tta"] == trained.tta and record["check"]["max_abs_diff"] <= 1e-4
  x = np.concatenate([x for x, _ in onnx_export.run_batches(trained, "val")])
  x = np.concatenate([x, x[:1] * 0.5, -x[:1]])  # Any batch size, and inputs the run never saw.
  want = trained.score(x).probabilities
  assert want.std() > 1e-4  # The comparison means something: the probabilities differ between images.
  np.testing.assert_allclose(_fresh_ort(exported / "model.onnx", x, tmp_path), want, rtol=0, atol=1e-4)
  assert _fresh_ort(exported / "model.onnx", x[:1], tmp_path).shape == (1,)


def test_predict_with_onnx_writes_the_preds_csv_of_jax(workdir, exported, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  examples = [e for p in sorted(glob.glob(str(workdir / "data" / "test*.tfrec"))) for e in records.read_examples(p)]
  for e in examples[:5]:
    (folder / f"{e['image_name']}.jpg").write_bytes(e["image"])
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg after all")
  (folder / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 32)
  assert predict_cli.command(str(workdir), str(folder), str(tmp_path / "jax.csv")) == 0
  for model, out in (("fp32", "onnx.csv"), ("int8", "int8.csv")):
    proc = helpers.python("-m", "melanoma_jax.predict", "--engine=onnx", f"--exported={exported}",
                          f"--onnx_model={model}", f"--images={folder}", f"--out={tmp_path / out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
  jax_rows = pd.read_csv(tmp_path / "jax.csv", keep_default_na=False)
  onnx_rows = pd.read_csv(tmp_path / "onnx.csv", keep_default_na=False)
  assert list(onnx_rows.columns) == ["image", "probability", "error"] and len(onnx_rows) == 7
  pd.testing.assert_frame_equal(onnx_rows[["image", "error"]], jax_rows[["image", "error"]])
  assert (onnx_rows["error"] != "").sum() == 2 and "broken.jpg" in set(onnx_rows.loc[onnx_rows["error"] != "", "image"])
  ok = onnx_rows["error"] == ""
  assert (onnx_rows.loc[~ok, "probability"] == "").all()
  np.testing.assert_allclose(onnx_rows.loc[ok, "probability"].astype(float),
                             jax_rows.loc[ok, "probability"].astype(float), rtol=0, atol=1e-4)
  int8_rows = pd.read_csv(tmp_path / "int8.csv", keep_default_na=False)
  pd.testing.assert_frame_equal(int8_rows[["image", "error"]], jax_rows[["image", "error"]])


def test_the_server_on_onnx_runtime_answers_as_the_jax_path(random_started, workdir, exported, trained, tmp_path):
  """`serve --engine=onnx --exported=DIR`: predictions of the JAX path (1e-4), the export's version and operating
  point, patient ranks without ugly-duckling scores, saliency refused; a workdir beside it refused in one line."""
  from melanoma_jax.inference import images as images_lib  # pylint: disable=g-import-not-at-top
  # The server (JAX, TensorFlow and ONNX Runtime in one process) starts once the random models' conversion has
  # ended, not beside its memory peak (a fresh clone's suite lost that worker to the OOM killer at 19.7 GB).
  random_started[0].wait(timeout=600)
  examples = [e for p in sorted(glob.glob(str(workdir / "data" / "test*.tfrec"))) for e in records.read_examples(p)]
  jpegs = [e["image"] for e in examples[:5]]
  b64 = [base64.b64encode(j).decode("ascii") for j in jpegs]
  served = serving_client.start(tmp_path / "server.log", "--engine=onnx", f"--exported={exported}")
  try:
    predicted = served.json("POST", "/v1/models/melanoma:predict", {"instances": [{"b64": b} for b in b64]})
    metadata = served.json("GET", "/v2/models/melanoma")
    patient = served.json("POST", "/v1/models/melanoma/patient",
                          {"images": [{"b64": b, "name": f"i{i}"} for i, b in enumerate(b64)]})
    refused = served.json("POST", "/v1/models/melanoma/patient", {"images": [{"b64": b64[0]}], "saliency": True})
  finally:
    serving_client.stop(served)
  assert served.proc.returncode == 0, served.log.read_text()[-2000:]
  reader = images_lib.Reader(trained.image_size)
  want = trained.score(np.stack([reader.read_data(j)[0] for j in jpegs])).probabilities
  assert predicted[0] == 200 and want.std() > 1e-4
  np.testing.assert_allclose(predicted[1]["predictions"], want, rtol=0, atol=1e-4)
  assert metadata[0] == 200 and metadata[1]["platform"] == "onnxruntime"
  assert metadata[1]["versions"] == [str(trained.checkpoint_step)]
  assert metadata[1]["parameters"]["saliency"] is False
  assert metadata[1]["parameters"]["operating_point"]["threshold"] > 0  # The run's, carried by the export.
  rows = patient[1]["images"]
  np.testing.assert_allclose([r["probability"] for r in rows], predicted[1]["predictions"], rtol=0, atol=1e-9)
  assert [r["rank"] for r in rows] == list(pd.Series(want).rank(ascending=False, method="min").astype(int))
  assert all(r["ugly_duckling"] is None for r in rows)
  assert refused[0] == 400 and refused[1]["error"].startswith("saliency: ONNX Runtime gives no gradients"), refused
  proc = helpers.python("-m", "melanoma_jax.serve", "--engine=onnx", f"--exported={exported}",
                        f"--workdir={workdir}", f"--port={serving_client.free_port()}", timeout=120)
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      "error: --engine=onnx serves --exported=DIR (its own TTA), not --workdir"), proc.stderr[-2000:]


def _one_line(error, *fragments):
  message = str(error.value) if not isinstance(error, str) else error
  assert "\n" not in message, message
  for fragment in fragments:
    assert fragment in message, message


def test_refusals_are_one_line_and_write_nothing(workdir, exported, tmp_path):
  ensemble = tmp_path / "ens"
  ensemble.mkdir()
  (ensemble / "run.json").write_text(json.dumps({"task": "ensemble"}))
  with pytest.raises(InputError) as e:
    export_cli.run(str(ensemble), str(tmp_path / "o1"), fmt="onnx")
  _one_line(e, "an ensemble workdir; an ONNX export: one model only")
  with pytest.raises(InputError) as e:
    export_cli.run(str(workdir), str(workdir / "onnx"), fmt="onnx")
  _one_line(e, "--out=", "is inside the workdir")
  stranger = tmp_path / "stranger"
  stranger.mkdir()
  (stranger / "model.onnx").write_bytes(b"mine")
  with pytest.raises(InputError) as e:
    export_cli.run(str(workdir), str(stranger), fmt="onnx")
  _one_line(e, "did not create")
  with pytest.raises(InputError) as e:
    export_cli.run(str(workdir), str(tmp_path / "o2"), quantize="int8")
  _one_line(e, "--format=onnx")
  assert not (tmp_path / "o1").exists() and not (workdir / "onnx").exists() and not (tmp_path / "o2").exists()
  images = tmp_path / "images"
  images.mkdir()
  (images / "a.jpg").write_bytes(b"\xff\xd8\xff")
  for engine, kwargs, fragment in (("onnx", {"exported": str(stranger)}, "not an ONNX export"),
                                   ("onnx", {}, "needs --exported"),
                                   ("onnx", {"exported": str(exported), "saliency_dir": "maps"}, "--saliency"),
                                   ("onnx", {"exported": str(exported), "dtype": "bfloat16"}, "--dtype"),
                                   ("jax", {"exported": str(exported)}, "--exported is for --engine=onnx")):
    with pytest.raises(InputError) as e:
      predict_cli.run(str(workdir) if engine == "jax" else "", str(images), str(tmp_path / "p.csv"), engine=engine,
                      **kwargs)
    _one_line(e, fragment)
  with pytest.raises(InputError) as e:
    predict_cli.run("", str(images), str(exported / "p.csv"), engine="onnx", exported=str(exported))
  _one_line(e, "--out=", "inside")
  assert not (tmp_path / "p.csv").exists()


def test_an_edited_model_is_refused(exported, tmp_path):
  copy = tmp_path / "copy"
  copy.mkdir()
  for name in os.listdir(exported):
    (copy / name).write_bytes((exported / name).read_bytes())
  with open(copy / "model.onnx", "ab") as f:
    f.write(b"\0")
  images = tmp_path / "images"
  images.mkdir()
  (images / "a.jpg").write_bytes(b"\xff\xd8\xff")
  with pytest.raises(InputError) as e:  # Refused on the file's bytes, before any ONNX Runtime session.
    predict_cli.run("", str(images), str(tmp_path / "p.csv"), engine="onnx", exported=str(copy))
  _one_line(e, "model.onnx is not the file the export wrote")


def test_int8_records_its_auc_pair_and_is_refused_past_the_bound(exports):
  int8 = _record(exports / "onnx")["int8"]
  assert int8["model"] == "model.int8.onnx" and int8["validation_images"] > 0 and int8["calibration_images"] > 0
  assert 0 <= int8["val_auc_fp32"] <= 1 and 0 <= int8["val_auc_int8"] <= 1
  assert int8["auc_drop"] == pytest.approx(int8["val_auc_fp32"] - int8["val_auc_int8"])
  assert int8["forced"] == (int8["auc_drop"] > 0.005)
  with open(exports / "bound.json", encoding="utf-8") as f:
    bound = json.load(f)  # A bound no model meets: the refusal path, with the real AUCs measured.
  _one_line(bound["refusal"] or "", "--quantize=int8: validation AUC drops from", "nothing written", "--force")
  assert bound["written_after_refusal"] == ["onnx"]  # Neither the refused folder nor its temporary one.
  forced = bound["forced"]
  assert forced["forced"] and forced["max_auc_drop"] == -1.0
  assert forced["val_auc_fp32"] == pytest.approx(int8["val_auc_fp32"], abs=1e-9)


def _random_export_equals_the_jax_path(random_started, tag, tmp_path, spread=0.1):
  proc, out, log = random_started
  code = proc.wait(timeout=600)
  log.seek(0)
  assert code == 0, log.read()[-3000:]
  assert not (out / f"{tag}.error.txt").exists(), (out / f"{tag}.error.txt").read_text()[-3000:]
  want = np.load(out / f"{tag}.want.npy")
  assert want.std() > spread, want  # The probabilities differ between the images: the comparison means something.
  np.testing.assert_allclose(_fresh_ort(out / f"{tag}.onnx", np.load(out / f"{tag}.x.npy"), tmp_path), want,
                             rtol=0, atol=1e-4)


def test_inception_resnet_v2_at_75_px_in_a_fresh_process_equals_the_jax_path(random_started, tmp_path):
  _random_export_equals_the_jax_path(random_started, "inception_resnet_v2_75", tmp_path)


def test_efficientnet_b0_at_its_smallest_size_in_a_fresh_process_equals_the_jax_path(random_started, tmp_path):
  _random_export_equals_the_jax_path(random_started, "efficientnet_b0_32", tmp_path)


def test_eight_tta_views_and_a_diagnosis_softmax_in_a_fresh_process_equal_the_jax_path(random_started, tmp_path):
  # p(MEL) of a 9-class softmax, the mean over the flips and transposes: the twin's views and output layer.
  _random_export_equals_the_jax_path(random_started, "tiny_32_8_9", tmp_path, spread=1e-3)


def test_this_process_never_loaded_an_exporter_or_onnx_runtime():
  assert not {"tf2onnx", "onnxruntime"} & set(sys.modules)
