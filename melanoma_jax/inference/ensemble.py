"""An ensemble workdir as a predictor: its fold models averaged, and with --metadata its fitted fusion.

`load(workdir)` loads every fold model W/fold_k (`image.load_best`, each fold's best checkpoint) and the
fitted second stage (ensemble/fitted.py) when present and made from these checkpoints.

  * Without metadata: `score(x)` is the mean over fold models of their probabilities.
  * With metadata (`read_metadata(csv)` first): every readable file's fold outputs (`score_folds`:
    probability + pooled embedding per fold model) are kept while the folder is read, then `fuse` computes,
    per fold model, each image's context among the same patient's readable files (in that fold model's
    fitted context space), averages them, adds the tabular features (their patient context among the
    same patient's metadata rows of those files) and applies the fitted stages and calibrator:
    `FittedEnsemble.predict`, the very path the ensemble's test stage takes. A file without a metadata row
    keeps its pred_image and gets an error.

Saliency and export explain or convert one network; an ensemble refuses them (use W/fold_k).
"""
import dataclasses
import os
from typing import List, Optional

import numpy as np
import pandas as pd

from melanoma_jax import image
from melanoma_jax.ensemble import fitted as fitted_lib
from melanoma_jax.inference import metadata as metadata_lib
from melanoma_jax.training import identity, results
from melanoma_jax.utils.errors import InputError


def one_model_only(workdir, what):
  """The one-line refusal of `what` (saliency maps, an export) for an ensemble workdir."""
  return InputError(f"{workdir}: an ensemble workdir; {what}: one model only, use one fold's "
                    f"(--workdir={os.path.join(workdir, 'fold_0')})")


@dataclasses.dataclass
class EnsemblePredictor:
  """Fold models (`members`, fold order) and the fitted second stage (None: `unfused`, why)."""
  workdir: str
  members: List[image.TrainedModel]
  fitted: Optional[fitted_lib.FittedEnsemble]
  unfused: str = ""
  engine = "jax"  # Not a field: what the model server asks of a predictor.

  @property
  def image_size(self):
    return self.members[0].image_size

  @property
  def global_batch(self):
    return self.members[0].global_batch

  @property
  def tta(self):
    return self.members[0].tta

  @property
  def unfinished(self):
    """Why the ensemble has not finished training ("" when it has): a fold's reason, or no results.json."""
    for k, member in enumerate(self.members):
      if member.unfinished:
        return f"fold {k}: {member.unfinished}"
    if not os.path.exists(os.path.join(self.workdir, results.NAME)):
      return f"the ensemble has not finished (no {results.NAME})"
    return ""

  @property
  def description(self):
    return f"ensemble of {len(self.members)} fold models ({self.members[0].description}, ...)"

  def score(self, images, batch=None):
    """image.Scores whose probabilities are the mean over fold models of theirs (`batch`: as theirs)."""
    return image.Scores(np.mean([m.score(images, batch=batch).probabilities for m in self.members], axis=0))

  def score_folds(self, images):
    """[image.Scores with embeddings] of every fold model, fold order."""
    return [m.score(images, embeddings=True) for m in self.members]

  def read_metadata(self, path):
    """The --metadata table (inference/metadata.py), indexed by file name without extension; refuses it
    when this workdir has no usable fitted stages."""
    if self.fitted is None:
      raise InputError(self.unfused)
    return metadata_lib.read(path)

  def fuse(self, names, per_fold, table):
    """DataFrame (rows of `names`, in order) of pred_image, pred_fused and error for files `names` with fold
    outputs `per_fold` ([(probabilities, embeddings)], fold order) and the --metadata `table`."""
    probs = np.mean([np.asarray(p, np.float64) for p, _ in per_fold], axis=0)
    out = pd.DataFrame({"pred_image": probs, "pred_fused": np.nan, "error": ""})
    keys = [metadata_lib.key(n) for n in names]
    known = np.array([k in table.index for k in keys], bool)
    for i in np.flatnonzero(~known):
      out.loc[i, "error"] = f"no row for {keys[i]} in --metadata={table.attrs['path']}"
    if known.any():
      rows = np.flatnonzero(known)
      matched = table.loc[[keys[i] for i in rows]].reset_index(drop=True)
      matched.attrs["path"] = table.attrs["path"]
      fused = self.fitted.predict(matched, [(p[rows], e[rows]) for p, e in per_fold])
      out.loc[rows, "pred_fused"] = fused["prediction"].to_numpy()
    return out


def load(workdir, tta=None, dtype=None):
  """The EnsemblePredictor of ensemble workdir `workdir` (`tta`, `dtype` None: the folds' own settings)."""
  config = identity.recorded_config(workdir)
  num_folds = int(config.get("num_folds", 0))
  if num_folds < 1:
    raise InputError(f"{workdir}: the recorded config has no num_folds; not an ensemble this code can load")
  members = []
  for fold in range(num_folds):
    fold_dir = os.path.join(workdir, f"fold_{fold}")
    if not os.path.isdir(fold_dir):
      raise InputError(f"{fold_dir}: fold {fold} of {num_folds} not found (train the ensemble first)")
    members.append(image.load_best(fold_dir, tta=tta, dtype=dtype))
  fitted, unfused = None, ""
  try:
    fitted = fitted_lib.load(workdir)
  except InputError as e:
    unfused = f"--metadata needs the fitted fusion: {e}"
  if fitted is not None:
    steps = tuple(m.checkpoint_step for m in members)
    if tuple(fitted.folds) != tuple(range(num_folds)) or tuple(fitted.fold_steps) != steps:
      fitted, unfused = None, (
          f"--metadata needs the fitted fusion: {os.path.join(workdir, fitted_lib.FILE)} was fitted on fold "
          f"models {list(fitted.folds)} at checkpoint steps {list(fitted.fold_steps)}, the workdir holds steps "
          f"{list(steps)}; rerun the same main.py command on this workdir to refit it")
  return EnsemblePredictor(workdir=workdir, members=members, fitted=fitted, unfused=unfused)
