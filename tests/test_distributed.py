"""One run across two processes (jax.distributed on 127.0.0.1, 2 emulated CPU devices each) through main.py.

The runs are shared between the tests (module fixtures): an uninterrupted 2-process training, a 1-process
4-device prediction of its checkpoint, and a 2-process training killed after its first checkpoint and
resumed. The tiny model on a small synthetic set keeps each run to seconds.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from melanoma_jax.data import folds, records, sharding, synthetic

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = ["--config.model.name=tiny", "--config.image_size=75",
       "--config.per_device_batch_size=2", "--config.num_epochs=2", "--config.max_steps_per_epoch=3",
       "--config.log_every_steps=3", "--jax_cache_dir="]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synthetic") / "data")
  synthetic.generate_dataset(out, num_patients=12, image_size=48, seed=0)
  return out


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _env(devices, **extra):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu",
              **extra)


# main.py with the image task's per-epoch read log (a DEBUG logger, off by default) sent to the folder argv[1].
_LOGGING_MAIN = """
import logging, os, runpy, sys
folder = sys.argv.pop(1)
os.makedirs(folder, exist_ok=True)
handler = logging.FileHandler(os.path.join(folder, f"reads.{os.getpid()}.log"))
reads = logging.getLogger("melanoma_jax.image.reads")
reads.addHandler(handler)
reads.setLevel(logging.DEBUG)
reads.propagate = False
sys.argv[0] = "main.py"
runpy.run_path("main.py", run_name="__main__")
"""


def _start(workdir, data_dir, *extra, num_processes=2, env=None, reads=None, config="configs/demo.py",
           run=tuple(RUN)):
  """Popens of the processes of one run, their stderr to WORKDIR.p<i>.log; `reads`: a folder for the
  image task's read log."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    launcher = ["-c", _LOGGING_MAIN, str(reads)] if reads else ["main.py"]
    cmd = [sys.executable, *launcher, f"--config={config}", f"--workdir={workdir}",
           f"--config.data_dir={data_dir}", *run, *extra,
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
    log = open(f"{workdir}.p{i}.log", "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env or _env(2), stdout=subprocess.DEVNULL, stderr=log))
    log.close()
  return procs


def _finish(workdir, procs, timeout=300):
  """(return codes, stderr texts) once every process has ended."""
  codes = [p.wait(timeout=timeout) for p in procs]
  return codes, [open(f"{workdir}.p{i}.log").read() for i in range(len(procs))]


def _two_processes(workdir, data_dir, *extra, env=None, reads=None, **kwargs):
  return _finish(workdir, _start(workdir, data_dir, *extra, env=env, reads=reads, **kwargs))


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
  base = tmp_path_factory.mktemp("two")
  workdir, reads = base / "run", base / "reads"
  codes, logs = _two_processes(workdir, data_dir, reads=reads)
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  return workdir, reads, logs


@pytest.fixture(scope="module")
def one_process_predict(two_process_run, data_dir, tmp_path_factory):
  """The 2-process run's best checkpoint predicted by 1 process with 4 devices (in a copy of the workdir)."""
  workdir = tmp_path_factory.mktemp("predict") / "run"
  shutil.copytree(two_process_run[0], workdir)
  cmd = [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}",
         f"--config.data_dir={data_dir}", *RUN, "--mode=predict"]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


def _validation_names(data_dir):
  train = pd.read_csv(os.path.join(data_dir, "train.csv"))
  return set(train["image_name"][folds.assign_folds(train, 5, 0) == 0])


def test_two_processes_train_one_run(two_process_run):
  workdir, _, logs = two_process_run
  results = json.loads((workdir / "results.json").read_text())
  assert results["processes"] == 2 and results["devices"] == 4 and results["global_batch"] == 8
  assert results["epochs"] == 2 and results["steps"] == 6
  for i, log in enumerate(logs):
    assert f"[process {i}/2] epoch 2/2: val_loss" in log
  # Every process computes the same validation figures (they choose the best checkpoint and stop early).
  epoch_lines = [[line.split("]", 2)[-1] for line in log.splitlines() if "epoch 2/2: val_loss" in line]
                 for log in logs]
  assert epoch_lines[0] == epoch_lines[1]
  assert not [p.name for p in workdir.iterdir() if ".tmp" in p.name]


def test_every_validation_image_is_predicted_once(two_process_run, data_dir):
  workdir = two_process_run[0]
  oof = pd.read_csv(workdir / "oof.csv")
  assert oof["image_name"].is_unique and set(oof["image_name"]) == _validation_names(data_dir)
  submission = pd.read_csv(workdir / "submission.csv")
  assert list(submission["image_name"]) == list(pd.read_csv(os.path.join(data_dir, "test.csv"))["image_name"])


def test_one_process_predicts_the_same_from_the_checkpoint(two_process_run, one_process_predict):
  two = pd.read_csv(two_process_run[0] / "oof.csv")
  one = pd.read_csv(one_process_predict / "oof.csv")
  assert list(one["image_name"]) == list(two["image_name"])
  np.testing.assert_allclose(one["prediction"], two["prediction"], atol=1e-5)
  results = json.loads((two_process_run[0] / "results.json").read_text())
  assert results["outputs"]["predict_val_auc"] == pytest.approx(results["best_val_auc"], abs=1e-6)
  from sklearn import metrics  # pylint: disable=g-import-not-at-top
  assert metrics.roc_auc_score(one["target"], one["prediction"]) == pytest.approx(results["best_val_auc"],
                                                                                  abs=1e-6)
  np.testing.assert_allclose(pd.read_csv(one_process_predict / "submission.csv")["target"],
                             pd.read_csv(two_process_run[0] / "submission.csv")["target"], atol=1e-5)


def _read_log(folder):
  """{(epoch, process): [image names]} of the read logs in `folder`."""
  read = {}
  for path in folder.glob("reads.*.log"):
    for line in path.read_text().splitlines():
      words = line.split()  # "epoch E process P read NAME NAME ..."
      read[(int(words[1]), int(words[3]))] = words[5:]
  return read


def test_each_training_image_is_read_by_one_process_per_epoch(two_process_run, data_dir):
  log = _read_log(two_process_run[1])
  train = set(pd.read_csv(os.path.join(data_dir, "train.csv"))["image_name"]) - _validation_names(data_dir)
  assert sorted(log) == [(e, p) for e in range(2) for p in range(2)]
  for epoch in range(2):
    read = [set(log[(epoch, p)]) for p in range(2)]
    assert read[0] and read[1] and not read[0] & read[1]
    assert read[0] | read[1] <= train
    assert len(log[(epoch, 0)]) == 3 * 4  # Steps x local batch.


def test_process_shares_partition_the_training_records(data_dir):
  """The sharding function over the real record files: every training image in exactly one share."""
  files = records.list_record_files(data_dir, "train")
  train = pd.read_csv(os.path.join(data_dir, "train.csv"))
  names = [e["image_name"] for f in files for e in records.read_examples(f)]
  targets = dict(zip(train["image_name"], train["target"]))
  assert len(files) < 3  # Fewer files than processes: a share of the examples.
  shares = {}
  for epoch_seed in (1, 2):
    got = [sharding.process_share(files, names, targets, epoch_seed, p, 3) for p in range(3)]
    assert all(f == files for f, _ in got)
    flat = [n for _, share in got for n in share]
    assert sorted(flat) == sorted(names)  # Disjoint, and together every image once.
    assert all({targets[n] for n in share} == {0, 1} for _, share in got)
    shares[epoch_seed] = got[0][1]
  assert shares[1] != shares[2]  # The shares move with the epoch.
  many = [f"train{i:02d}.tfrec" for i in range(7)]
  by_file = [sharding.process_share(many, names, targets, 5, p, 3) for p in range(3)]
  assert all(share is None for _, share in by_file)
  assert sorted(f for fs, _ in by_file for f in fs) == many
  assert sharding.process_share(files, names, targets, 5, 0, 1) == (files, None)


def test_a_killed_two_process_run_resumes_to_the_same_result(two_process_run, data_dir, tmp_path):
  reference = two_process_run[0]
  workdir = tmp_path / "killed"
  procs = _start(workdir, data_dir)
  checkpoints, deadline = workdir / "checkpoints", time.time() + 300
  while time.time() < deadline and all(p.poll() is None for p in procs):
    if checkpoints.is_dir() and any(p.name.isdigit() for p in checkpoints.iterdir()):
      break
    time.sleep(0.02)
  assert all(p.poll() is None for p in procs), "the run ended before it could be killed"
  for p in procs:
    os.kill(p.pid, signal.SIGKILL)
  _finish(workdir, procs)
  assert not (workdir / "results.json").exists()
  codes, logs = _two_processes(workdir, data_dir)
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  assert all("resumed from" in log for log in logs)
  want = json.loads((reference / "results.json").read_text())
  got = json.loads((workdir / "results.json").read_text())
  assert got["history"] == want["history"] and got["steps"] == want["steps"]
  pd.testing.assert_frame_equal(pd.read_csv(workdir / "submission.csv"), pd.read_csv(reference / "submission.csv"))


def test_an_error_ends_every_process(data_dir, tmp_path):
  start = time.time()
  codes, logs = _two_processes(tmp_path / "bad", data_dir, "--config.fold=7")
  assert 0 not in codes and time.time() - start < 120, logs
  assert codes[0] == 1 and "[process 0/2] error: config.fold=7 must be in [0, config.num_folds=5)" in logs[0]
  # Process 1 names the same error, unless it was still starting when process 0 (JAX's coordinator) left
  # a few seconds later: then JAX ends it, saying why.
  assert ("[process 1/2] error: config.fold=7 must be in [0, config.num_folds=5)" in logs[1]
          or "another task died" in logs[1]), logs[1][-3000:]


# ---------------------------------------------------------------------------------------------------------
# The ensemble and the tabular task across processes.

ENSEMBLE = ["--config.model.name=tiny", "--config.image_size=75", "--config.num_folds=2", "--config.num_epochs=1",
            "--config.freeze_backbone_epochs=0", "--config.per_device_batch_size=2",
            "--config.max_steps_per_epoch=3", "--config.ensemble.families=('logistic',)", "--jax_cache_dir="]


@pytest.fixture(scope="module")
def two_process_ensemble(data_dir, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ensemble2") / "ens"
  codes, logs = _two_processes(workdir, data_dir, config="configs/ensemble_demo.py", run=tuple(ENSEMBLE))
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  return workdir, logs


def _max_difference(a, b, columns):
  assert list(a["image_name"]) == list(b["image_name"])
  return max(float(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float)).max()) for c in columns)


