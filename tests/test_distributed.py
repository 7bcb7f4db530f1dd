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


def _start(workdir, data_dir, *extra, num_processes=2, env=None):
  """Popens of the processes of one run, their stderr to WORKDIR.p<i>.log."""
  port = _free_port()
  procs = []
  for i in range(num_processes):
    cmd = [sys.executable, "main.py", "--config=configs/demo.py", f"--workdir={workdir}",
           f"--config.data_dir={data_dir}", *RUN, *extra,
           f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
    log = open(f"{workdir}.p{i}.log", "w")  # pylint: disable=consider-using-with
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env or _env(2), stdout=subprocess.DEVNULL, stderr=log))
    log.close()
  return procs


def _finish(workdir, procs, timeout=300):
  """(return codes, stderr texts) once every process has ended."""
  codes = [p.wait(timeout=timeout) for p in procs]
  return codes, [open(f"{workdir}.p{i}.log").read() for i in range(len(procs))]


def _two_processes(workdir, data_dir, *extra, env=None):
  return _finish(workdir, _start(workdir, data_dir, *extra, env=env))


@pytest.fixture(scope="module")
def two_process_run(data_dir, tmp_path_factory):
  base = tmp_path_factory.mktemp("two")
  workdir, reads = base / "run", base / "reads"
  codes, logs = _two_processes(workdir, data_dir, env=_env(2, MELANOMA_JAX_READ_LOG=str(reads)))
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


def test_each_training_image_is_read_by_one_process_per_epoch(two_process_run, data_dir):
  reads = two_process_run[1]
  train = set(pd.read_csv(os.path.join(data_dir, "train.csv"))["image_name"]) - _validation_names(data_dir)
  for epoch in range(2):
    read = [set((reads / f"reads.epoch{epoch}.process{p}.txt").read_text().split()) for p in range(2)]
    assert read[0] and read[1] and not read[0] & read[1]
    assert read[0] | read[1] <= train
    assert (reads / f"reads.epoch{epoch}.process0.txt").read_text().count("\n") == 3 * 4  # Steps x local batch.


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
