"""Progress lines (steps/s, images/s, ETA) and TensorBoard summaries of a run."""
import time

from absl import logging

from melanoma_jax.utils.tf_host import tf


def format_seconds(seconds):
  seconds = int(max(seconds, 0))
  return f"{seconds // 3600:d}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class Progress:
  """Measures throughput after the first (compiling) step and prints one line per report."""

  def __init__(self, total_steps, start_step, images_per_step):
    self.total_steps = total_steps
    self.images_per_step = images_per_step
    self._start_step = start_step
    self._timed_from = None  # (step, time) once the first step has compiled.
    self.timed_steps = 0
    self.timed_seconds = 0.0

  def step_done(self, step):
    now = time.time()
    if self._timed_from is None:
      self._timed_from = (step, now)
      return
    self.timed_steps = step - self._timed_from[0]
    self.timed_seconds = now - self._timed_from[1]

  @property
  def steps_per_sec(self):
    return self.timed_steps / self.timed_seconds if self.timed_seconds > 0 else float("nan")

  @property
  def images_per_sec(self):
    return self.steps_per_sec * self.images_per_step

  def line(self, epoch, num_epochs, step, loss):
    rate = self.steps_per_sec
    eta = (self.total_steps - step) / rate if rate == rate and rate > 0 else float("nan")
    eta_text = format_seconds(eta) if eta == eta else "?"
    return (f"epoch {epoch + 1}/{num_epochs} step {step}/{self.total_steps} loss {loss:.4f} "
            f"{rate:.2f} steps/s {self.images_per_sec:.1f} images/s ETA {eta_text}")

  def report(self, *args):
    logging.info(self.line(*args))


class Summaries:
  """TensorBoard scalars under WORKDIR/tensorboard (written with TensorFlow's summary writer on the host)."""

  def __init__(self, logdir):
    self._writer = tf().summary.create_file_writer(logdir)

  def scalars(self, step, values):
    with self._writer.as_default():
      for name, value in values.items():
        tf().summary.scalar(name, float(value), step=int(step))
    self._writer.flush()

  def close(self):
    self._writer.close()
