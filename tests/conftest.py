"""Test set-up: 8 emulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

# Keras reads KERAS_HOME once, at import: an empty one keeps tests off the user's ~/.keras cache.
os.environ["KERAS_HOME"] = tempfile.mkdtemp(prefix="melanoma_jax_keras_home_")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_CSV = REPO / "melanoma_jax" / "data" / "siim_isic_2020" / "train.csv"
TEST_CSV = REPO / "melanoma_jax" / "data" / "siim_isic_2020" / "test.csv"


@pytest.fixture(scope="session")
def real_train_csv():
    return TRAIN_CSV


@pytest.fixture(scope="session")
def real_test_csv():
    return TEST_CSV


@pytest.fixture(scope="session")
def ensemble_run(tmp_path_factory):
    """A tiny ensemble trained once through main.py (2 folds, 30 patients, 32 px): (workdir, command, env).
    Session-wide: test_ensemble.py and the model server's tests (test_serve.py) share its minute of training."""
    workdir = tmp_path_factory.mktemp("ensemble") / "ens"
    command = [sys.executable, str(REPO / "main.py"), "--config=" + str(REPO / "configs" / "ensemble_demo.py"),
               f"--workdir={workdir}", "--jax_cache_dir=", "--config.model.name=tiny", "--config.num_folds=2",
               "--config.num_epochs=1", "--config.freeze_backbone_epochs=0", "--config.synthetic.num_patients=30",
               "--config.synthetic.image_size=32", "--config.ensemble.families=('logistic',)"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # One device: as users run it.
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    return workdir, command, env
