"""A run's model as ONNX for ONNX Runtime: preprocessed images in, malignancy probabilities out.

Route: the run's Flax weights go into the network's Keras twin (`keras_twin.py`), which Keras' own ONNX export
(tf2onnx over a plain TensorFlow graph, ops and weights visible) writes as ONNX. jax2onnx, the direct route,
stops on InceptionResNetV2's average pooling and pins an orbax-checkpoint older than ours; jax2tf hides the
network in one XlaCallModule op that tf2onnx cannot convert (docs/inference.md).

The export folder holds model.onnx (fp32), with --quantize=int8 model.int8.onnx, and MARKER: the input contract
(`CONTRACT`: input and output names, shape, layout, value range, the predict command's preprocessing), what the
checks measured, the versions, and `files` (each file written with its sha256; `outputs.py`'s rules).

Model contract: input INPUT float32 [batch, S, S, 3] (NHWC, RGB in [-1, 1]: `inference.images.Reader`'s
output, the run's evaluation preprocessing), any batch size; output OUTPUT float32 [batch], the probability
(with the run's TTA, the mean over the image and its two flips). Nothing in the folder runs code when loaded.

Checks before anything is written: ONNX Runtime on up to CHECK_IMAGES of the run's validation images must match
the JAX path within TOLERANCE, else the export is refused. int8 (static QDQ quantization, calibrated on up to
CALIBRATION_IMAGES training images of the run) is refused when its validation AUC is more than MAX_AUC_DROP
below fp32's, unless forced; both AUCs go into MARKER.
"""
import datetime
import os
import shutil

import numpy as np

from melanoma_jax.image import setup
from melanoma_jax.inference import keras_twin, outputs
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

MARKER = "melanoma_jax_onnx.json"
MODEL, INT8_MODEL = "model.onnx", "model.int8.onnx"
PLANNED = (MODEL, INT8_MODEL)
INPUT, OUTPUT = "image", "probability"
TOLERANCE = 1e-4
MAX_AUC_DROP = 0.005
CHECK_IMAGES = 8
CALIBRATION_IMAGES = 64  # At 75x75; fewer for larger images (`calibration_count`).
# ONNX Runtime's percentile calibration holds every calibration image's activations at once: InceptionResNetV2
# took about 0.45 GB per 299x299 image (32 of them were killed for memory on a 23 GB machine).
_CALIBRATION_PIXELS = CALIBRATION_IMAGES * 75 * 75
_MIN_CALIBRATION_IMAGES = 8
QUANTIZE = ("none", "int8")
_CATCH_ERRORS = "TF2ONNX_CATCH_ERRORS"  # tf2onnx.constants.ENV_TF2ONNX_CATCH_ERRORS


def contract(image_size, tta):
  """The input contract recorded in MARKER (and read back by the predict command); `tta` the run's views."""
  views = setup.tta_views(tta)
  return {"input": INPUT, "output": OUTPUT, "dtype": "float32", "shape": ["batch", image_size, image_size, 3],
          "layout": "NHWC", "channels": "RGB", "value_range": [-1.0, 1.0], "image_size": image_size, "tta": views,
          "preprocessing": ("decode JPEG/PNG to RGB (grey, RGBA, CMYK converted), resize to image_size x image_size "
                            "as the run's evaluation does, scale to [-1, 1] (x / 127.5 - 1): "
                            "melanoma_jax.inference.images.Reader"),
          "output_meaning": "probability of malignancy" + (f", mean over {views} TTA views (image, horizontal flip, "
                                                           "vertical flip, both, then each transposed)"
                                                           if views > 1 else "")}


def session(path, threads=0):
  """An ONNX Runtime CPU session of `path` (`threads` 0: ONNX Runtime's choice)."""
  import onnxruntime as ort  # pylint: disable=g-import-not-at-top
  options = ort.SessionOptions()
  options.intra_op_num_threads = int(threads)
  options.inter_op_num_threads = 1
  return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def probabilities(sess, x, batch=32):
  """float64 [N] probabilities of model inputs `x` (float32 [N, S, S, 3]) from session `sess`."""
  x = np.asarray(x, np.float32)
  if not len(x):
    return np.zeros(0)
  return np.concatenate([sess.run([OUTPUT], {INPUT: x[i:i + batch]})[0].reshape(-1)
                         for i in range(0, len(x), batch)]).astype(np.float64)


