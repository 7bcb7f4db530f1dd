"""Export a trained run as a TensorFlow SavedModel for TensorFlow Serving, or as ONNX (docs/inference.md).

  python -m melanoma_jax.export --workdir=runs/demo --out=exported/demo
  python -m melanoma_jax.export --workdir=runs/demo --format=onnx --out=exported/demo_onnx [--quantize=int8]

--format=onnx writes model.onnx (preprocessed images in, probabilities out; `inference/onnx_export.py`) and
its input contract in melanoma_jax_onnx.json, after checking ONNX Runtime against the JAX path on the run's
own images; --quantize=int8 adds model.int8.onnx unless its validation AUC drops too far (--force).

Signature `serving_default`: `image_bytes` (a batch of encoded JPEG/PNG strings) -> `probability` (float32,
one per image) and `error` (string, one per image: "" or why that image got probability NaN: over
--max_file_mb or --max_pixels, read from its header before decoding; another format; not decodable),
decoding and preprocessing inside the graph as the run's evaluation does, with the run's best checkpoint and
TTA setting. --out must be new, empty or an earlier export, outside the workdir: an earlier
export's files (listed in its melanoma_jax_export.json) are replaced, files a user added beside them are kept.
"""
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before anything imports TensorFlow.

from absl import app, flags, logging

from melanoma_jax.utils import cli

FLAGS = flags.FLAGS


def run(workdir, out, platforms=("cpu", "cuda"), limits=None, require_finished=False, fmt="saved_model",
        quantize="none", force=False, max_auc_drop=0.005):
  """The command: exports `workdir`'s model to `out` (raises RunError on bad input); `limits`: the
  SavedModel's per-image limits (`inference.limits.Limits`, default its defaults); `fmt` "saved_model" or
  "onnx" (`quantize`, `force`, `max_auc_drop`: ONNX only). The workdir is read under its shared lock: refused while a
  run trains there."""
  from melanoma_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  if fmt != "onnx" and (quantize != "none" or force):
    raise InputError("--quantize and --force are for --format=onnx")
  with workdir_lib.read_lock(workdir):
    if fmt == "onnx":
      return _run_onnx(workdir, out, require_finished, quantize, force, max_auc_drop)
    return _run(workdir, out, platforms, limits, require_finished)


def _load(workdir, out, exporter, what, require_finished):
  """(the trained model of `workdir`, the facts its export records) for `exporter` (`tf_export` or
  `onnx_export`); `what` names the export in the ensemble refusal."""
  from melanoma_jax.inference import loading, outputs  # pylint: disable=g-import-not-at-top
  # Before the slow load: never into the workdir, never over a file the export did not write.
  outputs.check_folder(out, exporter.MARKER, "--out", outputs.Protected(workdir), exporter.PLANNED)
  if loading.kind_of(workdir) == loading.ENSEMBLE:
    raise loading.one_model_only(workdir, what)
  trained = loading.load_predictor(workdir)
  loading.announce(workdir, trained, require_finished)
  # The checkpoint step and the run's operating point travel with the export: a server on it reports them.
  return trained, {"workdir": os.path.abspath(workdir), "model": trained.description,
                   "checkpoint_step": trained.checkpoint_step, "operating_point": loading.operating_point(workdir)}


def _run_onnx(workdir, out, require_finished, quantize, force, max_auc_drop):
  from melanoma_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  if quantize not in onnx_export.QUANTIZE:
    raise InputError(f"--quantize={quantize}: must be one of {', '.join(onnx_export.QUANTIZE)}")
  trained, info = _load(workdir, out, onnx_export, "an ONNX export", require_finished)
  return onnx_export.export(trained, out, info, quantize, force, max_auc_drop)


def _run(workdir, out, platforms, limits, require_finished):
  from melanoma_jax.inference import limits as limits_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import tf_export  # pylint: disable=g-import-not-at-top
  trained, info = _load(workdir, out, tf_export, "a SavedModel export", require_finished)
  return tf_export.export(trained, out, info, platforms, limits or limits_lib.Limits())


def main(argv):
  del argv
  from melanoma_jax.utils.errors import RunError  # pylint: disable=g-import-not-at-top
  start = time.time()
  logging.set_verbosity(logging.WARNING)
  try:
    from melanoma_jax.inference import limits  # pylint: disable=g-import-not-at-top
    path = run(FLAGS.workdir, FLAGS.out, tuple(FLAGS.platforms), limits.Limits(FLAGS.max_file_mb, FLAGS.max_pixels),
               FLAGS.require_finished, FLAGS.format, FLAGS.quantize, FLAGS.force, FLAGS.max_auc_drop)
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(e.exit_code)
  except OSError as e:  # A file system failure no check foresaw (a disk filling up): one line, not a traceback.
    print(f"error: {e.filename or FLAGS.out}: {e.strerror or e}", file=sys.stderr)
    sys.exit(1)
  print(f"exported {FLAGS.workdir} to {path} in {time.time() - start:.0f} s")


def _define_flags():
  """The command's flags, defined only when it runs as a command (the module stays importable beside
  other commands)."""
  flags.DEFINE_string("workdir", None, "A trained run's directory (main.py --workdir).")
  flags.DEFINE_string("out", None, "Export folder to write (SavedModel or ONNX).")
  flags.DEFINE_enum("format", "saved_model", ["saved_model", "onnx"], "SavedModel (bytes in, TF Serving) or ONNX "
                    "(preprocessed images in, ONNX Runtime).")
  flags.DEFINE_enum("quantize", "none", ["none", "int8"], "ONNX only: also write a static int8 (QDQ) model.")
  flags.DEFINE_bool("force", False, "ONNX only: write the int8 model even if its validation AUC drops too far.")
  flags.DEFINE_float("max_auc_drop", 0.005, "ONNX only: the most validation AUC int8 may lose against fp32.",
                    lower_bound=0.0)
  flags.DEFINE_list("platforms", ["cpu", "cuda"], "Platforms the SavedModel's XLA code is lowered for.")
  from melanoma_jax.inference import limits  # pylint: disable=g-import-not-at-top
  cli.define_reader_flags(limits.DEFAULT_MAX_FILE_MB, limits.DEFAULT_MAX_PIXELS,
                          over="gets probability NaN and its error in the SavedModel", uses="exports")
  flags.mark_flags_as_required(["workdir", "out"])


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
