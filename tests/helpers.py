"""What several test modules share: the repository root, and commands run in a fresh Python process.

A fresh process keeps what a command imports and allocates (TensorFlow, Keras, tf2onnx, ONNX Runtime, compiled
networks) out of the pytest process, which runs every test module of `make test` in turn; the subprocess's
memory is returned when it exits.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 8 emulated CPU devices, as tests/conftest.py gives the pytest process; the repository importable from tests/.
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
           TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))


def python(*args, timeout=300, env=None):
  """`python ARGS` in the repository root with ENV (plus `env`): the CompletedProcess, output as text."""
  return subprocess.run([sys.executable, *args], cwd=REPO, env=dict(ENV, **(env or {})), capture_output=True,
                        text=True, timeout=timeout)


def train_tiny(workdir, *flags, image_size=75, batch=2, epochs=1, patients=12, timeout=300):
  """main.py trains the tiny model into `workdir` on `patients` patients' synthetic lesions (`batch` images per
  device, `epochs` epochs); `flags`: more config flags. Asserts that it succeeded; returns `workdir`."""
  proc = python("main.py", "--config=configs/demo.py", f"--workdir={workdir}", "--config.model.name=tiny",
                f"--config.image_size={image_size}", f"--config.per_device_batch_size={batch}",
                f"--config.num_epochs={epochs}", f"--config.synthetic.num_patients={patients}",
                "--config.log_every_steps=100", "--jax_cache_dir=", *flags, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir
