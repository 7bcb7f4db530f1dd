"""The served model: a trained workdir's predictor, reached only through `inference.loading.load_predictor`.

Every image a request sends goes through `inference.images.Reader.read_data` (the size, format and pixel
checks of `inference/limits.py` from its header, then the run's own evaluation preprocessing) and is scored by
the predictor's `score`, so a request gets the probability the predict command writes for the same bytes.
The patient view adds each image's rank and image context among the patient's images
(`ensemble.context`, the features the ensemble's second stage reads) and, for an ensemble workdir with its
fitted stages, the fusion of the images with their metadata through `EnsemblePredictor.fuse`: the path of
`predict --metadata` and of the ensemble's test stage. Saliency is the figure `predict --saliency` writes.

Not thread-safe: the server calls `score`, `patient`, `saliency_png` and `warm_up` from one thread.
"""
import json
import os
import tempfile

import numpy as np
import pandas as pd

from melanoma_jax.ensemble import context as context_lib
from melanoma_jax.inference import images as images_lib
from melanoma_jax.inference import loading
from melanoma_jax.inference import metadata as metadata_lib
from melanoma_jax.utils.errors import InputError

# The ugly-duckling score shown per image: its mean distance to the patient's other images in the embedding
# geometry, over the patient's typical distance between two images (1: as typical as the others).
UGLY_DUCKLING = "embedding_dist_mean"
OPERATING_SENSITIVITY = 0.9  # The page's verdict: the report's threshold reaching this sensitivity.
PATIENT = "patient"  # The patient id every image of one patient request shares.
METADATA_FIELDS = {"sex": "sex", "age": "age_approx", "site": "anatom_site_general_challenge"}


class ServedModel:
  """`predictor` (an `image.TrainedModel` or an ensemble's predictor) of `workdir`, with `limits` on images."""

  def __init__(self, workdir, predictor, limits=None):
    self.workdir, self.predictor = workdir, predictor
    self.ensemble = loading.kind_of(workdir) == loading.ENSEMBLE
    self.reader = images_lib.Reader(predictor.image_size, limits)
    members = predictor.members if self.ensemble else [predictor]
    # TF Serving's versions are integers: the checkpoint step (an ensemble: its first fold's).
    self.version = str(members[0].checkpoint_step)
    self.operating_point = operating_point(workdir)

  @property
  def fuses(self):
    """Whether a patient request's metadata is fused (an ensemble with its fitted stages)."""
    return self.ensemble and self.predictor.fitted is not None

  @property
  def description(self):
    return self.predictor.description

  def decode(self, data: bytes):
    """(model input [S, S, 3], "") or (None, one-line reason) of one encoded image."""
    return self.reader.read_data(data, "request image")

  def score(self, x):
    """float64 [N] probabilities of model inputs `x` [N, S, S, 3] (the predict command's)."""
    return np.asarray(self.predictor.score(x).probabilities, np.float64)

  def warm_up(self):
    """Compiles every step a request can run (the image checks and decoder; the predict step at the run's
    global batch, the one every batch is padded to; the embedding step; Grad-CAM and SmoothGrad of one image)
    before the server is ready."""
    from melanoma_jax.utils.tf_host import tf  # pylint: disable=g-import-not-at-top
    png = tf().io.encode_png(tf().zeros([8, 8, 3], tf().uint8)).numpy()  # Traces the checks and the decoder.
    x, reason = self.decode(png)
    if reason:
      raise InputError(f"warm-up: an 8x8 PNG was refused ({reason})")
    x = x[None]
    self.score(x)
    self.patient(x, ["warm-up"], None)
    if not self.ensemble:
      self.saliency_png(x[0], "warm-up")

  def patient(self, x, names, metadata):
    """Per image of one patient (model inputs `x`, distinct `names`): probability, rank (1: the highest
    probability), ugly_duckling (UGLY_DUCKLING) and, when `metadata` (per image {sex, age, site}, values may be
    None) is given and the workdir fuses, pred_fused; also pred_image for an ensemble."""
    n = len(x)
    if self.ensemble:
      outs = self.predictor.score_folds(x)
      per_fold = [(o.probabilities, o.embeddings) for o in outs]
      spaces = list(self.predictor.fitted.spaces) if self.predictor.fitted is not None else None
      # The fitted spaces are those the test stage measures new images in (a fold model's each).
      context = context_lib.fold_averaged_context([PATIENT] * n, per_fold, spaces=spaces)
    else:
      out = self.predictor.score(x, embeddings=True)
      per_fold = [(out.probabilities, out.embeddings)]
      context = context_lib.image_context([PATIENT] * n, out.probabilities, out.embeddings)
    probs = np.mean([np.asarray(p, np.float64) for p, _ in per_fold], axis=0)
    ranks = pd.Series(probs).rank(ascending=False, method="min").astype(int).to_numpy()
    rows = [{"name": name, "probability": float(p), "rank": int(r), "ugly_duckling": float(u)}
            for name, p, r, u in zip(names, probs, ranks, context[UGLY_DUCKLING])]
    if metadata is not None and self.fuses:
      table = metadata_table(names, metadata)
      fused = self.predictor.fuse(list(names), per_fold, table)
      for row, pred_image, pred_fused in zip(rows, fused["pred_image"], fused["pred_fused"]):
        row.update(pred_image=float(pred_image), pred_fused=float(pred_fused))
    return rows

  def saliency_png(self, image, title):
    """The PNG bytes `predict --saliency` writes for one model input `image` [S, S, 3] (image, Grad-CAM
    overlay, SmoothGrad), through a temporary folder of our own."""
    from melanoma_jax.inference import saliency  # pylint: disable=g-import-not-at-top
    if self.ensemble:
      raise loading.one_model_only(self.workdir, "saliency maps")
    x = np.asarray(image, np.float32)[None]
    cam = saliency.grad_cam(self.predictor.model, self.predictor.variables, x)[0]
    smooth = saliency.smoothgrad(self.predictor.model, self.predictor.variables, x)[0]
    with tempfile.TemporaryDirectory(prefix="melanoma_serve_") as folder:
      path = saliency.save_figure(os.path.join(folder, "map.png"), image, cam, smooth, title)
      with open(path, "rb") as f:
        return f.read()


def metadata_table(names, metadata):
  """The --metadata table (`inference.metadata.table_of`, same checks and dtypes) of one patient's images."""
  frame = pd.DataFrame({"image_name": list(names), "patient_id": PATIENT,
                        **{column: [None if m.get(field) is None else str(m.get(field)) for m in metadata]
                           for field, column in METADATA_FIELDS.items()}}, dtype=object)
  return metadata_lib.table_of(frame, "patient metadata", "the request")


def operating_point(workdir):
  """{"name", "threshold"} of the run's report.json image stage reaching OPERATING_SENSITIVITY on its
  validation rows, or None when the run has no such report (the served probability is that stage's column:
  the image run's prediction, an ensemble's fold mean)."""
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


def check_names(names):
  """Refuses duplicate image names in one patient request (the metadata rows are matched by name)."""
  keys = [metadata_lib.key(n) for n in names]
  if len(set(keys)) != len(keys):
    raise InputError("patient images: two images share a name; give each a distinct name")
