"""The image generators by name: which module draws a set's images, and which sets each one can draw.

"dermoscopy" (`render`, the default): dermoscopy-like images, ordinary or ugly-duckling sets. "plain"
(`plain`): flat lesions on one skin colour, an ugly-duckling set by construction, so it draws only
ugly_duckling=1.0. A name not in GENERATORS, or a combination a generator cannot draw, is refused in one line.
"""
from melanoma_jax.data.synthetic import plain
from melanoma_jax.data.synthetic import render
from melanoma_jax.utils.errors import InputError

DEFAULT = "dermoscopy"
GENERATORS = (DEFAULT, "plain")


def check(generator, ugly_duckling):
  """InputError unless `generator` is known and can draw a set of this `ugly_duckling`."""
  if generator not in GENERATORS:
    raise InputError(f"generator must be one of {', '.join(GENERATORS)}, got {generator!r}")
  if generator == "plain" and float(ugly_duckling) != 1.0:
    raise InputError(f"generator 'plain' draws only ugly-duckling sets (every melanoma a stranger's typical nevus): "
                     f"set ugly_duckling=1.0, got {ugly_duckling}")


def render_image(generator, seed, image_name, patient_id, malignant, size, ugly_duckling=0.0):
  """JPEG bytes of one metadata row's image by `generator`, a pure function of its arguments."""
  check(generator, ugly_duckling)
  if generator == "plain":
    return plain.render_plain_image(seed, image_name, patient_id, malignant, size)
  return render.render_image(seed, image_name, patient_id, malignant, size, ugly_duckling)
