"""W/fusion.zip: the ensemble's fitted second stage, what predicting new images needs beyond the fold models.

`FittedEnsemble` holds, for fold models 0..K-1 (each fold's best checkpoint, whose step it records):
  * `spaces`: each fold model's ContextSpace (context.fit_space, fitted on its outputs for all test rows,
    patient ids only: the test rows and new images are measured alike);
  * `stages`: every stage (fusion.STAGES), its chosen candidate fitted on all out-of-fold training rows, its
    tabular encoder (tabular/features.py's Preprocessor, patient context included) fitted on them too;
  * `calibrator`: the Platt calibrator of the fusion stage, fitted on all out-of-fold fusion scores.
`predict(table, per_fold)` is the one path from fold models' outputs to the stages' probabilities: the
ensemble's own test stage (test_stages.csv) and the predict command on new image files both go through it,
so a set of files equal to all test images of some patients gets exactly the test stage's predictions.

The file is one zip (written atomically; its sha256 is results.json's `fusion_sha256`) from which loading
never runs code, so a workdir received from someone else is safe to predict with:
  * `fitted.json`: format name and `VERSION`, folds, fold_steps, the calibrator's a and b, and per stage
    (in order) its inputs (image columns, tabular or not), family, seed and tabular encoder
    (`Preprocessor.to_dict`): plain JSON;
  * `spaces.npz`: mean_k, scale_k, style_k, principal_k of each fold model's context space, read with
    allow_pickle=False (numbers only);
  * `stage_<name>.skops`: each stage's scikit-learn estimator in skops.io's format (no pickle). Before
    skops builds anything, every type named in the file must be on `TRUSTED_TYPES[family]`, the exact
    types that family's estimator is made of (skops' own, wider default list is not relied on); after,
    the estimator must be the family's class over the stage's design width, and a gradient-boosting
    model's trees must only point at later nodes and existing features (scikit-learn follows them
    without bounds checks).
`load` refuses, with one line naming the file, a missing, unreadable, corrupt or truncated file, another
format version (older versions are refitted by rerunning the ensemble), a tampered estimator, and a W/fusion.pkl left by an older version (a pickle: never loaded).
"""
import dataclasses
import io
import json
import os
import zipfile
import zlib
from typing import Dict, Tuple

import numpy as np
import pandas as pd
from absl import logging
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.ensemble._hist_gradient_boosting.common import PREDICTOR_RECORD_DTYPE
from sklearn.linear_model import LogisticRegression

from melanoma_jax.ensemble import context as context_lib
from melanoma_jax.ensemble import fusion
from melanoma_jax.evaluation import calibration
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

FILE = "fusion.zip"
LEGACY_FILE = "fusion.pkl"  # Versions before 2: a pickle, never loaded (unpickling can run code).
VERSION = 3  # 3: context spaces in two geometries, stages with chosen image columns.
FORMAT = "melanoma_jax fitted ensemble"
DOCUMENT = "fitted.json"
SPACES = "spaces.npz"
_SPACE_FIELDS = ("mean", "scale", "style", "principal")

# skops.io types (module.class as the file names them) each family's fitted estimator is made of,
# scikit-learn 1.9 / numpy 2.x; and the skops node loaders those need. Anything else is refused unbuilt.
_PLAIN = ("builtins.dict", "builtins.list", "builtins.tuple", "builtins.str", "numpy.ndarray")
TRUSTED_TYPES = {
    "logistic": _PLAIN + ("sklearn.linear_model._logistic.LogisticRegression",),
    "hgb": _PLAIN + (
        "sklearn.ensemble._hist_gradient_boosting.gradient_boosting.HistGradientBoostingClassifier",
        "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor",
        "sklearn.ensemble._hist_gradient_boosting.binning._BinMapper",
        "sklearn.preprocessing._label.LabelEncoder",
        "sklearn._loss.loss.HalfBinomialLoss", "sklearn._loss._loss.CyHalfBinomialLoss",
        "sklearn._loss.link.LogitLink", "sklearn._loss.link.Interval",
        "numpy.uint64", "numpy.random._generator.Generator", "numpy.random.PCG64"),
}
_LOADERS = frozenset({"ObjectNode", "DictNode", "ListNode", "TupleNode", "JsonNode", "TypeNode", "NdArrayNode",
                      "RandomGeneratorNode", "LossNode"})