def test_a_two_process_ensemble_equals_a_one_process_ensemble_of_its_folds(two_process_ensemble, data_dir,
                                                                         tmp_path):
  """Every fold trains across both processes; the stages after it run alike in both; process 0 writes.

  The one-process run (4 devices) reuses the two-process run's fold checkpoints (the processes' training
  shares make a different stream than one process reading everything) but scores every fold's images again
  and refits every stage: the same oof.csv, submission.csv and test_stages.csv (within 1e-6; the test prints
  the largest difference of each file: 0.0 in all three when last run).
  """
  workdir, logs = two_process_ensemble
  auc_lines = [[line.split("]", 2)[-1] for line in log.splitlines() if "out-of-fold AUC:" in line] for log in logs]
  assert auc_lines[0] and auc_lines[0] == auc_lines[1]  # Both processes computed the same stages.
  assert not [p.name for p in workdir.rglob("*") if ".tmp" in p.name]
  results = json.loads((workdir / "results.json").read_text())
  for fold in range(2):
    fold_results = json.loads((workdir / f"fold_{fold}" / "results.json").read_text())
    assert fold_results["processes"] == 2 and fold_results["devices"] == 4
  one = tmp_path / "one"
  shutil.copytree(workdir, one)
  for fold in range(2):
    (one / f"fold_{fold}" / "scores.npz").unlink()
  cmd = [sys.executable, "main.py", "--config=configs/ensemble_demo.py", f"--workdir={one}",
         f"--config.data_dir={data_dir}", *ENSEMBLE]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(4), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("not training again") == 2 and "reusing" not in proc.stderr  # Scored again.
  columns = {"oof.csv": ["prediction", "pred_image", "pred_tabular", "pred_image_context", "pred_fusion"],
             "submission.csv": ["target"], "test_stages.csv": ["prediction", "pred_image", "pred_fusion"]}
  differences = {name: _max_difference(pd.read_csv(workdir / name), pd.read_csv(one / name), cols)
                 for name, cols in columns.items()}
  print("largest differences, 2 processes vs 1:", differences)
  assert max(differences.values()) <= 1e-6, differences
  assert json.loads((one / "results.json").read_text())["stage_oof_auc"] == pytest.approx(
      results["stage_oof_auc"], abs=1e-9)


