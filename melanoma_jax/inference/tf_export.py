"""A run's model as a TensorFlow SavedModel: encoded image bytes in, malignancy probabilities out.

The network is the Flax model itself, converted with `jax.experimental.jax2tf` (StableHLO inside a TF
`XlaCallModule` op, batch dimension polymorphic), with the run's weights as TF variables and BatchNorm in
inference mode; the preprocessing in front of it is the pipeline's own TF code (`images.preprocess`). So
there is no second implementation of either in TensorFlow.

Signature `serving_default`: `image_bytes` (string [batch], JPEG or PNG, any batch size, 0 included) ->
`probability` (float32 [batch]; with the run's TTA setting, the mean over the image and its two flips) and
`error` (string [batch]). Each image is checked by its header against the export's limits (`limits.py`:
size, format, pixel count) before it is decoded, and decoded on its own: an image that is refused or cannot
be decoded gets probability NaN and its reason in `error` ("" for the others), and the rest of the batch is
scored as if it were alone.
"""
import contextlib
import datetime
import shutil
from typing import Sequence

import jax

from melanoma_jax import image
from melanoma_jax.inference import images
from melanoma_jax.inference import limits as limits_lib
from melanoma_jax.inference import outputs
from melanoma_jax.training import steps
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

MARKER = "melanoma_jax_export.json"
INPUT = "image_bytes"  # TF Serving's REST API base64-decodes {"b64": ...} values; "_bytes" is its convention.
OUTPUT = "probability"
ERROR = "error"
UNDECODABLE = "not a decodable JPEG or PNG"
PLATFORMS = ("cpu", "cuda")
# What tf.saved_model.save writes for this module (checked against the folder's own files before the work).
PLANNED = ("saved_model.pb", "fingerprint.pb", "variables/variables.index",
           "variables/variables.data-00000-of-00001")


@contextlib.contextmanager
def max_compatibility_stablehlo():
  """Serialise StableHLO for the oldest consumers StableHLO still supports, while the block runs.

  JAX serialises StableHLO for consumers at most about four weeks older than itself
  (`StablehloCompatibilityRequirement.WEEK_4` in jax/_src/export/_export.py, `_module_to_bytecode`) and
  offers no public setting. TensorFlow's `XlaCallModule` then fails on anything much older: TF 2.21 cannot
  load a jax 0.12 SavedModel ("failed to deserialize portable artifact using StableHLO_v1.13.7"). With
  `MAX` compatibility (StableHLO's oldest supported version) the same SavedModel loads in TF 2.21 and
  matches JAX; it should load in any TF whose StableHLO is within StableHLO's compatibility window (about
  a year back from the JAX release). Patches the `hlo` module `_export` reads, only inside the block.
  """
  from jax._src.export import _export  # pylint: disable=g-import-not-at-top
  hlo = _export.hlo

  class _MaxCompatibilityHlo:

    def __getattr__(self, name):
      return getattr(hlo, name)

    @staticmethod
    def get_version_from_compatibility_requirement(_):
      return hlo.get_version_from_compatibility_requirement(hlo.StablehloCompatibilityRequirement.MAX)

  _export.hlo = _MaxCompatibilityHlo()
  try:
    yield
  finally:
    _export.hlo = hlo


def serving_module(trained: image.TrainedModel, platforms: Sequence[str] = PLATFORMS,
                   limits: limits_lib.Limits = limits_lib.Limits()):
  """A tf.Module with the `serve` tf.function (see the module docstring) for `trained`'s model.

  The model runs with XLA's plain ops (`kernels="xla"`: the same values, and portable to any platform).
  """
  tf_ = tf()
  from jax.experimental import jax2tf  # pylint: disable=g-import-not-at-top
  model = trained.model.clone(kernels="xla") if hasattr(trained.model, "kernels") else trained.model
  step = steps.make_predict_step(model, tta=trained.tta)
  size = trained.image_size

  def probabilities(weights, x):
    return step(image.ModelWeights(weights["params"], weights.get("batch_stats", {})), {"x": x})

  converted = jax2tf.convert(probabilities, polymorphic_shapes=[None, f"(b, {size}, {size}, 3)"],
                             with_gradient=False, native_serialization_platforms=tuple(platforms))
  module = tf_.Module()
  weights = tf_.nest.map_structure(lambda a: tf_.Variable(a, trainable=False), trained.variables)
  module.weights = tf_.nest.flatten(weights)  # Tracked, so the SavedModel stores them.

  @tf_.function(autograph=False, input_signature=[tf_.TensorSpec([None], tf_.string, name=INPUT)])
  def serve(image_bytes):
    n = tf_.shape(image_bytes, out_type=tf_.int64)
    errors = limits.errors(image_bytes)
    passed = tf_.where(errors == "")[:, 0]
    decoded = tf_.data.Dataset.from_tensor_slices((passed, tf_.gather(image_bytes, passed))).map(
        lambda i, b: (i, images.preprocess(b, size))).ignore_errors()  # A broken image drops out alone.
    index, x = limits_lib.collect(decoded, (tf_.TensorSpec([], tf_.int64),
                                            tf_.TensorSpec([size, size, 3], tf_.float32)))
    probs = tf_.cond(tf_.shape(index)[0] > 0, lambda: converted(weights, x), lambda: tf_.zeros([0], tf_.float32))
    mark = lambda rows: tf_.scatter_nd(rows[:, None], tf_.ones_like(rows, tf_.bool), n)
    errors = tf_.where(mark(passed) & ~mark(index), UNDECODABLE, errors)
    probs = tf_.tensor_scatter_nd_update(tf_.fill(n, float("nan")), index[:, None], tf_.reshape(probs, [-1]))
    return {OUTPUT: tf_.ensure_shape(probs, [None]), ERROR: tf_.ensure_shape(errors, [None])}

  module.serve = serve
  return module


def export(trained: image.TrainedModel, out_dir, info, platforms: Sequence[str] = PLATFORMS,
           limits: limits_lib.Limits = limits_lib.Limits()):
  """Writes the SavedModel of `trained` to `out_dir` and returns it.

  `out_dir` must be new, empty or an earlier export (`outputs.check_folder`): the SavedModel is written to a
  temporary sibling first, then renamed into place (a new or empty folder) or installed over the files the
  earlier export's marker lists (`outputs.install`: a user's files beside them stay).
  `info`: JSON-able facts (source workdir, checkpoint) recorded in `out_dir`/MARKER with the versions and the
  list of files written.
  """
  tf_ = tf()
  out_dir, tmp = outputs.staging(out_dir, MARKER, PLANNED)
  try:
    outputs.clear_staging(tmp)
    module = serving_module(trained, platforms, limits)
    with max_compatibility_stablehlo():
      concrete = module.serve.get_concrete_function()
      tf_.saved_model.save(module, tmp, signatures={"serving_default": concrete})
    record = dict(info, image_size=trained.image_size, tta=trained.tta, input=INPUT, output=OUTPUT, error=ERROR,
                  max_file_mb=limits.max_file_mb, max_pixels=limits.max_pixels,
                  platforms=list(platforms), jax=jax.__version__, tensorflow=tf_.__version__,
                  exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat())
    outputs.claim(tmp, MARKER, record, outputs.tree(tmp))
    outputs.install(tmp, out_dir, MARKER, "--out")
  except (tf_.errors.OpError, ValueError, TypeError, OSError) as e:
    if isinstance(e, InputError):
      raise
    raise InputError(f"--out={out_dir}: the SavedModel export failed: {str(e).splitlines()[0]}") from e
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
