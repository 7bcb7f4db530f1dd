"""Predict a folder of images with a trained run or ensemble, optionally with saliency maps or metadata.

  python -m melanoma_jax.predict --workdir=runs/demo --images=photos/ --out=preds.csv
  python -m melanoma_jax.predict --workdir=runs/demo --images=photos/ --out=preds.csv --saliency=maps/
  python -m melanoma_jax.predict --workdir=runs/ensemble --images=photos/ --out=preds.csv [--metadata=meta.csv]

Loads the run's best checkpoint and the config the run recorded (no --config), reads every JPEG and PNG in
--images (greyscale, RGBA and CMYK converted to RGB), preprocesses each as the run's own evaluation does and
predicts with the run's TTA setting. --out gets one row per file of --images (hidden files, CSV files and
folders aside): image (file name), probability, error. Other formats (GIF, WebP, BMP, named by their bytes,
not their extension), links leading out of the folder and files over the size limits get their error row.
Every text field is quoted, so any file name reads back whole; a name beginning with =, +, -, @, a tab, a
carriage return or ' is written with a leading ' (a spreadsheet shows it as text, never runs it as a
formula): the file name is the image value with one leading ' removed (inference/preds_csv.py).
--out and --saliency never write over an input, the workdir's files or a file this command did not write
(inference/outputs.py); a path that cannot be written is refused before the model loads.
A file that cannot be read gets an empty probability and the reason (and a warning); the others are still
predicted. A saliency map that cannot be written (a name too long) sets its row's error, the probability
kept. Exit code 0 when at least one image was predicted, 1 otherwise or on bad input (one error line).

--engine=onnx --exported=DIR predicts with ONNX Runtime from an ONNX export (python -m melanoma_jax.export
--format=onnx; --onnx_model=int8 for its int8 model) instead of --workdir: the same Reader, rows and error rows;
saliency maps and --metadata need the JAX engine, and the TTA is the one the export holds.

An ensemble workdir averages its fold models' probabilities. With --metadata (ensembles only) it also fuses
the metadata as the ensemble's test stage does (inference/ensemble.py): columns pred_image (fold mean) and
pred_fused (calibrated fusion) are added and probability is pred_fused; a file without a metadata row gets
an empty probability, its pred_image and the reason.
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before anything imports TensorFlow.

from absl import app, flags, logging

from melanoma_jax.utils import cli

FLAGS = flags.FLAGS

SALIENCY_MARKER = ".melanoma_jax_saliency.json"
_PROGRESS_EVERY_S = 10.0


def _warn(message):
  print(f"warning: {message}", file=sys.stderr, flush=True)


def shown(name):
  """`name` for a terminal line: as is if printable, else Python's quoted form (a newline or an escape
  sequence in a file name cannot break or forge the line)."""
  return name if name.isprintable() else repr(name)


def saliency_path(folder, name):
  """`name`.png in `folder`: the file name kept whole, so a.jpg and a.png get different maps."""
  return os.path.join(folder, f"{name}.png")


def predict_folder(predictor, paths, saliency_dir="", metadata=None, progress=_warn, limits=None):
  """Rows {image, probability, error} for `paths`, in order; saliency PNGs into `saliency_dir` if set.

  `predictor`: an `image.TrainedModel` or an ensemble's predictor (`inference.loading.load_predictor`).
  `metadata`: an ensemble's --metadata table (`predictor.read_metadata`): the rows also get pred_image and
  pred_fused, and probability is pred_fused (fusion needs every image of a patient, so it runs once all
  files are read; only the fold models' probabilities and embeddings are kept meanwhile).
  Files are read and predicted a global batch at a time (the devices' fill), so memory stays bounded;
  `limits` (`inference.limits.Limits`, default its defaults) refuses a file by its size or header first.
  """
  from melanoma_jax.inference import images as images_lib  # pylint: disable=g-import-not-at-top
  reader = images_lib.Reader(predictor.image_size, limits)
  rows, done, start, last = [], 0, time.time(), time.time()
  kept = []  # With metadata: (row indices, the fold models' outputs) per batch.
  for begin in range(0, len(paths), predictor.global_batch):
    chunk = paths[begin:begin + predictor.global_batch]
    arrays, readable = [], []
    for path in chunk:
      name = os.path.basename(path)
      array, error = reader.read(path)
      if array is None:
        _warn(f"{shown(path)}: {error}; skipped")
        rows.append({"image": name, "probability": None, "error": error})
      else:
        arrays.append(array)
        readable.append(len(rows))
        rows.append({"image": name, "probability": None, "error": ""})
    x = images_lib.stack(arrays, predictor.image_size)
    if metadata is not None:
      if len(x):
        kept.append((readable, predictor.score_folds(x)))
    else:
      probs = predictor.score(x).probabilities if len(x) else []
      for row_index, prob in zip(readable, probs):
        rows[row_index]["probability"] = float(prob)
    if saliency_dir and len(x):
      _write_saliency(predictor, x, [rows[i] for i in readable], saliency_dir)
    done += len(chunk)
    if progress and time.time() - last > _PROGRESS_EVERY_S and done < len(paths):
      rate = done / (time.time() - start)
      progress_line = (f"{done}/{len(paths)} images, {rate:.1f} images/s, "
                       f"ETA {time.strftime('%H:%M:%S', time.gmtime((len(paths) - done) / rate))}")
      print(progress_line, file=sys.stderr, flush=True)
      last = time.time()
  if metadata is not None:
    _fuse(predictor, rows, kept, metadata)
  return rows


def _fuse(predictor, rows, kept, metadata):
  """Fills pred_image, pred_fused and probability (= pred_fused) of the readable rows (see predict_folder)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  for row in rows:
    row.update(pred_image=None, pred_fused=None)
  if not kept:
    return
  indices = [i for readable, _ in kept for i in readable]
  per_fold = [(np.concatenate([outs[k].probabilities for _, outs in kept]),
               np.concatenate([outs[k].embeddings for _, outs in kept])) for k in range(len(kept[0][1]))]
  fused = predictor.fuse([rows[i]["image"] for i in indices], per_fold, metadata)
  for i, pred_image, pred_fused, error in zip(indices, fused["pred_image"], fused["pred_fused"], fused["error"]):
    rows[i]["pred_image"] = float(pred_image)
    if error:
      _warn(f"{shown(rows[i]['image'])}: {error}; not fused")
      rows[i]["error"] = error
    else:
      rows[i]["pred_fused"] = rows[i]["probability"] = float(pred_fused)


def _write_saliency(predictor, x, rows, folder):
  """Writes each row's map; a map that cannot be written (name too long, disk full) sets that row's error,
  its probability kept, and the other maps and rows go on."""
  from melanoma_jax.inference import saliency  # pylint: disable=g-import-not-at-top
  cams = saliency.grad_cam(predictor.model, predictor.variables, x)
  smooth = saliency.smoothgrad(predictor.model, predictor.variables, x)
  for image, cam, sg, row in zip(x, cams, smooth, rows):
    title = f"{row['image']}: probability {row['probability']:.3f}" if row["probability"] is not None else ""
    try:
      saliency.save_figure(saliency_path(folder, row["image"]), image, cam, sg, title)
    except (OSError, ValueError) as e:
      reason = e.strerror if isinstance(e, OSError) and e.strerror else (str(e).splitlines() or [type(e).__name__])[0]
      row["error"] = f"saliency map not written ({reason})"
      _warn(f"{shown(row['image'])}: {row['error']}")


def run(workdir, images_dir, out, saliency_dir="", metadata="", tta=None, limits=None, require_finished=False,
        engine="jax", exported="", onnx_model="fp32", dtype=None):
  """The command: returns the rows written to `out` (raises RunError on bad input). `limits`: see
  predict_folder. The workdir is read under its shared lock: refused while a run trains there. `engine`
  "onnx": ONNX Runtime on export `exported`'s `onnx_model` ("fp32" or "int8"), no workdir. `dtype` None: the
  run's compute dtype, else "float32" or "bfloat16"."""
  from melanoma_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  cli.check_engine(engine, workdir, exported,
                   (("--saliency", saliency_dir), ("--metadata", metadata), ("--tta", tta is not None),
                    ("--require_finished", require_finished), ("--dtype", dtype is not None)),
                   "takes --exported=DIR (an ONNX export)")
  if engine == "onnx":
    return _run_onnx(exported, onnx_model, images_dir, out, limits)
  with workdir_lib.read_lock(workdir):
    return _run(workdir, images_dir, out, saliency_dir, metadata, tta, limits, require_finished, dtype)


def _run(workdir, images_dir, out, saliency_dir, metadata, tta, limits, require_finished, dtype):
  from melanoma_jax.inference import images as images_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import loading  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import outputs  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  paths = images_lib.list_images(images_dir)
  # Every refusal below comes before the slow load: outputs first, so nothing is computed for nothing.
  protected = outputs.Protected(workdir, images_dir, inputs=paths + ([metadata] if metadata else []))
  outputs.check_file(out, "--out", protected)
  planned, ours = [os.path.basename(saliency_path("", os.path.basename(p))) for p in paths], set()
  if saliency_dir:
    ours = outputs.check_folder(saliency_dir, SALIENCY_MARKER, "--saliency", protected, planned)
    if outputs.is_inside(out, saliency_dir):
      raise InputError(f"--out={out}: is inside the --saliency folder {saliency_dir}; choose a path outside it")
  kind = loading.kind_of(workdir)
  if saliency_dir and kind == loading.ENSEMBLE:
    raise loading.one_model_only(workdir, "saliency maps")
  if metadata and kind != loading.ENSEMBLE:
    raise InputError("--metadata is only used by ensemble workdirs; this workdir holds a single image model")
  predictor = loading.load_predictor(workdir, tta=tta, dtype=dtype)
  loading.announce(workdir, predictor, require_finished)
  # Only ensembles fuse metadata: read and checked before any image is read.
  table = predictor.read_metadata(metadata) if metadata else None
  info = {"workdir": os.path.abspath(workdir)}
  if saliency_dir:  # Listed before they are written: a run killed half-way leaves only listed files.
    outputs.claim(saliency_dir, SALIENCY_MARKER, info, set(ours) | set(planned))
  logging.info("predicting %d file(s) of %s with %s", len(paths), images_dir, predictor.description)
  rows = predict_folder(predictor, paths, saliency_dir, metadata=table, limits=limits)
  if saliency_dir:
    outputs.claim(saliency_dir, SALIENCY_MARKER, info,
                  [n for n in set(ours) | set(planned) if os.path.exists(os.path.join(saliency_dir, n))])
  return _write(rows, ["image", "probability", "error"] + (["pred_image", "pred_fused"] if metadata else []), out)


def _write(rows, columns, out):
  from melanoma_jax.inference import preds_csv  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  try:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    preds_csv.write(rows, columns, out)
  except OSError as e:
    raise InputError(f"--out={out}: cannot be written ({e.strerror or e})") from None
  return rows


def _run_onnx(exported, onnx_model, images_dir, out, limits):
  from melanoma_jax.inference import images as images_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import onnx_predictor, outputs  # pylint: disable=g-import-not-at-top
  paths = images_lib.list_images(images_dir)
  # The export folder is protected as a workdir is: preds.csv never lands among its checked files.
  outputs.check_file(out, "--out", outputs.Protected(exported, images_dir, inputs=paths))
  predictor = onnx_predictor.load(exported, onnx_model)
  print(predictor.description, file=sys.stderr, flush=True)
  return _write(predict_folder(predictor, paths, limits=limits), ["image", "probability", "error"], out)


def command(workdir, images_dir, out, saliency_dir="", metadata="", tta="run", limits=None, require_finished=False,
            engine="jax", exported="", onnx_model="fp32", dtype="run"):
  """The command line's work and messages; returns its exit code (0: at least one image predicted)."""
  from melanoma_jax.utils.errors import RunError  # pylint: disable=g-import-not-at-top
  start = time.time()
  try:
    rows = run(workdir, images_dir, out, saliency_dir, metadata, cli.TTA_CHOICES[tta], limits, require_finished, engine,
               exported, onnx_model, cli.DTYPE_CHOICES[dtype])
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    return e.exit_code
  except OSError as e:  # A file system failure no check foresaw (a disk filling up): one line, not a traceback.
    print(f"error: {shown(e.filename or '')}: {e.strerror or e}", file=sys.stderr)
    return 1
  predicted = sum(r["probability"] is not None for r in rows)
  print(f"predicted {predicted} of {len(rows)} image(s) in {time.time() - start:.0f} s; wrote {out}"
        + (f" and saliency maps in {saliency_dir}" if saliency_dir else ""))
  if not predicted:
    print("error: no image could be read", file=sys.stderr)
    return 1
  return 0


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  from melanoma_jax.inference import limits  # pylint: disable=g-import-not-at-top
  sys.exit(command(FLAGS.workdir, FLAGS.images, FLAGS.out, FLAGS.saliency, FLAGS.metadata, FLAGS.tta,
                   limits.Limits(FLAGS.max_file_mb, FLAGS.max_pixels), FLAGS.require_finished, FLAGS.engine,
                   FLAGS.exported, FLAGS.onnx_model, FLAGS.dtype))


def _define_flags():
  """The command's flags, defined only when it runs as a command (the module stays importable beside
  other commands)."""
  flags.DEFINE_string("workdir", "", "A trained run's or ensemble's directory (main.py --workdir); --engine=jax.")
  flags.DEFINE_enum("engine", "jax", ["jax", "onnx"], "jax: the run's checkpoint; onnx: ONNX Runtime on --exported.")
  flags.DEFINE_string("exported", "", "An ONNX export's folder (python -m melanoma_jax.export --format=onnx).")
  flags.DEFINE_enum("onnx_model", "fp32", ["fp32", "int8"], "Which model of --exported ONNX Runtime runs.")
  flags.DEFINE_string("images", None, "Folder of .jpg/.jpeg/.png files to predict.")
  flags.DEFINE_string("out", None, "CSV to write: image, probability, error (+ pred_image, pred_fused).")
  flags.DEFINE_string("saliency", "", "Folder for one Grad-CAM + SmoothGrad PNG per image ('' = none).")
  flags.DEFINE_string("metadata", "", "Per-image metadata CSV (image_name or image, patient_id, sex, age_approx, "
                      "anatom_site_general_challenge), for ensemble workdirs: fused as the ensemble's test rows.")
  cli.define_tta_flag()
  cli.define_dtype_flag()
  from melanoma_jax.inference import limits  # pylint: disable=g-import-not-at-top
  cli.define_reader_flags(limits.DEFAULT_MAX_FILE_MB, limits.DEFAULT_MAX_PIXELS, over="gets its error row",
                          uses="predicts with")
  flags.mark_flags_as_required(["images", "out"])


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
