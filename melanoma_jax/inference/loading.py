"""A trained workdir -> what predicts with it, recognised from the run the workdir recorded (no --config).

`load_predictor(workdir)` is the one entry point: an image run gives its `image.TrainedModel` (the best
checkpoint; `score(images)` -> probabilities), an ensemble workdir an `ensemble.EnsemblePredictor` (its fold
models' TrainedModels averaged, the metadata fused with its fitted stages). Anything else is refused with
one line, as are workdirs with no run, no checkpoint, or a config this code cannot resolve.
"""
import json
import os
import sys
from typing import Optional

from melanoma_jax import image
from melanoma_jax.inference import ensemble
from melanoma_jax.training import identity
from melanoma_jax.utils.errors import InputError

ENSEMBLE, IMAGE = "ensemble", "image"
OPERATING_SENSITIVITY = 0.9  # A served verdict's threshold: the one reaching this sensitivity (report.json).


def kind_of(workdir):
  """"image" or "ensemble": the kind of trained workdir; InputError for anything else (no run, tabular)."""
  task = identity.task_of(workdir)
  if task not in (IMAGE, ENSEMBLE):
    raise InputError(f"{workdir}: a {task} run; prediction from image files needs an image run or an ensemble")
  return task


def one_model_only(workdir, what):
  """The one-line refusal of `what` (saliency maps, an export) for an ensemble workdir."""
  return ensemble.one_model_only(workdir, what)


def load_predictor(workdir, tta: Optional[int] = None, dtype: Optional[str] = None):
  """The predictor of `workdir` (`tta` None: the run's own setting, else a number of views; `dtype` None: the
  run's compute dtype, else "float32" or "bfloat16"); see the module doc."""
  if kind_of(workdir) == ENSEMBLE:
    return ensemble.load(workdir, tta, dtype)
  return image.load_best(workdir, tta=tta, dtype=dtype)


def announce(workdir, predictor, require_finished=False):
  """Says on the terminal which checkpoint predicts and, for a run that has not finished training, that it
  has not; with `require_finished` such a run is refused with one line instead."""
  shown = workdir if workdir.isprintable() else repr(workdir)
  if predictor.unfinished:
    if require_finished:
      raise InputError(f"{shown}: {predictor.unfinished}; --require_finished refuses it")
    print(f"warning: {shown}: {predictor.unfinished}; using the best checkpoint so far", file=sys.stderr, flush=True)
  print(f"{shown}: {predictor.description}", file=sys.stderr, flush=True)


def operating_point(workdir):
  """{"name", "threshold", "sensitivity", "specificity"} of the run's report.json image stage reaching
  OPERATING_SENSITIVITY on its validation rows, or None when the run has no such report (the served
  probability is that stage's column: the image run's prediction, an ensemble's fold mean)."""
  try:
    with open(os.path.join(workdir, "report.json")) as f:
      report = json.load(f)
    points = report["stages"]["image"]["operating_points"]["specificity_at_sensitivity"]
    point = next(p for p in points if abs(p["target"] - OPERATING_SENSITIVITY) < 1e-9)
    threshold = float(point["threshold"])
  except (OSError, ValueError, KeyError, TypeError, StopIteration):
    return None
  return {"name": f"{OPERATING_SENSITIVITY:.0%} sensitivity on the run's validation images (report.json)",
          "threshold": threshold, "sensitivity": point.get("sensitivity"),
          "specificity": point.get("specificity")}