def test_a_two_process_tabular_run_equals_a_one_process_run(data_dir, tmp_path):
  """Every process trains the same fold models within its own devices; process 0 alone writes."""
  run = ("--config.num_folds=2", "--config.num_epochs=3", "--config.early_stopping_start_epoch=1",
         "--config.early_stopping_patience=1", "--config.smote=False", "--config.per_device_batch_size=16",
         "--config.hidden_sizes=(16,)", "--jax_cache_dir=")
  two = tmp_path / "two"
  codes, logs = _two_processes(two, data_dir, config="configs/tabular.py", run=run)
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  one = tmp_path / "one"
  cmd = [sys.executable, "main.py", "--config=configs/tabular.py", f"--workdir={one}",
         f"--config.data_dir={data_dir}", *run]
  proc = subprocess.run(cmd, cwd=REPO, env=_env(2), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("oof.csv", "submission.csv"):
    pd.testing.assert_frame_equal(pd.read_csv(two / name), pd.read_csv(one / name), check_exact=True)
  assert json.loads((two / "results.json").read_text())["oof_auc"] == json.loads(
      (one / "results.json").read_text())["oof_auc"]


def test_two_processes_read_disjoint_shares_of_the_external_data(data_dir, tmp_path):
  """config.extra_data in a 2-process run: each process reads its own share of the archive set (TFDS' split
  per process) beside its share of the 2020 records; no archive image is read by both."""
  from melanoma_jax.data import isic_archive  # pylint: disable=g-import-not-at-top
  synthetic.write_archive(str(tmp_path / "downloads"), year=2019, num_images=24, seed=0, image_size=48)
  archive, _ = isic_archive.build(2019, 48, str(tmp_path / "downloads"), str(tmp_path / "tfds"))
  names = {n.decode() for n in isic_archive.load(archive).map(lambda r: r["image_name"]).as_numpy_iterator()}
  workdir, reads = tmp_path / "run", tmp_path / "reads"
  codes, logs = _two_processes(workdir, data_dir, f"--config.extra_data={archive}", "--config.num_epochs=1",
                               reads=reads)
  assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
  log = _read_log(reads)
  read = [set(log[(0, p)]) & names for p in range(2)]
  assert read[0] and read[1] and not read[0] & read[1]
  results = json.loads((workdir / "results.json").read_text())
  assert results["training_images"][archive] == len(names)