def write_onnx(model_name, variables, image_size, tta, path):
  """Writes the fp32 ONNX model of Flax `variables` of `model_name` to `path` (see the module doc)."""
  import onnx  # pylint: disable=g-import-not-at-top
  keras_ = keras_twin.keras()
  model = keras_twin.twin(model_name, variables, image_size, tta)
  spec = tf().TensorSpec([None, image_size, image_size, 3], tf().float32, name=INPUT)
  # tf2onnx deep-copies the whole graph, weights included, before each of its optimizer passes so that a failing
  # pass can be skipped; without the copies a failing pass fails the export (refused with one line), and the
  # export is checked against the JAX path either way. The user's own setting is kept.
  ours = _CATCH_ERRORS not in os.environ
  os.environ.setdefault(_CATCH_ERRORS, "FALSE")
  try:
    model.export(path, format="onnx", input_signature=[spec], verbose=False)
  finally:
    if ours:
      os.environ.pop(_CATCH_ERRORS, None)
  keras_.backend.clear_session()
  proto = onnx.load(path)
  graph = proto.graph
  if len(graph.input) != 1 or len(graph.output) != 1:
    raise InputError(f"{path}: the converter wrote {len(graph.input)} inputs and {len(graph.output)} outputs, "
                     "not 1 and 1")
  renames = {graph.input[0].name: INPUT, graph.output[0].name: OUTPUT}
  for node in graph.node:  # tf2onnx names them after TF tensors ("image:0", "Identity:0"): plain names instead.
    node.input[:] = [renames.get(n, n) for n in node.input]
    node.output[:] = [renames.get(n, n) for n in node.output]
  graph.input[0].name, graph.output[0].name = INPUT, OUTPUT
  for dim in (graph.input[0].type.tensor_type.shape.dim[0], graph.output[0].type.tensor_type.shape.dim[0]):
    dim.dim_param = "batch"
  onnx.checker.check_model(proto)
  onnx.save(proto, path)
  return path


class _Calibration:
  """onnxruntime.quantization's CalibrationDataReader over model inputs, a few images at a time."""

  def __init__(self, x, batch=8):
    self._batches = iter([{INPUT: x[i:i + batch]} for i in range(0, len(x), batch)])

  def get_next(self):
    return next(self._batches, None)


