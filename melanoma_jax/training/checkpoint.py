"""orbax checkpoints: the latest few (for resuming) and the best (for prediction), each with JSON metadata.

Layout: DIR/latest/<step>/{state,meta} and DIR/best/<step>/{state,meta}. Saves are synchronous and orbax
finalises a step atomically, so a run killed at any moment resumes from the last complete checkpoint.
"""
import os

import jax
import orbax.checkpoint as ocp


def abstract_of(state):
  """The shape/dtype skeleton of a state, for restoring into the same structure."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, state)


class Checkpointer:
  """Keeps `max_to_keep` latest checkpoints and the single best one."""

  def __init__(self, directory, max_to_keep=3):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                           enable_async_checkpointing=False)
    self._latest = ocp.CheckpointManager(os.path.join(self.directory, "latest"), options=options)
    best_options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True,
                                                enable_async_checkpointing=False)
    self._best = ocp.CheckpointManager(os.path.join(self.directory, "best"), options=best_options)

  @staticmethod
  def _save_args(state, meta):
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))

  def save(self, step, state, meta, is_best=False):
    """Saves `state` (unreplicated arrays) and a JSON-able `meta` dict at `step`."""
    self._latest.save(step, args=self._save_args(state, meta), force=True)
    if is_best:
      self._best.save(step, args=self._save_args(state, meta), force=True)

  @staticmethod
  def _restore(manager, abstract_state):
    step = manager.latest_step()
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_of(abstract_state)), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def restore_latest(self, abstract_state):
    """(state, meta) of the newest complete checkpoint, or None."""
    return self._restore(self._latest, abstract_state)

  def restore_best(self, abstract_state):
    """(state, meta) of the best checkpoint, or None."""
    return self._restore(self._best, abstract_state)

  def latest_step(self):
    return self._latest.latest_step()

  def close(self):
    self._latest.close()
    self._best.close()
