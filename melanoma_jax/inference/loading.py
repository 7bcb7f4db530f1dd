"""A trained workdir -> a `Predictor`: the run's best checkpoint and the settings its evaluation used.

The config comes from the workdir itself, so no --config is needed: WORKDIR/run.json (written before the
first checkpoint, so present whenever there is one to load) is authoritative for every field that defines the
model; results.json (written when training finishes) adds the prediction-time fields run.json leaves out
(`identity.MAY_CHANGE`, notably `tta`). Without results.json the prediction-time fields take fixed values
(`_PREDICTION_DEFAULTS`: no TTA) unless the caller overrides them.

`load_predictor(workdir)` is the one entry point: it recognises the kind of workdir and returns an object with
the `Predictor` interface: a single image run's `Predictor` (`_load_run`), or for an ensemble workdir an
`inference.ensemble.EnsemblePredictor` (its fold models averaged, the metadata fused with its fitted stages).
"""
import dataclasses
import json
import os
from typing import Any, Optional

import jax
import ml_collections
import numpy as np
from absl import logging

from melanoma_jax.image import setup
from melanoma_jax.image import task as image_task
from melanoma_jax.training import identity
from melanoma_jax.training import predict as predict_lib
from melanoma_jax.training import state as state_lib
from melanoma_jax.training import steps
from melanoma_jax.utils.errors import InputError

RESULTS = "results.json"
# Fields run.json leaves out, as prediction uses them when results.json does not say (a run that never
# finished): they change how values are computed or logged, not the model.
_PREDICTION_DEFAULTS = {"num_epochs": 1, "log_every_steps": 1, "checkpoints_to_keep": 1, "tta": False,
                        "skip_corrupt": False, "calibrate": False, "model.remat": False,
                        "model.kernels": "auto"}


@dataclasses.dataclass
class Predictor:
  """One model's predictions on model inputs, batched over all local devices as the run's evaluation.

  `predict(x)`: float32 [N, S, S, 3] in [-1, 1] -> float64 [N] probabilities (the mean over the image and its
  two flips when `tta`), through the run's own pmapped `steps.make_predict_step`. `metadata` is for predictors
  that fuse tabular data (ensembles); this one refuses it (as does `read_metadata`). `embed(x)` gives the
  probabilities with the pooled backbone embeddings, through the step the ensemble scores its images with.
  `model` and `variables` are exposed for saliency and export (inference mode: BatchNorm uses the stored
  statistics); `step` is the checkpoint's training step.
  """
  model: Any
  variables: dict
  image_size: int
  tta: bool
  global_batch: int
  description: str = ""
  step: int = -1

  def __post_init__(self):
    self._step = steps.p_predict(steps.make_predict_step(self.model, tta=self.tta))
    self._embed_step = None  # Compiled on first use: only ensembles need it.
    self._state = steps.replicate(ModelWeights(self.variables["params"],
                                                  self.variables.get("batch_stats", {})))

  def read_metadata(self, path):
    raise InputError("--metadata is only used by ensemble workdirs; this workdir holds a single image model")

  def predict(self, images, metadata=None):
    if metadata is not None:
      self.read_metadata(metadata)
    images = np.asarray(images, np.float32)
    if len(images) == 0:
      return np.zeros(0)
    return predict_lib.run(self._step, self._state,
                           predict_lib.array_batches(images, self.global_batch), "predictions")["outputs"]

  def embed(self, images):
    """(float64 [N] probabilities, float32 [N, F] embeddings), as ensemble/embed.py scores its images."""
    images = np.asarray(images, np.float32)
    if self._embed_step is None:
      self._embed_step = steps.p_predict(steps.make_predict_step(self.model, tta=self.tta, embeddings=True))
    if len(images) == 0:
      return np.zeros(0), np.zeros((0, 0), np.float32)
    out = predict_lib.run(self._embed_step, self._state, predict_lib.array_batches(images, self.global_batch),
                          "embeddings")["outputs"]
    return out[:, 0], out[:, 1:].astype(np.float32)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelWeights:
  """What the predict step (`state_lib.model_variables`) reads of a TrainState, without the optimizer."""
  params: Any
  batch_stats: Any


def _read_json(path):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path}: unreadable ({e})") from None


def _set(tree, dotted, value):
  *parents, leaf = dotted.split(".")
  for parent in parents:
    tree = tree.setdefault(parent, {})
  tree[leaf] = value


def _has(tree, dotted):
  for part in dotted.split("."):
    if not isinstance(tree, dict) or part not in tree:
      return False
    tree = tree[part]
  return True


def recorded_config(workdir, overrides: Optional[dict] = None) -> ml_collections.ConfigDict:
  """The config of the run in `workdir`: results.json's full config, then run.json's identity fields over it
  (then `_PREDICTION_DEFAULTS` for fields neither holds, then `overrides`, {dotted name: value})."""
  run_path, results_path = os.path.join(workdir, identity.RECORD), os.path.join(workdir, RESULTS)
  if not os.path.isdir(workdir):
    raise InputError(f"{workdir}: workdir not found")
  if not os.path.exists(run_path) and not os.path.exists(results_path):
    raise InputError(f"{workdir}: not a training run (neither {identity.RECORD} nor {RESULTS}); "
                     "train with main.py first")
  tree = _read_json(results_path).get("config", {}) if os.path.exists(results_path) else {}
  for field, value in (_read_json(run_path) if os.path.exists(run_path) else {}).items():
    if not field.startswith("data."):  # data.csv_sha256: the data's hash, not a config field.
      _set(tree, field, value)
  for field, value in _PREDICTION_DEFAULTS.items():
    if not _has(tree, field):
      _set(tree, field, value)
  for field, value in (overrides or {}).items():
    _set(tree, field, value)
  return ml_collections.ConfigDict(tree)


def task_of(workdir):
  """The task the workdir's run recorded ("image", "ensemble", "tabular"); InputError if it holds no run."""
  return recorded_config(workdir).get("task", "image")


def load_predictor(workdir, tta: Optional[bool] = None):
  """The predictor of `workdir` (`tta` None: the run's own setting): a `Predictor`, or an
  `inference.ensemble.EnsemblePredictor` for an ensemble workdir. Refuses what it cannot load with one line
  (no run, another task, no checkpoint, a config this code cannot resolve)."""
  task = task_of(workdir)
  if task == "ensemble":
    from melanoma_jax.inference import ensemble  # pylint: disable=g-import-not-at-top
    return ensemble.load(workdir, tta)
  if task != "image":
    raise InputError(f"{workdir}: a {task} run; prediction from image files needs an image run")
  return _load_run(workdir, tta)


def _load_run(workdir, tta):
  config = recorded_config(workdir, None if tta is None else {"tta": bool(tta)})
  # Prediction batches fill this machine's devices, whatever split of the global batch training used.
  config.global_batch_size = 0
  try:
    run = setup.resolve(config)
  except (AttributeError, KeyError) as e:
    raise InputError(f"{workdir}: the recorded config lacks {e}; it was made by another version") from None
  model = run.build_model()
  state, meta = image_task.restore_best(run, model, config.optimizer, workdir)
  description = (f"{run.model_name} {run.image_size}x{run.image_size}, best checkpoint of epoch "
                 f"{meta['epoch']} (step {int(state.step)}){', flip TTA' if run.tta else ''}")
  logging.info("%s: %s", workdir, description)
  return Predictor(model=model, variables=state_lib.model_variables(state), image_size=run.image_size,
                   tta=run.tta, global_batch=run.global_batch, description=description, step=int(state.step))
