"""Bad input through main.py ends with one `error:` line naming what is wrong, exit status 1, no traceback."""
import glob
import os
import shutil
import subprocess
import sys

import pandas as pd
import pytest

from melanoma_jax.data import synthetic
from melanoma_jax.utils.tf_host import tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CSV = os.path.join(REPO, "melanoma_jax", "data", "siim_isic_2020", "train.csv")
TEST_CSV = os.path.join(REPO, "melanoma_jax", "data", "siim_isic_2020", "test.csv")


def _main(config, workdir, *extra):
  cmd = [sys.executable, "main.py", f"--config=configs/{config}.py", f"--workdir={workdir}", "--jax_cache_dir=",
         *extra]
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _assert_one_line_error(proc, expected):
  assert proc.returncode == 1, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, last
  assert "Traceback" not in proc.stderr


@pytest.fixture(scope="module")
def tables_with_an_implausible_age(tmp_path_factory):
  root = tmp_path_factory.mktemp("ages")
  train = pd.read_csv(TRAIN_CSV).head(300)
  train.loc[7, "age_approx"] = -5
  train.to_csv(root / "train.csv", index=False)
  shutil.copy(TEST_CSV, root / "test.csv")
  return root


@pytest.mark.parametrize("config, extra, expected", [
    ("demo", ["--config.no_such_field=1"], "--config.no_such_field: no such config field"),
    ("demo", ["--config.model.no_such_field=1"], "--config.model.no_such_field: no such config field"),
    ("demo", ["--config.global_batch_size=-1"], "config.global_batch_size=-1 must be >= 0"),
    ("tabular", ["--config.global_batch_size=-1"], "config.global_batch_size=-1 must be >= 0"),
])
def test_bad_config_values(config, extra, expected, tmp_path):
  _assert_one_line_error(_main(config, tmp_path / "w", *extra), expected)


def test_implausible_ages_are_refused(tables_with_an_implausible_age, tmp_path):
  proc = _main("tabular", tmp_path / "w", f"--config.data_dir={tables_with_an_implausible_age}")
  _assert_one_line_error(proc, "train.csv: column age_approx has implausible value -5 at line 9 (ages must be "
                               "0-120; 1 such row(s))")


@pytest.mark.parametrize("change, expected", [
    ("drop", "record 3 has no 'image_name' feature"),
    ("int64", "record 3's 'image_name' feature must be one bytes value"),
])
def test_records_without_a_usable_image_name_are_named(change, expected, tmp_path):
  data_dir = tmp_path / "data"
  synthetic.generate_dataset(str(data_dir), num_patients=24, image_size=75, seed=0)
  shard = sorted(glob.glob(str(data_dir / "train*.tfrec")))[0]
  tf_ = tf()
  examples = [tf_.train.Example.FromString(r.numpy()) for r in tf_.data.TFRecordDataset(shard)]
  feature = examples[3].features.feature
  if change == "drop":
    del feature["image_name"]
  else:
    feature["image_name"].CopyFrom(tf_.train.Feature(int64_list=tf_.train.Int64List(value=[7])))
  with tf_.io.TFRecordWriter(shard) as writer:
    for example in examples:
      writer.write(example.SerializeToString())
  proc = _main("demo", tmp_path / "w", f"--config.data_dir={data_dir}", "--config.model.name=tiny",
               "--config.per_device_batch_size=2", "--config.num_epochs=1")
  _assert_one_line_error(proc, f"{shard}: {expected}")


def test_weights_blown_up_on_an_epochs_last_step_end_in_one_line(tmp_path):
  """The loss of the epoch's last step is finite, but its update (an infinite learning rate) makes the
  weights NaN: the validation pass then predicts NaN, which ends the run with exit 3 and the epoch named,
  not an AUC traceback."""
  data_dir = tmp_path / "data"
  synthetic.generate_dataset(str(data_dir), num_patients=24, image_size=75, seed=0)
  proc = _main("demo", tmp_path / "w", f"--config.data_dir={data_dir}", "--config.model.name=tiny",
               "--config.per_device_batch_size=2", "--config.num_epochs=1", "--config.max_steps_per_epoch=1",
               "--config.optimizer.lr_max=inf", "--config.optimizer.lr_min=inf",
               "--config.freeze_backbone_epochs=0")
  assert proc.returncode == 3, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: epoch 1: the validation fold: ") and "are NaN or inf" in last, last
  assert "Traceback" not in proc.stderr
