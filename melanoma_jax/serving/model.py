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
PATIENT = "patient"  # The patient id every image of one patient request shares.
METADATA_FIELDS = {"sex": "sex", "age": "age_approx", "site": "anatom_site_general_challenge"}


class ServedModel:
  """`predictor` (an `image.TrainedModel`, an ensemble's predictor, or an ONNX export's
  `inference.onnx_predictor.OnnxPredictor`) of `workdir` (None for an ONNX export), with `limits` on images;
  batches of up to `max_batch_size` images."""

  def __init__(self, workdir, predictor, limits=None, max_batch_size=16):
    self.workdir, self.predictor = workdir, predictor
    self.engine = predictor.engine
    self.ensemble = self.engine == "jax" and loading.kind_of(workdir) == loading.ENSEMBLE
    self.reader = images_lib.Reader(predictor.image_size, limits)
    if self.engine == "onnx":  # ONNX Runtime takes any batch size: nothing to compile.
      self.batch_sizes = [int(max_batch_size)]
      step, self.operating_point = predictor.record.get("checkpoint_step", 1), predictor.record.get("operating_point")
    else:
      import jax  # pylint: disable=g-import-not-at-top
      self.batch_sizes = batch_sizes(max_batch_size, jax.local_device_count())
      members = predictor.members if self.ensemble else [predictor]
      step, self.operating_point = members[0].checkpoint_step, loading.operating_point(workdir)
    # TF Serving's versions are integers: the checkpoint step (an ensemble: its first fold's).
    self.version = str(step)

  @property
  def fuses(self):
    """Whether a patient request's metadata is fused (an ensemble with its fitted stages)."""
    return self.ensemble and self.predictor.fitted is not None

  @property
  def explains(self):
    """Whether saliency maps can be asked for (one network on the JAX engine)."""
    return self.engine == "jax" and not self.ensemble

  @property
  def description(self):
    return self.predictor.description

  def decode(self, data: bytes):
    """(model input [S, S, 3], "") or (None, one-line reason) of one encoded image."""
    return self.reader.read_data(data, "request image")

  def score(self, x):
    """float64 [N] probabilities of model inputs `x` [N, S, S, 3] (the predict command's), padded to the
    smallest of `batch_sizes` that holds them."""
    batch = next((b for b in self.batch_sizes if b >= len(x)), self.batch_sizes[-1])
    return np.asarray(self.predictor.score(x, batch=batch).probabilities, np.float64)

  def warm_up(self):
    """Compiles every step a request can run (the image checks and decoder; the predict step at each of
    `batch_sizes`; the embedding step; Grad-CAM and SmoothGrad of one image) before the server is ready."""
    from melanoma_jax.utils.tf_host import tf  # pylint: disable=g-import-not-at-top
    png = tf().io.encode_png(tf().zeros([8, 8, 3], tf().uint8)).numpy()  # Traces the checks and the decoder.
    x, reason = self.decode(png)
    if reason:
      raise InputError(f"warm-up: an 8x8 PNG was refused ({reason})")
    x = x[None]
    for size in self.batch_sizes:
      self.score(np.repeat(x, size, axis=0))
    self.patient(x, ["warm-up"], None)
    if self.explains:
      self.saliency_png(x[0], "warm-up")

  def patient(self, x, names, metadata):
    """Per image of one patient (model inputs `x`, distinct `names`): probability, rank (1: the highest
    probability), ugly_duckling (UGLY_DUCKLING) and, when `metadata` (per image {sex, age, site}, values may be
    None) is given and the workdir fuses, pred_fused; also pred_image for an ensemble."""
    n = len(x)
    if self.engine == "onnx":  # No embeddings in an ONNX export: probabilities and ranks only.
      per_fold, context = [(self.score(x), None)], {UGLY_DUCKLING: [None] * n}
    elif self.ensemble:
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
    rows = [{"name": name, "probability": float(p), "rank": int(r), "ugly_duckling": None if u is None else float(u)}
            for name, p, r, u in zip(names, probs, ranks, context[UGLY_DUCKLING])]
    if metadata is not None and self.fuses:
      table = metadata_table(names, metadata)
      fused = self.predictor.fuse(list(names), per_fold, table)
      for row, pred_image, pred_fused in zip(rows, fused["pred_image"], fused["pred_fused"]):
        row.update(pred_image=float(pred_image), pred_fused=float(pred_fused))
    return rows

  def check_explains(self):
    """InputError (one line) when saliency maps cannot be given (see `explains`)."""
    if self.engine == "onnx":
      raise InputError("saliency: ONNX Runtime gives no gradients; serve the workdir with --engine=jax for maps")
    if self.ensemble:
      raise loading.one_model_only(self.workdir, "saliency maps")

  def saliency_png(self, image, title):
    """The PNG bytes `predict --saliency` writes for one model input `image` [S, S, 3] (image, Grad-CAM
    overlay, SmoothGrad), through a temporary folder of our own."""
    from melanoma_jax.inference import saliency  # pylint: disable=g-import-not-at-top
    self.check_explains()
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


def batch_sizes(max_batch_size, devices):
  """The batch sizes the server compiles: `devices` x 1, 2, 4, ... images, up to the first that holds
  `max_batch_size`. A batch is padded to the smallest that holds it, so a lone request costs a batch of one
  per device and a full batch costs no padding (one shape at the run's global batch made a full batch of 16
  pay for 64)."""
  per_device = -(-int(max_batch_size) // devices)
  sizes, k = [], 1
  while k < per_device:
    sizes.append(k * devices)
    k *= 2
  return sizes + [per_device * devices]


def check_names(names):
  """Refuses duplicate image names in one patient request (the metadata rows are matched by name)."""
  keys = [metadata_lib.key(n) for n in names]
  if len(set(keys)) != len(keys):
    raise InputError("patient images: two images share a name; give each a distinct name")