_MAX_BYTES = 1 << 30  # Uncompressed bytes one member (or one estimator's members together) may hold.
# What reading a damaged or hand-made file can raise (InputError, a ValueError, is re-raised as it is).
_UNREADABLE = (OSError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError,
               NotImplementedError, zipfile.BadZipFile, zlib.error)


@dataclasses.dataclass
class FittedEnsemble:
  """The fitted second stage of an ensemble workdir (see the module doc)."""
  folds: Tuple[int, ...]
  fold_steps: Tuple[int, ...]  # Best checkpoint step of each fold model whose outputs the stages saw.
  spaces: Tuple[context_lib.ContextSpace, ...]
  stages: Dict[str, fusion.Stage]
  calibrator: calibration.PlattCalibrator
  version: int = VERSION

  def predict(self, table, per_fold):
    """DataFrame (table's index order, positions 0..rows-1) of pred_image, pred_<stage> for every stage and
    prediction (the calibrated fusion) for the rows of `table` (patient_id + the metadata columns).

    `per_fold`: [(probabilities [rows], embeddings [rows, F])] of every fold model, in `folds` order. Image
    context is computed among the same patient's rows of `table` only, one per fold model (in its context
    space), averaged.
    """
    if len(per_fold) != len(self.folds):
      raise InputError(f"{FILE}: fitted on {len(self.folds)} fold models' outputs, given {len(per_fold)}")
    probs = np.mean([np.asarray(p, np.float64) for p, _ in per_fold], axis=0)
    image_context = context_lib.fold_averaged_context(table["patient_id"].to_numpy(), per_fold,
                                                      spaces=list(self.spaces))
    images = fusion.image_block(probs, image_context)
    out = {"pred_image": probs}
    for name, stage in self.stages.items():
      out[f"pred_{name}"] = stage.predict(table, images)
    out["prediction"] = self.calibrator(out["pred_fusion"])
    return pd.DataFrame(out)


def _estimator_member(name):
  return f"stage_{name}.skops"


def save(fitted, workdir):
  """Writes WORKDIR/fusion.zip atomically (and removes a W/fusion.pkl of an older version); returns its
  sha256."""
  import skops.io as sio  # pylint: disable=g-import-not-at-top
  document = {"format": FORMAT, "version": VERSION, "folds": [int(f) for f in fitted.folds],
              "fold_steps": [int(s) for s in fitted.fold_steps],
              "calibrator": {"a": float(fitted.calibrator.a), "b": float(fitted.calibrator.b)},
              "spaces": len(fitted.spaces),
              "stages": {name: stage.to_dict() for name, stage in fitted.stages.items()}}
  arrays = {}
  for k, space in enumerate(fitted.spaces):
    for field in _SPACE_FIELDS:
      arrays[f"{field}_{k}"] = np.asarray(getattr(space, field))
  buffer = io.BytesIO()
  np.savez(buffer, **arrays)
  path = os.path.join(workdir, FILE)
  with files.atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as archive:
    archive.writestr(DOCUMENT, json.dumps(document, indent=1))
    archive.writestr(SPACES, buffer.getvalue())
    for name, stage in fitted.stages.items():
      archive.writestr(_estimator_member(name), sio.dumps(stage.estimator))
  legacy = os.path.join(workdir, LEGACY_FILE)
  if os.path.exists(legacy):
    os.remove(legacy)
    logging.info("%s: removed, an older version's pickle that %s replaces", legacy, FILE)
  return files.sha256(path)


