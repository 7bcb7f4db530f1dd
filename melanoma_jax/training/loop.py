"""The epoch loop both tasks train with: steps, evaluation hook, checkpoints, early stopping, NaN stop.

`fit` resumes from the latest checkpoint of its `Checkpointer`, trains epoch by epoch, evaluates after
each one, saves a checkpoint ranked by the monitored metric (the checkpointer keeps the latest few and
the best) and stops early after `patience` epochs without a better metric. A non-finite loss or
prediction stops the run with `NonFiniteLossError`, keeping the last good checkpoint. Progress lines
(steps/s, images/s, ETA) go to the log and scalars to TensorBoard.
"""
import dataclasses
import math
import time
from typing import Any, Callable, Iterable, Optional

import jax
import numpy as np
from absl import logging

from melanoma_jax.training import reporting, steps
from melanoma_jax.utils.errors import NonFiniteLossError


@dataclasses.dataclass(frozen=True)
class Plan:
  """How long and how a model trains; plain values resolved from a config."""
  num_epochs: int
  steps_per_epoch: int
  global_batch: int
  log_every_steps: int = 0  # 0: one progress line per epoch.
  monitor: str = "val_auc"  # Maximised; `evaluate` must return it.
  patience: int = 0  # Epochs without a better metric before stopping; 0: never stop early.
  first_candidate_epoch: int = 1  # Earlier epochs are never the best and spend no patience.
  label: str = ""  # Names the model in progress lines and errors, e.g. "fold 2".


@dataclasses.dataclass
class Fitted:
  state: Any  # The latest state, on the devices.
  meta: dict  # epoch, history, best_epoch, best, stopped_early, train_images, train_seconds, ...
  images_per_sec: float  # Of this call's timed steps (nan when it trained none).


def best_of(history, plan):
  """(best epoch, its metric, epochs since it) among the candidate epochs of `history`."""
  best_epoch, best, since = 0, -math.inf, 0
  for entry in history:
    if entry["epoch"] < plan.first_candidate_epoch:
      continue
    if entry[plan.monitor] > best:
      best_epoch, best, since = entry["epoch"], entry[plan.monitor], 0
    else:
      since += 1
  return best_epoch, best, since


def is_finished(meta, num_epochs):
  """Whether a run whose latest checkpoint carries `meta` has trained all `num_epochs` or stopped early."""
  return meta["epoch"] >= num_epochs or meta.get("stopped_early", False)


def finished_meta(checkpointer, num_epochs):
  """The meta of the latest checkpoint when the run is finished (`is_finished`), else None: a caller can
  skip building the state and the loop altogether."""
  latest = checkpointer.latest_step()
  meta = checkpointer.read_meta(latest) if latest is not None else None
  return meta if meta is not None and is_finished(meta, num_epochs) else None


def _prefix(plan):
  return f"{plan.label}: " if plan.label else ""


