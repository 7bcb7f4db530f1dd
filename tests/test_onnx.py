"""The ONNX export and the ONNX engine: equal to the JAX path, the same preds.csv, the refusals, int8's AUC pair.

One tiny model is trained once through main.py on 75x75 synthetic lesions and exported once through the
command (fp32 and int8); ONNX Runtime runs the exported files in a fresh process, so nothing of the exporting
process (Keras, TensorFlow, JAX) takes part in what is compared.
"""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pandas as pd
import pytest

from melanoma_jax import export as export_cli
from melanoma_jax import image, models
from melanoma_jax import predict as predict_cli
from melanoma_jax.data import records
from melanoma_jax.inference import onnx_export
from melanoma_jax.training import steps
from melanoma_jax.utils.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
           TF_CPP_MIN_LOG_LEVEL="2")
# A fresh process with ONNX Runtime and numpy only: model file and inputs in, probabilities out.
_ORT = ("import sys, numpy as np, onnxruntime as ort; s = ort.InferenceSession(sys.argv[1]); "
        "np.save(sys.argv[3], s.run(['probability'], {'image': np.load(sys.argv[2])})[0])")


def _python(*args, timeout=600):
  return subprocess.run([sys.executable, *args], cwd=REPO, env=ENV, capture_output=True, text=True,
                        timeout=timeout)


def _fresh_ort(model, x, tmp_path):
  np.save(tmp_path / "x.npy", x)
  proc = _python("-c", _ORT, str(model), str(tmp_path / "x.npy"), str(tmp_path / "p.npy"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "tensorflow" not in proc.stderr.lower()
  return np.load(tmp_path / "p.npy").astype(np.float64)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model trained for 1 epoch on 12 patients' 75x75 synthetic lesions."""
  workdir = tmp_path_factory.mktemp("onnx") / "run"
  proc = _python("main.py", "--config=configs/demo.py", f"--workdir={workdir}", "--config.model.name=tiny",
                 "--config.image_size=75", "--config.per_device_batch_size=2", "--config.num_epochs=1",
                 "--config.synthetic.num_patients=12", "--config.log_every_steps=100", "--jax_cache_dir=")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
  """The run exported by the command: fp32 and int8 (--force: the demo's AUC pair is recorded either way)."""
  out = tmp_path_factory.mktemp("exports") / "onnx"
  proc = _python("-m", "melanoma_jax.export", f"--workdir={workdir}", "--format=onnx", f"--out={out}",
                 "--quantize=int8", "--force")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"exported {workdir} to {out}" in proc.stdout
  return out


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


def test_inception_resnet_v2_at_75_px_in_a_fresh_process_equals_the_jax_path(tmp_path):
  model = models.build_model("inception_resnet_v2", kernels="xla")
  x = np.random.default_rng(0).uniform(-1, 1, (3, 75, 75, 3)).astype(np.float32)
  variables = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(0), x[:1], train=False))
  rng = np.random.default_rng(1)  # Random BatchNorm statistics: the network's stored statistics must be used.
  variables["batch_stats"] = {"backbone": jax.tree_util.tree_map_with_path(
      lambda path, a: (a * rng.uniform(0.8, 1.2, a.shape) if path[-1].key == "var" else
                       a + rng.normal(0, 0.01, a.shape)).astype(np.float32), variables["batch_stats"]["backbone"])}
  logits = np.asarray(steps.make_predict_step(model, logits=True)(image.ModelWeights(
      variables["params"], variables["batch_stats"]), {"x": x}), np.float64)
  # A random network's logits barely differ: the logit layer is rescaled to spread them over (0, 1). The expected
  # probabilities follow from the JAX logits (one compile of the network, not two).
  logit = variables["params"]["head"]["logit"]
  scale, bias = 2 / logits.std(), float(logit["bias"][0])
  logit["kernel"] = (logit["kernel"] * scale).astype(np.float32)
  logit["bias"] = np.full(1, -(logits.mean() - bias) * scale, np.float32)
  want = 1 / (1 + np.exp(-((logits - bias) * scale + float(logit["bias"][0]))))
  assert want.std() > 0.1, want
  path = onnx_export.write_onnx("inception_resnet_v2", variables, 75, False, str(tmp_path / "irv2.onnx"))
  np.testing.assert_allclose(_fresh_ort(path, x, tmp_path), want, rtol=0, atol=1e-4)


def test_predict_with_onnx_writes_the_preds_csv_of_jax(workdir, exported, tmp_path):
  folder = tmp_path / "images"
  folder.mkdir()
  examples = [e for p in sorted(glob.glob(str(workdir / "data" / "test*.tfrec"))) for e in records.read_examples(p)]
  for e in examples[:5]:
    (folder / f"{e['image_name']}.jpg").write_bytes(e["image"])
  (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg after all")
  (folder / "anim.gif").write_bytes(b"GIF89a" + b"\0" * 32)
  assert predict_cli.command(str(workdir), str(folder), str(tmp_path / "jax.csv")) == 0
  assert predict_cli.command("", str(folder), str(tmp_path / "onnx.csv"), engine="onnx", exported=str(exported)) == 0
  jax_rows = pd.read_csv(tmp_path / "jax.csv", keep_default_na=False)
  onnx_rows = pd.read_csv(tmp_path / "onnx.csv", keep_default_na=False)
  assert list(onnx_rows.columns) == ["image", "probability", "error"] and len(onnx_rows) == 7
  pd.testing.assert_frame_equal(onnx_rows[["image", "error"]], jax_rows[["image", "error"]])
  assert (onnx_rows["error"] != "").sum() == 2 and "broken.jpg" in set(onnx_rows.loc[onnx_rows["error"] != "", "image"])
  ok = onnx_rows["error"] == ""
  assert (onnx_rows.loc[~ok, "probability"] == "").all()
  np.testing.assert_allclose(onnx_rows.loc[ok, "probability"].astype(float),
                             jax_rows.loc[ok, "probability"].astype(float), rtol=0, atol=1e-4)
  assert predict_cli.command("", str(folder), str(tmp_path / "int8.csv"), engine="onnx", exported=str(exported),
                             onnx_model="int8") == 0
  assert len(pd.read_csv(tmp_path / "int8.csv")) == 7


def _one_line(error, *fragments):
  message = str(error.value)
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
  with pytest.raises(InputError) as e:
    predict_cli.run("", str(images), str(tmp_path / "p.csv"), engine="onnx", exported=str(copy))
  _one_line(e, "model.onnx is not the file the export wrote")


def test_int8_records_its_auc_pair_and_is_refused_past_the_bound(workdir, exported, tmp_path):
  int8 = _record(exported)["int8"]
  assert int8["model"] == "model.int8.onnx" and int8["validation_images"] > 0 and int8["calibration_images"] > 0
  assert 0 <= int8["val_auc_fp32"] <= 1 and 0 <= int8["val_auc_int8"] <= 1
  assert int8["auc_drop"] == pytest.approx(int8["val_auc_fp32"] - int8["val_auc_int8"])
  assert int8["forced"] == (int8["auc_drop"] > 0.005)
  out = tmp_path / "int8"
  with pytest.raises(InputError) as e:  # A bound no model meets: the refusal path, with the real AUCs measured.
    export_cli.run(str(workdir), str(out), fmt="onnx", quantize="int8", max_auc_drop=-1.0)
  _one_line(e, "--quantize=int8: validation AUC drops from", "nothing written", "--force")
  assert not out.exists() and not glob.glob(str(tmp_path / ".int8*"))
  export_cli.run(str(workdir), str(out), fmt="onnx", quantize="int8", max_auc_drop=-1.0, force=True)
  forced = _record(out)["int8"]
  assert forced["forced"] and forced["max_auc_drop"] == -1.0
  assert forced["val_auc_fp32"] == pytest.approx(int8["val_auc_fp32"], abs=1e-9)