def calibration_count(image_size):
  """How many images calibrate int8 at `image_size`: CALIBRATION_IMAGES at 75x75, fewer as the image area grows
  (the calibration's memory grows with images x area), never under 8."""
  return int(min(CALIBRATION_IMAGES, max(_MIN_CALIBRATION_IMAGES, _CALIBRATION_PIXELS // (image_size * image_size))))


def quantize_int8(fp32_path, int8_path, calibration):
  """Static QDQ int8 quantization of `fp32_path` (per-channel int8 weights, uint8 activations whose ranges are
  the 99.999th percentile over the `calibration` model inputs) written to `int8_path`; returns how the ranges
  were calibrated (a sentence for the export's record).

  Percentile, not MinMax: on the demo run (847 validation images) MinMax lost 0.006-0.009 of validation AUC in
  all four settings tried, the percentile ranges -0.0003 to 0.006 (docs/inference.md). ONNX Runtime's
  histogram calibration keeps every calibration image's activations in memory, so their count stays small
  (`calibration_count`). It cannot bin a tensor whose values span almost nothing (numpy: "Too many bins for
  data range", seen on a randomly initialised InceptionResNetV2 at 299x299); MinMax ranges are used then, and
  the export's AUC check judges the result as any other."""
  from onnxruntime import quantization as q  # pylint: disable=g-import-not-at-top
  method = "99.999th percentile ranges"
  for calibrate in (q.CalibrationMethod.Percentile, q.CalibrationMethod.MinMax):
    try:
      q.quantize_static(fp32_path, int8_path, _Calibration(np.asarray(calibration, np.float32)),
                        quant_format=q.QuantFormat.QDQ, per_channel=True, activation_type=q.QuantType.QUInt8,
                        weight_type=q.QuantType.QInt8, calibrate_method=calibrate)
      return f"static QDQ, per-channel int8 weights, uint8 activations, {method}"
    except ValueError as e:
      if calibrate != q.CalibrationMethod.Percentile or "bins" not in str(e):
        raise
      method = f"MinMax ranges (the percentile histogram failed: {str(e).splitlines()[0]})"
  raise AssertionError("unreachable")


def run_batches(trained, side):
  """Yields (x float32 [n, S, S, 3], y float64 [n]) batches of the run's validation ("val") or training ("train")
  images in the run's evaluation preprocessing (no augmentation), each image once; batches, so a real fold
  never has to fit in memory at once."""
  from melanoma_jax.image import data as data_lib  # pylint: disable=g-import-not-at-top
  run = trained.run
  data = data_lib.resolve_data(run, trained.workdir)
  split = data_lib.make_split(run, data)
  if side == "train":  # The training rows in the validation role: read once each, as evaluation reads them.
    split = data_lib.Split(train_df=split.val_df, val_df=split.train_df)
  for batch in data_lib.make_pipeline(run, data, split).val_dataset():
    keep = batch["mask"].numpy() > 0
    if keep.any():
      yield batch["x"].numpy()[keep].astype(np.float32), batch["y"].numpy()[keep].astype(np.float64)


def run_images(trained, side, limit):
  """(x, y) of the first `limit` images of `run_batches(trained, side)`."""
  xs, ys, count = [], [], 0
  for x, y in run_batches(trained, side):
    xs.append(x)
    ys.append(y)
    count += len(x)
    if count >= limit:
      break
  if not xs:
    raise InputError(f"{trained.workdir}: the run's {side} images are missing; nothing to check the export on")
  return np.concatenate(xs)[:limit], np.concatenate(ys)[:limit]


def export(trained, out_dir, info, quantize="none", force=False, max_auc_drop=MAX_AUC_DROP):
  """Writes the ONNX export of `trained` (an `image.TrainedModel`) to `out_dir` and returns it.

  `out_dir` must be new, empty or an earlier ONNX export (`outputs.check_folder`); everything is written to a
  temporary sibling, checked, then installed (`outputs.install`). `info`: JSON-able facts recorded in MARKER.
  Refusals (InputError, one line): a model with no Keras twin, ONNX Runtime off the JAX path by more than
  TOLERANCE, an int8 model losing more than `max_auc_drop` of validation AUC (unless `force`).
  """
  import onnx  # pylint: disable=g-import-not-at-top
  import onnxruntime  # pylint: disable=g-import-not-at-top
  import tf2onnx  # pylint: disable=g-import-not-at-top
  from melanoma_jax import evaluation  # pylint: disable=g-import-not-at-top
  if quantize not in QUANTIZE:
    raise InputError(f"--quantize={quantize}: must be one of {', '.join(QUANTIZE)}")
  out_dir, tmp = outputs.staging(out_dir, MARKER, PLANNED)
  try:
    outputs.clear_staging(tmp)
    os.makedirs(tmp)
    fp32 = write_onnx(trained.run.model_name, trained.variables, trained.image_size, trained.tta,
                      os.path.join(tmp, MODEL))
    check_x, _ = run_images(trained, "val", CHECK_IMAGES)
    sess = session(fp32)
    diff = float(np.max(np.abs(probabilities(sess, check_x) - trained.score(check_x).probabilities)))
    if not diff <= TOLERANCE:
      raise InputError(f"--out={out_dir}: ONNX Runtime differs from the JAX path by {diff:.3g} (> {TOLERANCE}) on "
                       f"{len(check_x)} validation image(s); nothing written")
    record = dict(info, format="onnx", contract=contract(trained.image_size, trained.tta),
                  check={"images": len(check_x), "max_abs_diff": diff, "tolerance": TOLERANCE},
                  onnx=onnx.__version__, onnxruntime=onnxruntime.__version__, tf2onnx=tf2onnx.__version__,
                  exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat())
    if quantize == "int8":
      record["int8"] = _int8(trained, sess, fp32, os.path.join(tmp, INT8_MODEL), force, out_dir,
                             evaluation.roc_auc, max_auc_drop)
    del sess
    outputs.claim(tmp, MARKER, record, outputs.tree(tmp))
    outputs.install(tmp, out_dir, MARKER, "--out")
  except (ValueError, TypeError, OSError, RuntimeError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"--out={out_dir}: the ONNX export failed: {(str(e).splitlines() or [type(e).__name__])[0]}"
                     ) from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir


def _int8(trained, sess, fp32, int8_path, force, out_dir, roc_auc, max_auc_drop):
  """Quantizes, measures both validation AUCs and refuses a drop over `max_auc_drop` unless `force`."""
  calibration, _ = run_images(trained, "train", calibration_count(trained.image_size))
  method = quantize_int8(fp32, int8_path, calibration)
  int8_sess = session(int8_path)
  scored = [(y, probabilities(sess, x), probabilities(int8_sess, x)) for x, y in run_batches(trained, "val")]
  val_y, fp32_probs, int8_probs = (np.concatenate(part) for part in zip(*scored))
  if len(set(val_y.tolist())) < 2:
    raise InputError(f"--out={out_dir}: the validation fold holds one class; int8's AUC cannot be measured")
  auc_fp32, auc_int8 = float(roc_auc(val_y, fp32_probs)), float(roc_auc(val_y, int8_probs))
  drop = auc_fp32 - auc_int8
  if drop > max_auc_drop and not force:
    raise InputError(f"--quantize=int8: validation AUC drops from {auc_fp32:.4f} (fp32) to {auc_int8:.4f} (int8), "
                     f"more than {max_auc_drop}; nothing written (--force writes it anyway)")
  return {"model": INT8_MODEL,
          "method": method,
          "calibration_images": len(calibration), "validation_images": len(val_y), "val_auc_fp32": auc_fp32,
          "val_auc_int8": auc_int8, "auc_drop": drop, "max_auc_drop": max_auc_drop,
          "max_abs_diff_vs_fp32": float(np.max(np.abs(int8_probs - fp32_probs))),
          "forced": bool(force and drop > max_auc_drop)}