def fit(state, plan: Plan, checkpointer, summaries, *, train_step: Callable[[int], Callable],
        batches: Callable[[int], Iterable], evaluate: Callable[[Any], dict],
        learning_rate: Optional[Callable[[int], Any]] = None, meta: Optional[dict] = None) -> Fitted:
  """Trains (or resumes) `state` per `plan`.

  Args:
    state: the initial (unreplicated) state; also the structure a checkpoint is restored into.
    plan: epochs, steps, batch size, logging, early stopping.
    checkpointer: a `Checkpointer` ranking by `plan.monitor`.
    summaries: a `reporting.Summaries` (TensorBoard).
    train_step: epoch -> the pmapped train step for that epoch (e.g. a frozen-backbone one first).
    batches: epoch -> (sharded batch, extra) items of that epoch's `plan.steps_per_epoch` steps.
    evaluate: state -> {metric: float} after each epoch; must hold `plan.monitor`.
    learning_rate: step -> learning rate, for TensorBoard.
    meta: extra JSON-able facts saved with every checkpoint (e.g. a fold's preprocessing).
  """
  meta = {"epoch": 0, "history": [], "best_epoch": 0, "best": None, "stopped_early": False,
          "train_images": 0, "train_seconds": 0.0, **(meta or {})}
  restored = checkpointer.restore_latest(state)
  if restored is not None:
    state, meta = restored
    logging.info("%sresumed from %s at epoch %d (step %d)", _prefix(plan), checkpointer.directory,
                 meta["epoch"], int(state.step))
  if is_finished(meta, plan.num_epochs):
    logging.info("%straining already finished (%d epochs%s)", _prefix(plan), meta["epoch"],
                 ", stopped early" if meta.get("stopped_early") else "")
  state = steps.replicate(state)
  step = int(state.step)  # Counted on the host: reading state.step would sync with the devices every step.
  progress = reporting.Progress(plan.steps_per_epoch * plan.num_epochs, step, plan.global_batch)
  log_every = plan.log_every_steps if plan.log_every_steps > 0 else plan.steps_per_epoch
  while not is_finished(meta, plan.num_epochs):
    epoch = int(meta["epoch"])
    p_step = train_step(epoch)
    pending = []  # (step, loss) device scalars fetched every log_every steps: no host sync per step.
    rows = 0  # Unmasked examples trained on this epoch, summed on the devices.
    epoch_start = time.time()
    epoch_end = step + plan.steps_per_epoch
    progress.resume()
    for batch, _ in steps.prefetch_to_device(batches(epoch)):
      state, step_metrics = p_step(state, batch)
      step += 1
      pending.append((step, step_metrics["loss"]))
      rows = rows + step_metrics["count"]
      if progress.timed_steps == 0:  # Start the clock once the first step has compiled and run.
        jax.block_until_ready(step_metrics["loss"])
      progress.step_done()
      if len(pending) >= log_every or step == epoch_end:
        losses = _finite_losses(pending, epoch, plan, checkpointer)
        progress.report(epoch, plan.num_epochs, step, losses[-1], label=plan.label)
        scalars = {"train/loss": float(np.mean(losses)), "train/images_per_sec": progress.images_per_sec}
        if learning_rate is not None:
          scalars["train/learning_rate"] = float(learning_rate(step))
        summaries.scalars(step, scalars)
        pending = []
    if step != epoch_end:
      raise RuntimeError(f"{_prefix(plan)}epoch {epoch + 1} ran {step - epoch_end + plan.steps_per_epoch} "
                         f"steps, not {plan.steps_per_epoch}")
    meta["train_images"] += plan.steps_per_epoch * plan.global_batch
    meta["train_seconds"] += time.time() - epoch_start
    metrics = _evaluate(evaluate, state, epoch, plan)
    meta["epoch"] = epoch + 1
    meta["history"] = meta["history"] + [dict(epoch=epoch + 1, train_rows=int(round(float(rows))), **metrics)]
    best_epoch, best, since = best_of(meta["history"], plan)
    meta.update(best_epoch=best_epoch, best=None if best_epoch == 0 else best)
    meta["stopped_early"] = bool(plan.patience and best_epoch and since >= plan.patience)
    candidate = epoch + 1 >= plan.first_candidate_epoch
    checkpointer.save(step, jax.device_get(state), meta, metrics[plan.monitor] if candidate else -math.inf)
    summaries.scalars(step, {f"val/{k.removeprefix('val_')}": v for k, v in metrics.items()})
    logging.info("%sepoch %d/%d: %s (best %s at epoch %d)%s", _prefix(plan), epoch + 1, plan.num_epochs,
                 " ".join(f"{k} {v:.4f}" for k, v in metrics.items()),
                 "-" if meta["best"] is None else f"{meta['best']:.4f}", best_epoch,
                 "; stopping early" if meta["stopped_early"] else "")
  return Fitted(state, meta, progress.images_per_sec)


def _evaluate(evaluate, state, epoch, plan):
  try:
    metrics = {k: float(v) for k, v in evaluate(state).items()}
  except NonFiniteLossError as e:
    raise NonFiniteLossError(f"{_prefix(plan)}epoch {epoch + 1}: {e}") from None
  if not all(math.isfinite(v) for v in metrics.values()):
    raise NonFiniteLossError(f"{_prefix(plan)}epoch {epoch + 1}: validation metrics {metrics} are not finite")
  return metrics


def _finite_losses(pending, epoch, plan, checkpointer):
  values = [float(v) for _, v in pending]
  for (step, _), value in zip(pending, values):
    if not math.isfinite(value):
      last = checkpointer.latest_step()
      raise NonFiniteLossError(
          f"{_prefix(plan)}epoch {epoch + 1}: loss became {value} at step {step}; stopped. The last good "
          f"checkpoint ({'step ' + str(last) if last is not None else 'none yet'}) is kept in "
          f"{checkpointer.directory}")
  return values
