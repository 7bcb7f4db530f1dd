"""One fold model's outputs for the ensemble: probability + pooled backbone embedding of every image it
must score, its validation fold (out of fold: the model never saw these patients) and the whole test set.

They are what the fold's own image run scored with its best checkpoint, in one pass (`image.load_scores`:
FOLD_DIR/scores.npz); the ensemble never scores an image again.
"""
import dataclasses

import numpy as np

from melanoma_jax.utils.errors import InputError


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


def from_scores(fold, scores):
  """The FoldOutputs of fold `fold` from its image run's `image.RunScores`."""
  return FoldOutputs(fold, np.asarray(scores.val.names, str), scores.val.probabilities,
                     np.asarray(scores.val.embeddings, np.float32), np.asarray(scores.test.names, str),
                     scores.test.probabilities, np.asarray(scores.test.embeddings, np.float32),
                     scores.checkpoint_step)


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
