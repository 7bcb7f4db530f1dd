"""The commands' shared flag parsing: a bad flag or config override is one error line and exit status 1."""
import sys

from absl import flags


def parse_flags(argv):
  """absl's parsing of `argv` into the global FLAGS; on a bad, missing or unknown flag (or an override of a
  config field the config lacks) prints `error: ...` on one line and exits 1. For `app.run(flags_parser=)`."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # ml_collections: an override of a field the config lacks.
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    field = str(e.args[0] if e.args else e).strip("\"'")
    named = [o for o in overrides if o.split(".")[-1] == field]
    print(f"error: {named[0] if named else field}: no such config field", file=sys.stderr)
  except (flags.Error, TypeError, ValueError) as e:
    message = str(e).strip().splitlines()
    print(f"error: {message[0] if message else type(e).__name__}", file=sys.stderr)
  sys.exit(1)


def define_reader_flags(max_file_mb, max_pixels, over, uses):
  """The flags every command that reads a trained workdir and image bytes shares (predict, export): the image
  limits (`max_file_mb`, `max_pixels`: their defaults; `over`: what becomes of an image over them) and
  --require_finished (`uses`: what the command does with an unfinished run's best checkpoint)."""
  flags.DEFINE_float("max_file_mb", max_file_mb, f"Largest image file read (MB); a larger one {over}.",
                     lower_bound=0)
  flags.DEFINE_integer("max_pixels", max_pixels, "Largest image decoded (width x height, read from the JPEG/PNG "
                       f"header before decoding); a larger one {over}.", lower_bound=1)
  flags.DEFINE_bool("require_finished", False, "Refuse a run that has not finished training (by default it "
                    f"{uses} the best checkpoint so far and says so).")


# --tta of the commands that score images: "run" keeps the run's own views, the rest force a number of views
# (config.tta's: 1, 2, 3, 8; "on" is 3, the flips, "off" 1).
TTA_CHOICES = {"run": None, "on": 3, "off": 1, "1": 1, "2": 2, "3": 3, "8": 8}


# --dtype of the commands that score images: "run" keeps the run's compute dtype (config.model.dtype).
# Never changed for the user: bfloat16 moves probabilities by rounding, so the run's validated operating
# points no longer hold exactly, and on a CPU it was measured no faster than float32 (docs/performance.md).
DTYPE_CHOICES = {"run": None, "float32": "float32", "bfloat16": "bfloat16"}


def define_dtype_flag():
  flags.DEFINE_enum("dtype", "run", list(DTYPE_CHOICES),
                    "Compute dtype: the run's (run), or float32 / bfloat16 (parameters stay float32).")


def check_engine(engine, workdir, exported, refused_by_onnx, onnx_use):
  """The one-line refusals of --engine, --workdir and --exported that do not fit together (predict and serve):
  `refused_by_onnx` [(flag, given)] are the other flags ONNX Runtime cannot honour; `onnx_use` says what
  --engine=onnx does with its export ("takes --exported=DIR (...)")."""
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  if engine == "onnx":
    unused = [flag for flag, given in (("--workdir", workdir), *refused_by_onnx) if given]
    if unused:
      raise InputError(f"--engine=onnx {onnx_use}, not {', '.join(unused)}")
    if not exported:
      raise InputError("--engine=onnx needs --exported=DIR (python -m melanoma_jax.export --format=onnx)")
  elif engine != "jax":
    raise InputError(f"--engine={engine}: must be jax or onnx")
  elif exported:
    raise InputError("--exported is for --engine=onnx")
  elif not workdir:
    raise InputError("--workdir is required with --engine=jax")


def define_tta_flag():
  flags.DEFINE_enum("tta", "run", list(TTA_CHOICES),
                    "TTA views: as the run's evaluation (run), or a number of views (config.tta); on = 3, off = 1.")
