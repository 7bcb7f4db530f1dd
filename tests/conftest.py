"""Test set-up: 8 emulated CPU devices, set before JAX is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pathlib  # noqa: E402
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
