"""orbax checkpoints of a run: the latest few (for resuming) and the best (for prediction), in one manager.

Layout: DIR/<step>/{state,meta}. Every save records the monitored metric with the step, and orbax keeps
the newest `max_to_keep` steps plus the one with the best metric (`AnyPreservationPolicy`). Because "best"
is chosen from the saved steps' own metrics, the latest and the best can never disagree: a run killed at
any moment holds only complete steps (orbax finalises a step atomically) and the best among them.

Several processes: every process makes the same calls (orbax synchronises them; process 0 writes the
host copy of the state, which every process holds whole, on a filesystem all of them share). A state is
restored whole into every process's first local device, so a checkpoint written by any number of
processes and devices restores in a run with any other number.
"""
import os

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from melanoma_jax.utils.errors import InputError

_NO_METRIC = float("-inf")


def abstract_of(state):
  """The shape/dtype skeleton of a state, placed whole on this process's first device: restoring into it
  never depends on the devices the checkpoint was written from."""
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])

  def placed(leaf):
    leaf = ocp.utils.to_shape_dtype_struct(leaf)
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device) if hasattr(leaf, "shape") else leaf

  return jax.tree.map(placed, state)


def _rank(metrics, monitor):
  # The highest metric wins; among equal metrics the earliest step, so a tie never replaces the best.
  return (metrics.get(monitor, _NO_METRIC), -metrics.get("step", 0))


class Checkpointer:
  """Keeps `max_to_keep` latest checkpoints and the one with the highest `monitor` metric."""

  def __init__(self, directory, monitor="val_auc", max_to_keep=3):
    self.directory = os.path.abspath(directory)
    self.monitor = monitor
    rank = lambda metrics: _rank(metrics, monitor)
    policy = checkpoint_managers.AnyPreservationPolicy([
        checkpoint_managers.LatestN(n=max(1, int(max_to_keep))),
        checkpoint_managers.BestN(get_metric_fn=rank, n=1, keep_checkpoints_without_metrics=False)])
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=rank, best_mode="max",
                                           create=True, enable_async_checkpointing=False)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def save(self, step, state, meta, metric):
    """Saves `state` (unreplicated arrays) and a JSON-able `meta` dict at `step`, ranked by `metric`."""
    self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                     meta=ocp.args.JsonSave(meta)),
                       metrics={self.monitor: float(metric), "step": int(step)}, force=True)

  def latest_step(self):
    return self._manager.latest_step()

  def best_step(self):
    return self._manager.best_step()

  def read_meta(self, step):
    """The JSON metadata saved with `step`, without reading the state."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def step_dir(self, step):
    """The folder of checkpoint `step` (for messages)."""
    return os.path.join(self.directory, str(step))

  def _restore(self, step, args):
    try:
      return self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:  # Orbax's words for a tree of other names or shapes.
      first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
      raise InputError(f"{self.step_dir(step)}: does not hold the variables of the model being restored "
                       f"({first}); it was saved by another model") from None

  def restore(self, step, abstract_state):
    """(state, meta) saved at `step`, restored into the structure of `abstract_state`; InputError when the
    checkpoint holds another tree."""
    restored = self._restore(step, ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_of(abstract_state)), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_part(self, step, abstract_part):
    """(part, meta) of `step`: only the fields of the saved state that `abstract_part` names (a dict of
    some of the state's fields, e.g. {"params": ..., "batch_stats": ...}); the rest is never read, so a
    model's variables load without building its optimizer."""
    restored = self._restore(step, ocp.args.Composite(
        state=ocp.args.PyTreeRestore(item=abstract_of(abstract_part), partial_restore=True,
                                     restore_args=ocp.checkpoint_utils.construct_restore_args(
                                         abstract_of(abstract_part))),
        meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state):
    """(state, meta) of the newest complete checkpoint, or None."""
    step = self.latest_step()
    return None if step is None else self.restore(step, abstract_state)

  def restore_best(self, abstract_state):
    """(state, meta) of the best checkpoint, or None."""
    step = self.best_step()
    return None if step is None else self.restore(step, abstract_state)

  def close(self):
    self._manager.close()
