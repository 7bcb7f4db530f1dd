"""Which process reads what, when one run spans several processes (jax.distributed).

Pure functions of plain values: the training share of each process per epoch and the owner of each
validation or test row. The pipeline applies them; the caller gathers the predictions.
"""
import numpy as np

from melanoma_jax.utils.errors import InputError


def process_share(files, names, targets, epoch_seed, process_index, process_count):
  """(files, names) process `process_index` of `process_count` reads in the epoch of `epoch_seed`.

  The shares of all processes are disjoint and together hold every training image once. With at least as
  many record files as processes, whole files are dealt out (names None: every training record of them);
  otherwise all files are read and the training `names` (whose 0/1 `targets` are given) are dealt out, each
  class on its own so every share holds both. One process: (files, None), the single-process stream.
  """
  files, names = list(files), list(names)
  if process_count == 1:
    return files, None
  rng = np.random.default_rng([int(epoch_seed), 14])  # Shares move with the epoch, like its order.
  if len(files) >= process_count:
    order = rng.permutation(len(files))
    return [files[i] for i in sorted(order[process_index::process_count])], None
  mine = []
  for label in (0, 1):
    of_class = [n for n in names if targets[n] == label]
    if len(of_class) < process_count:
      raise InputError(f"{len(files)} training record file(s) and only {len(of_class)} "
                       f"{'malignant' if label else 'benign'} training image(s) for {process_count} processes: "
                       "each process needs images of both classes (use fewer processes)")
    order = rng.permutation(len(of_class))
    mine += [of_class[i] for i in order[process_index::process_count]]
  return files, sorted(mine)


def eval_owner(position, process_count):
  """The process that predicts the image at `position` of its table (validation rows, test.csv rows)."""
  return position % process_count
