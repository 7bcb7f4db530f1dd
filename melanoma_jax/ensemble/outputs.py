"""One fold model's outputs for the ensemble: probability + pooled backbone embedding of every image it
must score, its validation fold (out of fold: the model never saw these patients) and the whole test set.

The fold's best checkpoint is restored with `image.task.restore_best`, and the images go through the
same tf.data pipeline and `training.predict.run`, with `steps.make_predict_step(..., embeddings=True)`.
The outputs are kept in FOLD_DIR/ensemble_outputs.npz with the checkpoint step they came from, so a rerun
reuses them unless the fold's best checkpoint changed.
"""
import dataclasses
import os

import numpy as np
from absl import logging

from melanoma_jax.image import data as data_lib
from melanoma_jax.image import setup
from melanoma_jax.image import task as image_task
from melanoma_jax.training import checkpoint as checkpoint_lib
from melanoma_jax.training import distributed
from melanoma_jax.training import steps
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

OUTPUTS_FILE = "ensemble_outputs.npz"


@dataclasses.dataclass(frozen=True)
class FoldOutputs:
  """A fold model's outputs: names in the order scored, probabilities [rows], embeddings [rows, F]."""
  fold: int
  val_names: np.ndarray
  val_probs: np.ndarray
  val_embeddings: np.ndarray
  test_names: np.ndarray
  test_probs: np.ndarray
  test_embeddings: np.ndarray
  step: int = -1  # The best checkpoint step the outputs came from (-1: not from a checkpoint).


def _load(path, fold, step):
  try:
    with np.load(path, allow_pickle=False) as saved:
      if int(saved["step"]) != step:
        return None
      return FoldOutputs(fold, *(saved[k] for k in ("val_names", "val_probs", "val_embeddings", "test_names",
                                                    "test_probs", "test_embeddings")), step=step)
  except (OSError, KeyError, ValueError):
    return None


def fold_outputs(fold_config, fold_dir):
  """FoldOutputs of the fold run in `fold_dir` (trained by image.task.train with `fold_config`)."""
  run = setup.resolve(fold_config)
  checkpointer = checkpoint_lib.Checkpointer(os.path.join(fold_dir, "checkpoints"), monitor="val_auc",
                                             max_to_keep=run.checkpoints_to_keep)
  try:
    step = checkpointer.best_step()
  finally:
    checkpointer.close()
  if step is None:
    raise InputError(f"{checkpointer.directory}: no best checkpoint to embed with (train the fold first)")
  path = os.path.join(fold_dir, OUTPUTS_FILE)
  cached = _load(path, run.fold, step)
  if cached is not None:
    logging.info("fold %d: reusing %s (best checkpoint step %d)", run.fold, path, step)
    return cached
  data = data_lib.resolve_data(run, fold_dir)
  split = data_lib.make_split(run, data)
  pipeline = data_lib.make_pipeline(run, data, split)
  model = run.build_model()
  state, _ = image_task.restore_best(run, model, fold_config.optimizer, fold_dir)
  state = steps.replicate(state)
  p_predict = steps.p_predict(steps.make_predict_step(model, tta=run.tta, embeddings=True))
  val_names, _, val_out = image_task.infer(p_predict, state, pipeline, pipeline.val_dataset(), data.train_files,
                                           list(split.val_df["image_name"]), f"fold {run.fold} validation fold")
  test_table = list(data.test_df["image_name"])
  test_names, _, test_out = image_task.infer(p_predict, state, pipeline,
                                             pipeline.test_dataset(len(test_table), test_table), data.test_files,
                                             test_table, "test.csv")
  outputs = FoldOutputs(run.fold, np.asarray(val_names, str), val_out[:, 0], val_out[:, 1:].astype(np.float32),
                        np.asarray(test_names, str), test_out[:, 0], test_out[:, 1:].astype(np.float32), step)
  if distributed.is_primary():  # Every process holds the same gathered outputs.
    with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
      np.savez(f, **{k: v for k, v in dataclasses.asdict(outputs).items() if k != "fold"})
  logging.info("fold %d: embedded %d validation and %d test images (%d features) with checkpoint step %d",
               run.fold, len(val_names), len(test_names), outputs.val_embeddings.shape[1], step)
  return outputs


def place_out_of_fold(train_names, fold_ids, per_fold):
  """(probabilities [rows], embeddings [rows, F], source fold [rows]) in train.csv order.

  Every training image's outputs come from the one fold model whose validation fold holds it (the model
  that never saw its patient); refuses a name scored by no fold model, by two, or by a model whose
  validation fold it is not in.
  """
  index = {name: i for i, name in enumerate(train_names)}
  fold_ids = np.asarray(fold_ids)
  dims = per_fold[0].val_embeddings.shape[1]
  probs, embeddings = np.full(len(train_names), np.nan), np.zeros((len(train_names), dims), np.float32)
  source = np.full(len(train_names), -1)
  for out in per_fold:
    rows = np.array([index.get(n, -1) for n in out.val_names])
    if (rows < 0).any() or (fold_ids[rows] != out.fold).any() or (source[rows] >= 0).any():
      raise InputError(f"fold {out.fold}: its validation images are not exactly the training rows of fold "
                       f"{out.fold} (unknown, misplaced or repeated names)")
    probs[rows], embeddings[rows], source[rows] = out.val_probs, out.val_embeddings, out.fold
  if (source < 0).any():
    missing = [train_names[i] for i in np.flatnonzero(source < 0)[:3]]
    raise InputError(f"{int((source < 0).sum())} training image(s) have no out-of-fold output ({', '.join(missing)})")
  return probs, embeddings, source


def ordered_test_outputs(test_names, out):
  """(probabilities, embeddings) of fold model `out` in test.csv order."""
  position = {n: i for i, n in enumerate(out.test_names)}
  missing = [n for n in test_names if n not in position]
  if missing:
    raise InputError(f"fold {out.fold}: no test output for {len(missing)} image(s) ({', '.join(missing[:3])})")
  rows = np.array([position[n] for n in test_names])
  return out.test_probs[rows], out.test_embeddings[rows]
