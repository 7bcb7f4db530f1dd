"""W/fusion.pkl: the ensemble's fitted second stage, what predicting new images needs beyond the fold models.

`FittedEnsemble` holds, for fold models 0..K-1 (each fold's best checkpoint, whose step it records):
  * `projections`: each fold model's StyleProjection (context.fit_style, fitted on its outputs for all test
    rows, patient ids only: the test rows and new images are projected alike);
  * `stages`: every stage (fusion.STAGES) fitted on all out-of-fold training rows, its tabular encoder
    (tabular/features.py's Preprocessor, patient context included) fitted on them too;
  * `calibrator`: the Platt calibrator of the fusion stage, fitted on all out-of-fold fusion scores.
`predict(table, per_fold)` is the one path from fold models' outputs to the stages' probabilities: the
ensemble's own test stage (test_stages.csv) and the predict command on new image files both go through it,
so a set of files equal to all test images of some patients gets exactly the test stage's predictions.

The file is a pickle (scikit-learn estimators inside) with a format `version`; `load` refuses another
version with one line. Only load files you trust: unpickling runs code.
"""
import dataclasses
import os
import pickle
from typing import Dict, Tuple

import numpy as np
import pandas as pd

from melanoma_jax.ensemble import context as context_lib
from melanoma_jax.ensemble import fusion
from melanoma_jax.evaluation import calibration
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

FILE = "fusion.pkl"
VERSION = 1


@dataclasses.dataclass
class FittedEnsemble:
  """The fitted second stage of an ensemble workdir (see the module doc)."""
  folds: Tuple[int, ...]
  fold_steps: Tuple[int, ...]  # Best checkpoint step of each fold model whose outputs the stages saw.
  projections: Tuple[context_lib.StyleProjection, ...]
  stages: Dict[str, fusion.Stage]
  calibrator: calibration.PlattCalibrator
  version: int = VERSION

  def predict(self, table, per_fold):
    """DataFrame (table's index order, positions 0..rows-1) of pred_image, pred_<stage> for every stage and
    prediction (the calibrated fusion) for the rows of `table` (patient_id + the metadata columns).

    `per_fold`: [(probabilities [rows], embeddings [rows, F])] of every fold model, in `folds` order. Image
    context is computed among the same patient's rows of `table` only, one per fold model, averaged.
    """
    if len(per_fold) != len(self.folds):
      raise InputError(f"{FILE}: fitted on {len(self.folds)} fold models' outputs, given {len(per_fold)}")
    probs = np.mean([np.asarray(p, np.float64) for p, _ in per_fold], axis=0)
    image_context = context_lib.fold_averaged_context(table["patient_id"].to_numpy(), per_fold,
                                                      projections=list(self.projections))
    images = fusion.image_block(probs, image_context)
    out = {"pred_image": probs}
    for name, stage in self.stages.items():
      out[f"pred_{name}"] = stage.predict(table, images)
    out["prediction"] = self.calibrator(out["pred_fusion"])
    return pd.DataFrame(out)


def save(fitted, workdir):
  """Writes WORKDIR/fusion.pkl atomically; returns its sha256."""
  path = os.path.join(workdir, FILE)
  with files.atomic_path(path) as tmp, open(tmp, "wb") as f:
    pickle.dump(fitted, f, protocol=pickle.HIGHEST_PROTOCOL)
  return files.sha256(path)


def load(workdir):
  """The FittedEnsemble of WORKDIR/fusion.pkl; one-line InputError when missing, unreadable or another
  version."""
  path = os.path.join(workdir, FILE)
  if not os.path.isfile(path):
    raise InputError(f"{path}: missing (an ensemble trained before it was written); rerun the same main.py "
                     "command on this workdir: finished folds and their cached outputs are reused")
  try:
    with open(path, "rb") as f:
      fitted = pickle.load(f)
  except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ImportError, TypeError) as e:
    raise InputError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
  if not isinstance(fitted, FittedEnsemble) or getattr(fitted, "version", None) != VERSION:
    raise InputError(f"{path}: format version {getattr(fitted, 'version', None)}, this code reads {VERSION}; "
                     "rerun the same main.py command on this workdir to rewrite it")
  return fitted
