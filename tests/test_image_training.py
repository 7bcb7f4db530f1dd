"""Image training through main.py and the real pipeline: outputs, exact kill-and-resume, bad configs, NaN stop.

Most runs use config.model.name=tiny (the machinery at a fraction of the compile time); one run trains the
real InceptionResNetV2 classifier for a few steps.
"""
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from sklearn import metrics as sk_metrics

from configs import demo
from melanoma_jax.data import synthetic
from melanoma_jax.image import setup, task as image
from melanoma_jax.utils.errors import InputError, NonFiniteLossError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.model.name=tiny", "--config.image_size=75", "--config.per_device_batch_size=2",
        "--config.num_epochs=3", "--config.log_every_steps=2", "--jax_cache_dir="]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic") / "data")
  synthetic.generate_dataset(out, num_patients=24, image_size=75, seed=0)
  return out


def _main(workdir, data_dir, *extra, wait=True, devices=8):
  cmd = [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.data_dir={data_dir}", *TINY, *extra]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _config(data_dir, **overrides):
  """The config of TINY, for in-process calls (no interpreter start-up)."""
  config = demo.get_config()
  config.data_dir = str(data_dir)
  config.model.name = "tiny"
  config.image_size, config.per_device_batch_size, config.num_epochs = 75, 2, 3
  config.log_every_steps = 2
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run")
  proc = _main(workdir, data_dir)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_run_writes_results_checkpoints_and_predictions(uninterrupted, data_dir):
  workdir, proc = uninterrupted
  results = json.loads((workdir / "results.json").read_text())
  for key in ("val_auc", "best_val_auc", "epochs", "steps", "train_images_per_sec", "wall_seconds",
              "config", "versions"):
    assert key in results, key
  assert results["epochs"] == 3 and results["config"]["model"]["name"] == "tiny"
  assert results["best_val_auc"] == max(h["val_auc"] for h in results["history"])
  assert results["versions"]["jax"] and results["train_images_per_sec"] > 0
  assert "images/s" in proc.stderr and "ETA" in proc.stderr  # The progress line.
  oof = pd.read_csv(workdir / "oof.csv")
  assert list(oof.columns) == ["image_name", "patient_id", "target", "prediction", "fold"]
  train = pd.read_csv(os.path.join(data_dir, "train.csv"))
  assert oof["image_name"].is_unique and set(oof["image_name"]) <= set(train["image_name"])
  assert oof["prediction"].between(0, 1).all()
  submission = pd.read_csv(workdir / "submission.csv")
  test = pd.read_csv(os.path.join(data_dir, "test.csv"))
  assert list(submission.columns) == ["image_name", "target"]
  assert list(submission["image_name"]) == list(test["image_name"])
  assert submission["target"].between(0, 1).all() and submission["target"].nunique() > 1
  assert (workdir / "roc.png").stat().st_size > 0
  assert any((workdir / "tensorboard").iterdir())
  assert sorted(p.name for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def test_oof_auc_is_exact(uninterrupted):
  workdir, _ = uninterrupted
  oof = pd.read_csv(workdir / "oof.csv")
  # The best checkpoint's validation AUC, recomputed by sklearn from the written predictions.
  results = json.loads((workdir / "results.json").read_text())
  assert sk_metrics.roc_auc_score(oof["target"], oof["prediction"]) == pytest.approx(
      results["best_val_auc"], abs=1e-6)


def test_killed_run_resumes_to_the_same_result(uninterrupted, data_dir, tmp_path):
  reference, _ = uninterrupted
  workdir = tmp_path / "killed"
  proc = _main(workdir, data_dir, wait=False)
  latest = workdir / "checkpoints"
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if latest.is_dir() and any(p.name.isdigit() for p in latest.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run finished before it could be killed"
  os.kill(proc.pid, signal.SIGKILL)  # Mid-run: after the first epoch's checkpoint.
  proc.wait()
  assert not (workdir / "results.json").exists()
  resumed = _main(workdir, data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  want = json.loads((reference / "results.json").read_text())
  got = json.loads((workdir / "results.json").read_text())
  assert got["history"] == want["history"] and got["steps"] == want["steps"]
  pd.testing.assert_frame_equal(pd.read_csv(workdir / "submission.csv"), pd.read_csv(reference / "submission.csv"))


def test_a_run_killed_inside_a_checkpoint_save_resumes_to_the_same_result(uninterrupted, data_dir, tmp_path):
  reference, _ = uninterrupted
  workdir = tmp_path / "killed_in_save"
  proc = _main(workdir, data_dir, wait=False)
  checkpoints = workdir / "checkpoints"
  deadline, in_save = time.time() + 300, None
  while in_save is None and time.time() < deadline and proc.poll() is None:
    if checkpoints.is_dir():  # orbax writes a step into <step>.orbax-checkpoint-tmp*, renamed when complete.
      in_save = next((p.name for p in checkpoints.iterdir() if ".orbax-checkpoint-tmp" in p.name), None)
    if in_save is None:
      time.sleep(0.001)
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert in_save, "no checkpoint save was seen in progress"
  assert not (workdir / "results.json").exists()
  resumed = _main(workdir, data_dir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  want = json.loads((reference / "results.json").read_text())
  got = json.loads((workdir / "results.json").read_text())
  assert got["history"] == want["history"] and got["steps"] == want["steps"]
  assert got["best_val_auc"] == want["best_val_auc"]
  pd.testing.assert_frame_equal(pd.read_csv(workdir / "submission.csv"), pd.read_csv(reference / "submission.csv"))


def test_rerun_of_a_finished_run_does_not_train_again(uninterrupted, data_dir, caplog):
  workdir, _ = uninterrupted
  before = json.loads((workdir / "results.json").read_text())
  # On absl's logger itself too: a test that ran absl's app in this process can leave it not propagating.
  absl_logger = logging.getLogger("absl")
  absl_logger.addHandler(caplog.handler)
  try:
    with caplog.at_level("INFO", logger="absl"):
      results = image.train(_config(data_dir), str(workdir))
  finally:
    absl_logger.removeHandler(caplog.handler)
  assert "training already finished" in caplog.text
  assert results["history"] == before["history"] and results["steps"] == before["steps"]


def test_predict_mode_with_tta(uninterrupted, data_dir, tmp_path):
  workdir, _ = uninterrupted
  outputs = image.predict(_config(data_dir, tta=True), str(workdir))
  assert outputs["tta"]
  submission = pd.read_csv(workdir / "submission.csv")
  assert submission["target"].between(0, 1).all()
  with pytest.raises(InputError, match="no best checkpoint to predict with"):
    image.predict(_config(data_dir), str(tmp_path / "never_trained"))


@pytest.mark.parametrize("override, message", [
    ({"image_size": 74}, "config.image_size=74: inception_resnet_v2 needs at least 75x75"),
    ({"image_size": 31, "model.name": "efficientnet_b3"}, "config.image_size=31: efficientnet_b3 needs at least 32x32"),
    ({"model.name": "resnet50"}, "config.model.name='resnet50' must be one of inception_resnet_v2, efficientnet_b0,"),
    ({"global_batch_size": 12}, "config.global_batch_size=12 is not divisible by the 8 local devices"),
    ({"fold": 5}, "config.fold=5 must be in [0, config.num_folds=5)"),
    ({"per_device_batch_size": 0}, "config.per_device_batch_size=0 must be >= 1"),
    ({"model.kernels": "cudnn"}, "config.model.kernels='cudnn' must be one of auto, cpu, xla"),
    ({"global_batch_size": -8}, "config.global_batch_size=-8 must be >= 0"),
])
def test_bad_configs_are_refused(override, message):
  config = demo.get_config()
  for key, value in override.items():
    *parents, leaf = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  with pytest.raises(InputError) as error:
    setup.resolve(config, num_devices=8)
  assert message in str(error.value)


def test_missing_data_dir_is_named(tmp_path):
  with pytest.raises(InputError, match=f"{tmp_path / 'no_such_dir'}: data directory not found"):
    image.train(_config(tmp_path / "no_such_dir"), str(tmp_path / "w"))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # The 1e39 weights, on purpose.
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
  workdir = str(tmp_path / "nan")
  image.train(_config(data_dir, num_epochs=1), workdir)
  # Other class weights make it another run: forget the records (run.json and the run its checkpoints
  # keep, as a run made before either existed) to continue this one with them anyway.
  os.remove(os.path.join(workdir, "run.json"))
  latest_dir = tmp_path / "nan" / "checkpoints"
  latest = sorted(int(p.name) for p in latest_dir.iterdir() if p.name.isdigit())
  with pytest.raises(InputError, match=rf"checkpoints/{latest[-1]}: holds a run of another config \(class_weights "
                                       r"None in the checkpoint, \[1e\+39, 1e\+39\] here\)"):
    image.train(_config(data_dir, num_epochs=2, class_weights=(1e39, 1e39)), workdir)
  assert not os.path.exists(os.path.join(workdir, "run.json"))  # Refused before anything was recorded.
  for step in latest:
    meta_file = latest_dir / str(step) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    del meta["run"]
    meta_file.write_text(json.dumps(meta))
  with pytest.raises(NonFiniteLossError) as error:  # Weights overflow float32: an inf/NaN loss.
    image.train(_config(data_dir, num_epochs=2, class_weights=(1e39, 1e39)), workdir)
  message = str(error.value)
  assert f"at step {latest[-1] + 1};" in message and f"step {latest[-1]})" in message
  assert sorted(int(p.name) for p in latest_dir.iterdir() if p.name.isdigit()) == latest


def test_inception_resnet_v2_trains_through_main(data_dir, tmp_path):
  """The real classifier, its backbone from a Keras weights file, through main: a few pmapped head-only
  steps on 2 devices, evaluation and the submission. Compiling is what this test costs: 8 devices and the
  backbone's gradients took it from 58 to 137 s; the tiny model's runs cover 8 devices, and the backbone's
  pmapped gradients are tested in-process (test_models, test_conv)."""
  from melanoma_jax.utils.tf_host import tf  # pylint: disable=g-import-not-at-top
  tf()  # TensorFlow with GPUs hidden before Keras loads it.
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  weights = str(tmp_path / "irv2_notop.weights.h5")
  keras.applications.InceptionResNetV2(weights=None, include_top=False, input_shape=(75, 75, 3)).save_weights(
      weights)
  workdir = tmp_path / "irv2"
  proc = _main(workdir, data_dir, "--config.model.name=inception_resnet_v2", "--config.num_epochs=1",
               "--config.per_device_batch_size=4", "--config.max_steps_per_epoch=2",
               f"--config.model.init_weights={weights}", "--config.freeze_backbone_epochs=1", devices=2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"backbone initialised from {weights}" in proc.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["steps"] == 2 and results["devices"] == 2 and results["global_batch"] == 8
  assert results["compute_dtype"] == "float32"  # The run's dtype, in results.json and in the model's log line.
  assert "inception_resnet_v2 75x75 computing in float32; global batch 8 on 2 device(s)" in proc.stderr
  assert "made before runs were recorded" not in proc.stderr  # A fresh workdir.
  assert np.isfinite(results["val_auc"])
  assert len(pd.read_csv(workdir / "submission.csv")) == len(pd.read_csv(os.path.join(data_dir, "test.csv")))


def test_efficientnet_b0_trains_through_main_and_resumes_after_a_kill(data_dir, tmp_path):
  """An EfficientNet backbone through the same paths: its Keras weights file as init, a kill after the
  first epoch's checkpoint, a resumed run to the end; weights of another backbone refused in one line."""
  from melanoma_jax.utils.tf_host import tf  # pylint: disable=g-import-not-at-top
  tf()
  import keras  # pylint: disable=g-import-not-at-top
  keras.utils.set_random_seed(0)
  weights = str(tmp_path / "b0_notop.weights.h5")
  keras.applications.EfficientNetB0(weights=None, include_top=False, input_shape=(64, 64, 3)).save_weights(weights)
  # The resumed run compiles the killed run's programs again: a compilation cache of the test's own
  # (both runs, nothing else) lets it load them instead.
  run = ["--config.model.name=efficientnet_b0", "--config.image_size=64", "--config.num_epochs=2",
         "--config.per_device_batch_size=1", "--config.max_steps_per_epoch=2", f"--config.model.init_weights={weights}",
         "--config.freeze_backbone_epochs=0", f"--jax_cache_dir={tmp_path / 'xla_cache'}"]
  workdir = tmp_path / "b0"
  proc = _main(workdir, data_dir, *run, wait=False)
  checkpoints = workdir / "checkpoints"
  deadline = time.time() + 500
  while time.time() < deadline and proc.poll() is None:
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read()[-3000:]
  os.kill(proc.pid, signal.SIGKILL)
  proc.wait()
  assert not (workdir / "results.json").exists()
  resumed = _main(workdir, data_dir, *run)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["epochs"] == 2 and results["steps"] == 4 and np.isfinite(results["val_auc"])
  assert json.loads((workdir / "run.json").read_text())["model.name"] == "efficientnet_b0"
  other = _main(tmp_path / "b1", data_dir, *run, "--config.model.name=efficientnet_b1")
  assert other.returncode == 1
  assert other.stderr.strip().splitlines()[-1] == (
      f"error: {weights}: holds efficientnet_b0 weights, config.model.name is efficientnet_b1")


def test_data_mode_leaves_a_trained_runs_results_alone(uninterrupted, data_dir):
  workdir, _ = uninterrupted
  before = (workdir / "results.json").read_bytes()
  proc = _main(workdir, data_dir, "--mode=data")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "results.json").read_bytes() == before
  summary = json.loads((workdir / "data.json").read_text())
  assert summary["mode"] == "data" and summary["images"] == len(pd.read_csv(os.path.join(data_dir, "train.csv")))


def test_a_busy_workdir_is_refused_and_a_killed_holder_does_not_block(data_dir, tmp_path):
  workdir = tmp_path / "busy"
  hold = ("import sys, time\nfrom melanoma_jax.training import workdir\nwith workdir.lock(sys.argv[1]):\n"
          "  print('held', flush=True)\n  time.sleep(600)\n")
  holder = subprocess.Popen([sys.executable, "-c", hold, str(workdir)], cwd=REPO, stdout=subprocess.PIPE,
                            text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    proc = _main(workdir, data_dir, "--mode=data")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {workdir} is in use by process {holder.pid} on "), last
    assert "Traceback" not in proc.stderr and not (workdir / "data.json").exists()
  finally:
    holder.kill()  # SIGKILL: the lock file stays behind, the lock itself goes with the process.
    holder.wait()
  proc = _main(workdir, data_dir, "--mode=data")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert (workdir / "data.json").exists()


@pytest.mark.parametrize("extra, differ", [
    (["--config.fold=1"], "fold 0 -> 1"),
    (["--mode=predict", "--config.fold=2"], "fold 0 -> 2"),
    (["--config.seed=3"], "seed 0 -> 3"),
    (["--config.optimizer.lr_max=0.01"], "optimizer.lr_max 0.001 -> 0.01"),
])
def test_a_workdir_refuses_another_config(uninterrupted, data_dir, extra, differ):
  workdir, _ = uninterrupted
  outputs = lambda: {p.name: p.stat().st_mtime_ns for p in workdir.iterdir() if p.name != ".lock"}
  before = outputs()
  proc = _main(workdir, data_dir, *extra)
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: {workdir / 'run.json'}: this workdir holds a run of another config") and differ in last
  assert "Traceback" not in proc.stderr and "resumed" not in proc.stderr
  assert outputs() == before  # Nothing written.


def test_more_epochs_extend_a_finished_run(data_dir, tmp_path):
  workdir = str(tmp_path / "longer")
  first = image.train(_config(data_dir, num_epochs=1), workdir)
  longer = image.train(_config(data_dir, num_epochs=2, log_every_steps=5), workdir)  # Both may change.
  assert longer["history"][:1] == first["history"] and longer["epochs"] == 2


def _rewrite_first_image(shard, change):
  """Rewrites `shard` with its first example's image bytes passed through `change`."""
  from melanoma_jax.utils.tf_host import tf  # pylint: disable=g-import-not-at-top
  tf_ = tf()
  examples = [tf_.train.Example.FromString(r.numpy()) for r in tf_.data.TFRecordDataset(str(shard))]
  image_bytes = examples[0].features.feature["image"].bytes_list.value
  image_bytes[0] = change(image_bytes[0])
  with tf_.io.TFRecordWriter(str(shard)) as writer:
    for example in examples:
      writer.write(example.SerializeToString())


def test_a_prediction_that_fails_half_way_leaves_the_previous_outputs_whole(data_dir, tmp_path):
  """A corrupt test JPEG, skipped by the first run (`skip_corrupt` may change between runs), stops a
  prediction without it after the validation predictions succeeded: no output may have changed."""
  own_data = tmp_path / "data"
  shutil.copytree(data_dir, own_data)
  _rewrite_first_image(sorted(own_data.glob("test*.tfrec"))[0], lambda _: b"\xff\xd8 not a jpeg")
  workdir = tmp_path / "run"
  proc = _main(workdir, own_data, "--config.num_epochs=1", "--config.skip_corrupt=true")
  assert proc.returncode == 0, proc.stderr[-3000:]
  outputs = ("oof.csv", "submission.csv", "roc.png", "results.json")
  before = {name: (workdir / name).stat().st_mtime_ns for name in outputs}
  proc = _main(workdir, own_data, "--config.num_epochs=1", "--mode=predict")
  assert proc.returncode == 1 and "is not a decodable JPEG" in proc.stderr.strip().splitlines()[-1]
  assert {name: (workdir / name).stat().st_mtime_ns for name in outputs} == before
  assert not [p.name for p in workdir.iterdir() if ".tmp" in p.name]

  # Data identity by content: edits that keep every size are refused, naming the file, before any work.
  train_csv = own_data / "train.csv"
  text = train_csv.read_text()
  train_csv.write_text(text.replace(",0\n", ",1\n", 1))  # A flipped label.
  config = _config(own_data, num_epochs=1, skip_corrupt=True)
  for call in (image.train, image.predict):
    with pytest.raises(InputError, match=r"run\.json: the data of this run changed since it was recorded: "
                                         r"train\.csv \(sha256 [0-9a-f]{12}\.\.\. now [0-9a-f]{12}\.\.\.\)"):
      call(config, str(workdir))
  train_csv.write_text(text)
  shard = sorted(own_data.glob("test*.tfrec"))[-1]
  size = shard.stat().st_size
  _rewrite_first_image(shard, lambda jpeg: jpeg[:-40] + bytes(b ^ 0x55 for b in jpeg[-40:-2]) + jpeg[-2:])
  assert shard.stat().st_size == size
  with pytest.raises(InputError, match=rf"data of this run changed since it was recorded: {shard.name} "):
    image.predict(config, str(workdir))
  assert {name: (workdir / name).stat().st_mtime_ns for name in outputs} == before

def test_diagnosis_target_trains_a_softmax_and_reports_its_melanoma_probability(data_dir, tmp_path):
  """config.target=diagnosis: a softmax over the ISIC 2019 classes with a weight per class; oof.csv holds
  every class's probability, and `prediction`, the report and the submission are p(MEL)."""
  from melanoma_jax.data import diagnosis  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "diagnosis")
  results = image.train(_config(data_dir, num_epochs=1, target="diagnosis", tta=8), workdir)
  oof = pd.read_csv(os.path.join(workdir, "oof.csv"))
  columns = diagnosis.class_columns()
  assert columns[0] == "p_MEL" and set(columns) <= set(oof.columns)
  np.testing.assert_allclose(oof[columns].sum(axis=1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(oof["prediction"], oof["p_MEL"], rtol=1e-6)
  assert results["outputs"]["predict_val_auc"] == pytest.approx(
      sk_metrics.roc_auc_score(oof["target"], oof["p_MEL"]))
  report = json.loads(open(os.path.join(workdir, "report.json")).read())
  assert report["stages"]["image"]["column"] == "prediction"
  assert report["stages"]["image"]["auc"] == pytest.approx(results["outputs"]["predict_val_auc"], abs=1e-9)
  submission = pd.read_csv(os.path.join(workdir, "submission.csv"))
  assert submission["target"].between(0, 1).all() and results["outputs"]["tta"] == 8
  # The one seam scores through the same head: the melanoma probability, the classes with embeddings.
  from melanoma_jax.inference import loading  # pylint: disable=g-import-not-at-top
  trained = loading.load_predictor(workdir)
  x = np.zeros((3, 75, 75, 3), np.float32)
  scores = trained.score(x, embeddings=True)
  assert scores.classes.shape == (3, len(diagnosis.CLASSES))
  np.testing.assert_allclose(scores.probabilities, scores.classes[:, 0], rtol=1e-5)


@pytest.fixture(scope="module")
def archive_2019(tmp_path_factory):
  """A synthetic ISIC 2019 download built into a TFDS set (two of its ids taken from 2020: left out)."""
  from melanoma_jax.data import isic_archive  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp("archive")
  synthetic.write_archive(str(root / "downloads"), year=2019, num_images=24, seed=0, image_size=64)
  directory, _ = isic_archive.build(2019, 75, str(root / "downloads"), str(root / "tfds"))
  return directory


def test_external_data_joins_the_training_stream_only(data_dir, archive_2019, tmp_path):
  """config.extra_data: the archive's images are read in training (counted in results.json) and weigh in the
  class weights; validation, oof.csv and the submission stay 2020-only."""
  from melanoma_jax.data import isic_archive  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "extra")
  reads = logging.getLogger("melanoma_jax.image.reads")
  handler = _Collect()
  reads.addHandler(handler)
  reads.setLevel(logging.DEBUG)
  try:
    results = image.train(_config(data_dir, num_epochs=1, extra_data=archive_2019, target="diagnosis"), workdir)
  finally:
    reads.removeHandler(handler)
    reads.setLevel(logging.NOTSET)
  archive_names = set(isic_archive.load(archive_2019).map(lambda r: r["image_name"]).as_numpy_iterator())
  archive_names = {n.decode() for n in archive_names}
  counts = isic_archive.class_counts(archive_2019)
  assert results["training_images"][archive_2019] == len(archive_names) == sum(counts.values()) == 22
  read = {n for line in handler.lines for n in line.split(" read ", 1)[1].split()}
  assert read & archive_names, "no archive image was read in training"
  train_csv = pd.read_csv(os.path.join(data_dir, "train.csv"))
  oof = pd.read_csv(os.path.join(workdir, "oof.csv"))
  assert set(oof["image_name"]) <= set(train_csv["image_name"]) and not set(oof["image_name"]) & archive_names
  assert len(pd.read_csv(os.path.join(workdir, "submission.csv"))) == len(pd.read_csv(os.path.join(data_dir,
                                                                                                  "test.csv")))
  run = json.loads(open(os.path.join(workdir, "run.json")).read())
  assert any(name.endswith(".tfrecord-00000-of-00001") or "isic_archive" in name for name in run["data.files"])


class _Collect(logging.Handler):
  def __init__(self):
    super().__init__(logging.DEBUG)
    self.lines = []

  def emit(self, record):
    self.lines.append(record.getMessage())
