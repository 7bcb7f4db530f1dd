"""Image files -> model inputs, exactly as the run's evaluation makes them from the same encoded bytes.

`preprocess` is the pipeline's own evaluation preprocessing (`pipeline.decode_image`, then
`pipeline.scale_for_inception`), so a file holding the JPEG bytes of a TFRecord gives bit-identical model
inputs. TensorFlow's JPEG decoder also decodes PNG (grey, RGBA: alpha dropped) and greyscale or CMYK JPEGs to
RGB, so one function serves every accepted file, the predict command and the exported SavedModel's graph.
"""
import os
import re

import numpy as np

from melanoma_jax.data import pipeline as pipeline_lib
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(folder):
  """Sorted paths of the JPEG and PNG files (by extension, any case) directly inside `folder`."""
  if not os.path.isdir(folder):
    raise InputError(f"{folder}: image folder not found")
  names = sorted(n for n in os.listdir(folder) if n.lower().endswith(EXTENSIONS)
                 and os.path.isfile(os.path.join(folder, n)))
  if not names:
    raise InputError(f"{folder}: no JPEG or PNG files ({', '.join(EXTENSIONS)})")
  return [os.path.join(folder, n) for n in names]


def preprocess(image_bytes, image_size: int):
  """TF: encoded JPEG/PNG bytes (scalar string) -> float32 [image_size, image_size, 3] in [-1, 1]."""
  return pipeline_lib.scale_for_inception(pipeline_lib.decode_image(image_bytes, image_size))


class Reader:
  """Reads image files into model inputs one at a time; a file that cannot be read gives its reason."""

  def __init__(self, image_size: int):
    self.image_size = int(image_size)
    tf_ = tf()
    self._preprocess = tf_.function(lambda b: preprocess(b, self.image_size),
                                    input_signature=[tf_.TensorSpec([], tf_.string)])

  def decode(self, data: bytes):
    """float32 [S, S, 3] in [-1, 1] of encoded bytes; raises TF's InvalidArgumentError if undecodable."""
    return self._preprocess(tf().constant(data)).numpy()

  def read(self, path):
    """(float32 [S, S, 3] in [-1, 1], "") or (None, one-line reason)."""
    try:
      with open(path, "rb") as f:
        data = f.read()
    except OSError as e:
      return None, e.strerror or str(e)
    if not data:
      return None, "empty file"
    try:
      return self.decode(data), ""
    except (tf().errors.InvalidArgumentError, tf().errors.UnknownError) as e:
      message = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message or str(e)).strip().splitlines()
      return None, f"not a decodable JPEG or PNG ({message[0] if message else type(e).__name__})"


def stack(images, image_size: int):
  """[N, S, S, 3] float32 of a list of arrays (an empty list gives N = 0)."""
  if not images:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  return np.stack(images).astype(np.float32, copy=False)