def load(workdir):
  """The FittedEnsemble of WORKDIR/fusion.zip; one-line InputError naming the file when it is missing,
  unreadable, corrupt, another version or tampered with, and when only an older version's fusion.pkl is
  there (never loaded). Nothing read runs code."""
  path = os.path.join(workdir, FILE)
  if not os.path.isfile(path):
    legacy = os.path.join(workdir, LEGACY_FILE)
    if os.path.exists(legacy):
      raise InputError(f"{legacy}: an ensemble fitted by an older version, saved as a pickle, which this "
                       f"version never loads (it could run code); rerun the same main.py command on this "
                       f"workdir to refit it from the cached fold outputs into {FILE}")
    raise InputError(f"{path}: missing (an ensemble trained before it was written); rerun the same main.py "
                     "command on this workdir: finished folds and their cached outputs are reused")
  try:
    with zipfile.ZipFile(path) as archive:
      document = json.loads(_read(archive, DOCUMENT).decode("utf-8"))
      if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InputError(f"{path}: {DOCUMENT} is not a fitted ensemble's description")
      if document.get("version") != VERSION:
        raise InputError(f"{path}: format version {document.get('version')!r}, this code reads {VERSION}; rerun "
                         "the same main.py command on this workdir to rewrite it")
      return _fitted(path, archive, document)
  except InputError:
    raise
  except _UNREADABLE as e:
    detail = str(e).splitlines()[0] if str(e) else ""
    raise InputError(f"{path}: unreadable, corrupt or truncated ({type(e).__name__}: {detail}); rerun the same "
                     "main.py command on this workdir to rewrite it") from None


def _read(archive, member, limit=_MAX_BYTES):
  info = archive.getinfo(member)  # KeyError when missing.
  if info.file_size > limit:
    raise ValueError(f"{member} declares {info.file_size} bytes")
  return archive.read(info)


def _ints(values, what):
  if not isinstance(values, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
    raise ValueError(f"{what} {values!r} must be a list of integers")
  return tuple(values)


def _fitted(path, archive, document):
  folds, fold_steps = _ints(document["folds"], "folds"), _ints(document["fold_steps"], "fold_steps")
  if len(folds) != len(fold_steps):
    raise ValueError(f"{len(folds)} folds but {len(fold_steps)} fold_steps")
  a, b = document["calibrator"]["a"], document["calibrator"]["b"]
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b)):
    raise ValueError(f"calibrator a={a!r}, b={b!r} must be numbers")
  count = document["spaces"]
  if not isinstance(count, int) or isinstance(count, bool) or count < 0:
    raise ValueError(f"spaces {count!r} must be a count")
  spaces = []
  with np.load(io.BytesIO(_read(archive, SPACES)), allow_pickle=False) as saved:
    for k in range(count):
      mean, scale, style, principal = (saved[f"{field}_{k}"] for field in _SPACE_FIELDS)
      arrays = (mean, scale, style, principal)
      if (any(x.dtype.kind != "f" for x in arrays) or mean.ndim != 1 or scale.shape != mean.shape
          or any(m.ndim != 2 or m.shape[0] != len(mean) for m in (style, principal))):
        raise ValueError(f"space {k}: arrays of shapes {', '.join(str(x.shape) for x in arrays)} and dtypes "
                         f"{', '.join(str(x.dtype) for x in arrays)}, not float [F], [F], [F, k], [F, p]")
      spaces.append(context_lib.ContextSpace(mean=mean, scale=scale, style=style, principal=principal))
  described = document["stages"]
  if not isinstance(described, dict) or "fusion" not in described:
    raise ValueError("stages must be a mapping that includes the fusion stage")
  stages = {}
  for name, d in described.items():
    member = _estimator_member(name)
    family = d["family"]
    if family not in TRUSTED_TYPES:
      raise InputError(f"{path}: stage {name}: family {family!r} must be one of {', '.join(TRUSTED_TYPES)}")
    estimator = _estimator(path, member, family, _read(archive, member))
    stage = fusion.Stage.from_dict(d, estimator)
    _check_estimator(path, member, stage)
    stages[name] = stage
  return FittedEnsemble(folds, fold_steps, tuple(spaces), stages,
                        calibration.PlattCalibrator(float(a), float(b)))


def _schema_types(node, found):
  """{(module.class, node loader)} of every type (and numpy bit generator) a skops schema names; JSON only."""
  if isinstance(node, dict):
    if "__loader__" in node:
      found.add((f"{node.get('__module__')}.{node.get('__class__')}", node["__loader__"]))
      if node["__loader__"] == "RandomGeneratorNode":
        # The bit generator is named by a string inside the state (skops resolves it from numpy.random).
        name = json.loads(node["content"]["bit_generator"]["content"]["bit_generator"]["content"])
        found.add((f"numpy.random.{name}", "RandomGeneratorNode"))
    for value in node.values():
      _schema_types(value, found)
  elif isinstance(node, list):
    for value in node:
      _schema_types(value, found)
  return found


