"""Progress lines (steps/s, images/s, ETA) and TensorBoard summaries of a run."""
import time

from absl import logging

from melanoma_jax.training import distributed
from melanoma_jax.utils.tf_host import tf


def format_seconds(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Throughput of training steps only: the first (compiling) step and evaluation pauses are left out."""

  def __init__(self, total_steps, start_step, images_per_step):
    self.total_steps = total_steps
    self.images_per_step = images_per_step
    self._start_step = start_step
    self._last = None  # Time of the previous step in the current stretch of training.
    self._compiled = False
    self.timed_steps = 0
    self.timed_seconds = 0.0

  def resume(self):
    """Call when training (re)starts after an evaluation: the pause is not counted."""
    self._last = time.time() if self._compiled else None

  def step_done(self):
    now = time.time()
    if self._compiled and self._last is not None:
      self.timed_steps += 1
      self.timed_seconds += now - self._last
    self._compiled = True
    self._last = now

  @property
  def steps_per_sec(self):
    return self.timed_steps / self.timed_seconds if self.timed_seconds > 0 else float("nan")

  @property
  def images_per_sec(self):
    return self.steps_per_sec * self.images_per_step

  def line(self, epoch, num_epochs, step, loss, label=""):
    rate = self.steps_per_sec
    eta = (self.total_steps - step) / rate if rate == rate and rate > 0 else float("nan")
    eta_text = format_seconds(eta) if eta == eta else "?"
    return (f"{label + ' ' if label else ''}epoch {epoch + 1}/{num_epochs} step {step}/{self.total_steps} "
            f"loss {loss:.4f} {rate:.2f} steps/s {self.images_per_sec:.1f} images/s ETA {eta_text}")

  def report(self, *args, **kwargs):
    logging.info(self.line(*args, **kwargs))


class Summaries:
  """TensorBoard scalars under WORKDIR/tensorboard (written with TensorFlow's summary writer on the host).

  In a multi-process run only process 0 writes (every process computes the same global figures).
  """

  def __init__(self, logdir):
    self._writer = tf().summary.create_file_writer(logdir) if distributed.is_primary() else None

  def scalars(self, step, values):
    if self._writer is None:
      return
    with self._writer.as_default():
      for name, value in values.items():
        tf().summary.scalar(name, float(value), step=int(step))
    self._writer.flush()

  def close(self):
    if self._writer is not None:
      self._writer.close()
