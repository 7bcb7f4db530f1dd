"""Inference for users: the predict command on image files, saliency, the TF SavedModel export.

One tiny model is trained through main.py on 96x96 synthetic lesions (module fixture); its own submission.csv
is the reference the predict command must reproduce from the test TFRecords' JPEG bytes written to files, and
the predict command's CSV is the reference the SavedModel must reproduce in a fresh TensorFlow process.
"""
import glob
import io
import json
import math
import os
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import helpers
from melanoma_jax import predict as predict_cli
from melanoma_jax.data import records
from melanoma_jax.data.synthetic import lesions, seeding
from melanoma_jax.inference import images, loading, saliency
from melanoma_jax.training import identity
from melanoma_jax.utils.errors import InputError

SIZE = 96  # The tiny model's last feature map is 24x24 here: room for Grad-CAM to show where it looks.
SEED = 0
UNREADABLE = {"broken.jpg", "empty.jpeg", "notes.txt"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model trained (backbone included) for 4 epochs on 40 patients' synthetic lesions."""
  workdir = tmp_path_factory.mktemp("inference") / "run"
  return helpers.train_tiny(workdir, "--config.freeze_backbone_epochs=0", f"--config.synthetic.seed={SEED}",
                            image_size=SIZE, batch=4, epochs=4, patients=40)


def _records(workdir, pattern):
  return [e for path in sorted(glob.glob(str(workdir / "data" / pattern))) for e in records.read_examples(path)]


@pytest.fixture(scope="module")
def image_folder(workdir):
  """Test-record JPEG bytes as files, the first one also as grey/RGBA PNG and CMYK JPEG, and three bad files."""
  folder = workdir.parent / "images"
  folder.mkdir()
  examples = _records(workdir, "test*.tfrec")[:36]
  for example in examples:
    (folder / f"{example['image_name']}.jpg").write_bytes(example["image"])
  first = Image.open(io.BytesIO(examples[0]["image"]))
  first.convert("L").save(folder / "grey.png")
  first.convert("RGBA").save(folder / "rgba.png")
  first.convert("CMYK").save(folder / "cmyk.jpg")
  (folder / "broken.jpg").write_bytes(examples[1]["image"][:300])
  (folder / "empty.jpeg").write_bytes(b"")
  (folder / "notes.txt").write_text("not an image")
  return folder


@pytest.fixture(scope="module")
def predicted(workdir, image_folder):
  """The predict command (a subprocess, as users run it) with saliency maps: (rows, process, folder)."""
  out, maps = workdir.parent / "preds.csv", workdir.parent / "maps"
  proc = helpers.python("-m", "melanoma_jax.predict", f"--workdir={workdir}", f"--images={image_folder}",
                 f"--out={out}", f"--saliency={maps}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return pd.read_csv(out, keep_default_na=False), proc, maps


def test_predict_reproduces_the_runs_submission_from_jpeg_files(workdir, predicted, image_folder):
  rows, proc, _ = predicted
  assert list(rows.columns) == ["image", "probability", "error"]
  files = sorted(p.name for p in image_folder.iterdir())
  assert sorted(rows["image"]) == files  # One row per file: the text file gets its error row.
  submission = pd.read_csv(workdir / "submission.csv").set_index("image_name")
  jpegs = rows[rows["image"].str.startswith("ISIC_")]
  want = submission.loc[jpegs["image"].str[:-len(".jpg")], "target"].to_numpy()
  np.testing.assert_allclose(jpegs["probability"].astype(float).to_numpy(), want, rtol=0, atol=1e-5)
  assert "predicted 39 of 42 image(s)" in proc.stdout


def test_predict_in_bfloat16_on_request_stays_near_the_float32_run(workdir, predicted, image_folder, tmp_path):
  """--dtype=bfloat16 computes in bfloat16 (said in the model's line) and moves probabilities by rounding only."""
  out = tmp_path / "bf16.csv"
  assert predict_cli.command(str(workdir), str(image_folder), str(out), dtype="bfloat16") == 0
  rows = pd.read_csv(out, keep_default_na=False).set_index("image")
  want = predicted[0].set_index("image").loc[rows.index]
  assert (rows["error"] == want["error"]).all()
  ok = rows["error"] == ""
  got, ref = rows.loc[ok, "probability"].astype(float), want.loc[ok, "probability"].astype(float)
  assert 0 < np.abs(got - ref).max() < 0.02, np.abs(got - ref).max()  # Not float32's values, near them.
  assert "computing in bfloat16" in loading.load_predictor(str(workdir), dtype="bfloat16").description


def test_unreadable_files_get_a_reason_and_converted_files_a_prediction(workdir, predicted):
  rows, proc, _ = predicted
  by_name = rows.set_index("image")
  for name in UNREADABLE:
    assert by_name.loc[name, "probability"] == "" and by_name.loc[name, "error"], name
    assert f"{name}: " in proc.stderr
  assert by_name.loc["empty.jpeg", "error"] == "empty file"
  assert "not a decodable JPEG" in by_name.loc["broken.jpg", "error"]
  # libjpeg's own line ("Improper call to JPEG library in state 201") goes with the file, not on its own.
  assert "the decoder said: " in by_name.loc["broken.jpg", "error"]
  decoder_lines = [line for line in proc.stderr.splitlines() if re.search(r"JPEG (library|datastream|data)", line)]
  assert decoder_lines and all("broken.jpg: " in line for line in decoder_lines), proc.stderr
  assert by_name.loc["notes.txt", "error"] == "not a decodable JPEG or PNG (unknown format)"
  first = _records(workdir, "test*.tfrec")[0]["image_name"]  # The image the converted files hold.
  original = float(by_name.loc[f"{first}.jpg", "probability"])
  for name in ("grey.png", "rgba.png", "cmyk.jpg"):  # Converted to RGB: finite, near the original.
    assert by_name.loc[name, "error"] == ""
    assert abs(float(by_name.loc[name, "probability"]) - original) < 0.2, name
  assert float(by_name.loc["rgba.png", "probability"]) == pytest.approx(original, abs=2e-3)  # PNG: lossless.


def test_saliency_maps_are_written_per_readable_image(predicted):
  rows, _, maps = predicted
  readable = rows[rows["error"] == ""]["image"]
  written = sorted(p.name for p in maps.iterdir() if p.suffix == ".png")
  assert written == sorted(predict_cli.saliency_path("", name) for name in readable)
  assert Image.open(maps / written[0]).size[0] > 500  # Three panels side by side.


def _panels(png, size):
  """The figure's three image panels (image | Grad-CAM overlay | SmoothGrad), left to right: [3, size, size, 3]
  RGB in [0, 1], one sample at the centre of each of the `size` x `size` data pixels each panel shows.

  The panels are the only drawings that fill more than half of a row (the titles are sparse text) and, in
  those rows, more than half of their columns. Matplotlib draws a 96-pixel image on about 300 screen pixels
  by repeating pixels (upsampling by more than 3), so centre samples read back the drawn colours.
  """
  pixels = np.asarray(Image.open(png).convert("RGB"), np.float32) / 255.0
  drawn = (pixels < 250 / 255).any(axis=-1)  # Not the figure's white background.
  rows = np.flatnonzero(drawn.mean(axis=1) > 0.5)
  columns = np.flatnonzero(drawn[rows].mean(axis=0) > 0.5)
  runs = np.split(columns, np.flatnonzero(np.diff(columns) > 1) + 1)
  assert len(runs) == 3 and np.all(np.diff(rows) == 1), (png, len(runs))
  centres = (np.arange(size) + 0.5) / size
  panels = []
  for run in runs:
    assert len(run) == len(rows) and np.all(np.diff(run) == 1), png  # Square, unbroken panels.
    r = (rows[0] + centres * len(rows)).astype(int)
    c = (run[0] + centres * len(run)).astype(int)
    panels.append(pixels[np.ix_(r, c)])
  return np.stack(panels)


def _unmap(colours, cmap):
  """The values in [0, 1] that colour map `cmap` draws as `colours` [..., 3] (its nearest of 256 colours)."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top
  table = colormaps[cmap](np.linspace(0.0, 1.0, 256))[:, :3].astype(np.float32)
  norms, flat = (table ** 2).sum(axis=1), colours.reshape(-1, 3)
  nearest = np.concatenate([(norms - 2.0 * flat[i:i + 8192] @ table.T).argmin(axis=1)  # Less |colour|^2.
                            for i in range(0, len(flat), 8192)])  # Chunks stay in cache.
  return (nearest / 255.0).reshape(colours.shape[:-1])


def _correlations(a, b):
  """[len(a), len(b)] Pearson correlations between the maps of `a` and those of `b`."""
  a, b = a.reshape(len(a), -1), b.reshape(len(b), -1)
  a = (a - a.mean(1, keepdims=True)) / a.std(1, keepdims=True)
  b = (b - b.mean(1, keepdims=True)) / b.std(1, keepdims=True)
  return a @ b.T / a.shape[1]


def test_saliency_pngs_show_the_image_and_its_own_maps(workdir, image_folder, predicted):
  """Reads the maps back out of the predict command's PNGs: the first panel is the model input, the overlay
  minus 55% of it is the jet-coloured Grad-CAM and the third panel the magma-coloured SmoothGrad
  (save_figure's drawing), each equal to saliency.grad_cam / smoothgrad of the same file.

  SmoothGrad's noise is drawn for the whole batch, so it is recomputed on the batch the command formed: the
  first global batch of files in sorted order (32 of the 36 test JPEGs; `ISIC_` sorts before the others).
  """
  maps = predicted[2]
  predictor = loading.load_predictor(str(workdir))
  paths = images.list_images(str(image_folder))[:predictor.global_batch]
  reader = images.Reader(SIZE)
  x = np.stack([reader.read(path)[0] for path in paths])  # Every file of this batch is a readable JPEG.
  cams = np.asarray(saliency.grad_cam(predictor.model, predictor.variables, x))
  smooth = np.asarray(saliency.smoothgrad(predictor.model, predictor.variables, x))
  assert (cams.max(axis=(1, 2)) > 0.99).all()  # Every map has a hot region to find in the overlay.
  shown = np.stack([_panels(predict_cli.saliency_path(str(maps), os.path.basename(p)), SIZE) for p in paths])
  rgb = np.clip((x + 1.0) / 2.0, 0.0, 1.0)
  np.testing.assert_allclose(shown[:, 0], rgb, rtol=0, atol=3 / 255)  # The input, not a neighbour's or rescaled.
  shown_cams = _unmap((shown[:, 1] - 0.55 * rgb) / 0.45, "jet")  # The overlay's colour, the image taken out.
  shown_smooth = _unmap(shown[:, 2], "magma")
  assert np.abs(shown_cams - cams).mean() < 0.01 and np.abs(shown_smooth - smooth).mean() < 0.01
  # Where the cam is hot the overlay is coloured hot (red, not the blue of a cold cam) over the image.
  hot = cams > 0.8
  assert ((shown[:, 1, ..., 0] - shown[:, 1, ..., 2])[hot] > 0.2).mean() > 0.9
  # Not blank, and each PNG shows its own image's maps: far closer to them than to any other image's.
  assert (shown_smooth.std(axis=(1, 2)) > 0.1).all() and (shown_cams.std(axis=(1, 2)) > 0.03).all()
  for got, want in ((shown_cams, cams), (shown_smooth, smooth)):
    r = _correlations(got, want)
    assert np.diag(r).min() > 0.99 and (r - 2 * np.eye(len(r))).max() < 0.95


def test_no_readable_image_exits_non_zero(workdir, tmp_path, capsys):
  (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
  assert predict_cli.command(str(workdir), str(tmp_path), str(tmp_path / "p.csv")) == 1
  assert "error: no image could be read" in capsys.readouterr().err
  assert pd.read_csv(tmp_path / "p.csv")["error"].str.contains("not a decodable").all()


def test_refusals_are_one_line(workdir, image_folder, tmp_path):
  with pytest.raises(InputError, match="only used by ensemble workdirs"):
    predict_cli.run(str(workdir), str(image_folder), str(tmp_path / "p.csv"), metadata="meta.csv")
  with pytest.raises(InputError, match="not a training run"):
    loading.load_predictor(str(tmp_path))
  (tmp_path / "ensemble").mkdir()
  (tmp_path / "ensemble" / "run.json").write_text(json.dumps({"task": "ensemble", "num_folds": 2}))
  with pytest.raises(InputError, match="fold_0: fold 0 of 2 not found"):  # Predicted by inference/ensemble.py.
    loading.load_predictor(str(tmp_path / "ensemble"))
  (tmp_path / "theirs").mkdir()
  (tmp_path / "theirs" / "keep.txt").write_text("x")
  with pytest.raises(InputError, match="a non-empty folder this project did not create"):
    predict_cli.run(str(workdir), str(image_folder), str(tmp_path / "p.csv"), str(tmp_path / "theirs"))
  from melanoma_jax import export  # pylint: disable=g-import-not-at-top
  with pytest.raises(InputError, match="a non-empty folder this project did not create"):
    export.run(str(workdir), str(tmp_path / "theirs"))
  assert os.listdir(tmp_path / "theirs") == ["keep.txt"]


def test_config_comes_from_run_json_when_the_run_never_finished(workdir, tmp_path):
  (tmp_path / "run.json").write_text((workdir / "run.json").read_text())
  config = identity.recorded_config(str(tmp_path))
  assert config.model.name == "tiny" and config.image_size == SIZE and config.tta is False
  assert identity.recorded_config(str(workdir)).tta == 1  # results.json: the demo config's setting (1 view).
  assert identity.recorded_config(str(workdir), {"tta": True}).tta is True


def _lesion_mask(image_name, patient_id, malignant, size):
  """Inside the border of the lesion the generator drew: its ellipse and Fourier border (render.py's
  `_lesion_radius` <= 1) from the lesion's own parameters, replayed from the image's random stream."""
  rng = seeding.stable_rng(SEED, image_name, seeding.IMAGE_STREAM)
  p = lesions.make_lesion_params(rng, lesions.patient_style(SEED, patient_id), bool(malignant))
  axis = ((np.arange(size) + 0.5) / size) * 2.0 - 1.0
  x, y = np.meshgrid(axis, axis)
  dx, dy = x - p.centre[0], y - p.centre[1]
  c, s = math.cos(p.angle), math.sin(p.angle)
  u, v = dx * c + dy * s, (-dx * s + dy * c) * p.aspect
  theta = np.arctan2(v, u)[..., None]
  k = np.arange(1, len(p.border_amplitudes) + 1)
  border = np.maximum(1.0 + (np.asarray(p.border_amplitudes) * np.cos(k * theta + np.asarray(p.border_phases)))
                      .sum(-1), 0.3)
  return np.sqrt(u * u + v * v) / (p.radius * border) <= 1.0


def test_grad_cam_falls_on_malignant_lesions(workdir):
  """Grad-CAM of the malignant logit on the training set's melanomas: most of its mass inside the lesion.

  Only images whose dermoscope field covers the whole frame (bright corners): the tiny model's 7-pixel
  receptive field cannot tell the dark rim's edge from a lesion border, and marks both.
  """
  predictor = loading.load_predictor(str(workdir))
  table = pd.read_csv(workdir / "data" / "train.csv").set_index("image_name")
  examples = [e for e in _records(workdir, "train*.tfrec") if table.loc[e["image_name"], "target"] == 1]
  reader = images.Reader(SIZE)
  x = np.stack([reader.decode(e["image"]) for e in examples])
  corners = np.stack([x[:, :6, :6], x[:, :6, -6:], x[:, -6:, :6], x[:, -6:, -6:]], 1).mean((2, 3, 4))
  keep = np.where(corners.min(axis=1) > -0.3)[0]  # Corners brighter than 35% grey: no dark rim.
  assert len(keep) >= 4
  cams = np.asarray(saliency.grad_cam(predictor.model, predictor.variables, x[keep]))
  masks = np.stack([_lesion_mask(examples[i]["image_name"], table.loc[examples[i]["image_name"], "patient_id"],
                                 True, SIZE) for i in keep])
  inside = (cams * masks).sum((1, 2)) / cams.sum((1, 2))
  assert inside.mean() > 0.6 and np.median(inside) > 0.5, (inside, masks.mean())
  assert masks.mean() < 0.45  # The lesions leave most of the frame outside.
  smooth = np.asarray(saliency.smoothgrad(predictor.model, predictor.variables, x[keep[:2]]))
  assert smooth.shape == (2, SIZE, SIZE) and 0.0 <= smooth.min() and smooth.max() == pytest.approx(1.0)


def test_saved_model_in_a_fresh_tensorflow_matches_the_predict_command(workdir, predicted, image_folder, tmp_path):
  from melanoma_jax import export  # pylint: disable=g-import-not-at-top
  out = tmp_path / "saved_model"
  export.run(str(workdir), str(out))
  export.run(str(workdir), str(out))  # An export of ours is replaced.
  assert json.loads((out / "melanoma_jax_export.json").read_text())["input"] == "image_bytes"
  rows = predicted[0]
  rows = rows[rows["error"] == ""]
  script = (
      "import base64, json, sys, tensorflow as tf\n"
      "serve = tf.saved_model.load(sys.argv[1]).signatures['serving_default']\n"
      "names = json.loads(sys.argv[3])\n"
      # The bytes as TF Serving's REST API hands them over: {'instances': [{'image_bytes': {'b64': ...}}]}.
      "body = {'instances': [{'image_bytes': {'b64': base64.b64encode(open(sys.argv[2] + '/' + n, 'rb').read())"
      ".decode()}} for n in names]}\n"
      "batch = [base64.b64decode(i['image_bytes']['b64']) for i in body['instances']]\n"
      "inputs = list(serve.structured_input_signature[1])\n"
      "print(json.dumps({'inputs': inputs, 'outputs': list(serve.structured_outputs),\n"
      "  'all': serve(image_bytes=tf.constant(batch))['probability'].numpy().tolist(),\n"
      "  'one': serve(image_bytes=tf.constant(batch[:1]))['probability'].numpy().tolist(),\n"
      "  'none': serve(image_bytes=tf.constant([], tf.string))['probability'].numpy().tolist(),\n"
      "  'ours': 'melanoma_jax' in sys.modules}))\n")
  proc = helpers.python("-c", script, str(out), str(image_folder), json.dumps(list(rows["image"])))
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["inputs"] == ["image_bytes"] and not got["ours"]
  assert sorted(got["outputs"]) == ["error", "probability"]
  want = rows["probability"].astype(float).to_numpy()
  np.testing.assert_allclose(got["all"], want, rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["one"], want[:1], rtol=0, atol=1e-5)
  assert got["none"] == []