def _estimator(path, member, family, data):
  """The estimator of skops bytes `data`, refused unbuilt when the file names any type or loader that the
  family's estimator is not made of."""
  import skops.io as sio  # pylint: disable=g-import-not-at-top
  from skops.io.exceptions import UntrustedTypesFoundException  # pylint: disable=g-import-not-at-top
  with zipfile.ZipFile(io.BytesIO(data)) as inner:
    if sum(info.file_size for info in inner.infolist()) > _MAX_BYTES:
      raise ValueError(f"{member}: declares more than {_MAX_BYTES} bytes")
    found = _schema_types(json.loads(_read(inner, "schema.json").decode("utf-8")), set())
  trusted = TRUSTED_TYPES[family]
  untrusted = sorted({t for t, loader in found if t not in trusted or loader not in _LOADERS})
  if untrusted:
    shown = ", ".join(untrusted[:5]) + (f" and {len(untrusted) - 5} more" if len(untrusted) > 5 else "")
    raise InputError(f"{path}: {member} names types a {family} estimator is not made of ({shown}); refused "
                     "unloaded, as a tampered file (loading it could run code)")
  try:
    return sio.loads(data, trusted=list(trusted))
  except UntrustedTypesFoundException as e:  # Not reached while the check above holds.
    raise InputError(f"{path}: {member}: {str(e).splitlines()[0]}; refused unloaded, as a tampered "
                     "file") from None


def _check_estimator(path, member, stage):
  """Refuses an estimator that is not its family's binary classifier over the stage's design width, or
  (gradient boosting) whose trees scikit-learn's unchecked traversal could run off."""
  estimator, width = stage.estimator, stage.width
  expected = {"hgb": HistGradientBoostingClassifier, "logistic": LogisticRegression}[stage.family]
  features = getattr(estimator, "n_features_in_", None)
  if type(estimator) is not expected or features != width:
    raise InputError(f"{path}: {member}: a {type(estimator).__name__} over {features} features, the "
                     f"{stage.family} stage needs a {expected.__name__} over {width}; refused as a tampered "
                     "file")
  if stage.family == "logistic":
    shapes = (np.shape(estimator.coef_), np.shape(estimator.intercept_), np.shape(estimator.classes_))
    problem = (None if shapes == ((1, width), (1,), (2,))
               else f"coefficients, intercept, classes of shapes {shapes}")
  else:
    problem = _tree_problem(estimator, width)
  if problem:
    raise InputError(f"{path}: {member}: {stage.family} model with {problem}; refused as a tampered file")


def _tree_problem(hgb, width):
  """What makes a HistGradientBoostingClassifier's trees unsafe to traverse (scikit-learn does not check), or
  None: every inner node must point at later nodes of its own tree and at one of `width` numeric features."""
  # pylint: disable=protected-access
  if hgb.n_trees_per_iteration_ != 1 or np.shape(hgb.classes_) != (2,):
    return f"{hgb.n_trees_per_iteration_} trees per iteration for classes of shape {np.shape(hgb.classes_)}"
  if ((hgb.is_categorical_ is not None and np.any(hgb.is_categorical_))
      or np.any(hgb._bin_mapper.is_categorical_)):
    return "categorical features (the design is all numeric)"
  for i, per_iteration in enumerate(hgb._predictors):
    if len(per_iteration) != 1:
      return f"{len(per_iteration)} trees at iteration {i}"
    nodes = per_iteration[0].nodes
    if (not isinstance(nodes, np.ndarray) or nodes.dtype != PREDICTOR_RECORD_DTYPE or nodes.ndim != 1
        or not nodes.size):
      return f"tree {i} not an array of scikit-learn's node records"
    inner = np.flatnonzero(nodes["is_leaf"] == 0)
    left, right, feature = nodes["left"][inner], nodes["right"][inner], nodes["feature_idx"][inner]
    if (np.any(left <= inner) or np.any(right <= inner) or np.any(left >= nodes.size)
        or np.any(right >= nodes.size) or np.any(feature < 0) or np.any(feature >= width)
        or np.any(nodes["is_categorical"] != 0)):
      return f"tree {i} pointing outside itself, backwards, at a missing feature or splitting categories"
  return None
