"""Image files -> model inputs, exactly as the run's evaluation makes them from the same encoded bytes.

`preprocess` is the pipeline's own evaluation preprocessing (`pipeline.decode_image`, then
`pipeline.scale_for_inception`), so a file holding the JPEG bytes of a TFRecord gives bit-identical model
inputs. TensorFlow's JPEG decoder also decodes PNG (grey, RGBA: alpha dropped) and greyscale or CMYK JPEGs to
RGB, so one function serves every accepted file, the predict command and the exported SavedModel's graph.

`list_images` lists every file of a folder (not only .jpg/.jpeg/.png), and `Reader.read` gives each file
either its model input or a one-line reason: a link leading out of the folder, not a regular file, over the
size or pixel limits (`limits.py`, checked before the file is read or decoded), another image format, not
decodable. So every file gets its row and no file can take the memory of the others.
"""
import os
import re
import stat
from typing import Optional

import numpy as np
from absl import logging

from melanoma_jax.data import pipeline as pipeline_lib
from melanoma_jax.inference import limits as limits_lib
from melanoma_jax.utils import native_stderr
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

EXTENSIONS = (".jpg", ".jpeg", ".png")


def list_images(folder):
  """Sorted paths of the files directly inside `folder` to predict: every entry but folders, hidden files
  (a leading ".") and CSV files (the command's own output or metadata table often sits beside the images).
  Links are listed (the reader refuses those leading out of the folder)."""
  if not os.path.isdir(folder):
    raise InputError(f"{folder}: image folder not found")
  try:
    entries = os.listdir(folder)
  except OSError as e:
    raise InputError(f"{folder}: cannot list the image folder ({e.strerror or e})") from None
  names = sorted(n for n in entries if not n.startswith(".") and not n.lower().endswith(".csv")
                 and not os.path.isdir(os.path.join(folder, n)))
  if not names:
    raise InputError(f"{folder}: no files to predict (JPEG or PNG: {', '.join(EXTENSIONS)})")
  return [os.path.join(folder, n) for n in names]


def preprocess(image_bytes, image_size: int):
  """TF: encoded JPEG/PNG bytes (scalar string) -> float32 [image_size, image_size, 3] in [-1, 1]."""
  return pipeline_lib.scale_for_inception(pipeline_lib.decode_image(image_bytes, image_size))


class Reader:
  """Reads image files into model inputs one at a time; a file that cannot be read gives its reason."""

  def __init__(self, image_size: int, limits: Optional[limits_lib.Limits] = None):
    self.image_size = int(image_size)
    self.limits = limits or limits_lib.Limits()  # The file size and pixel limits, read before decoding.
    tf_ = tf()
    self._preprocess = tf_.function(lambda b: preprocess(b, self.image_size),
                                    input_signature=[tf_.TensorSpec([], tf_.string)])
    self._errors = tf_.function(self.limits.errors, input_signature=[tf_.TensorSpec([None], tf_.string)])

  def decode(self, data: bytes):
    """float32 [S, S, 3] in [-1, 1] of encoded bytes; raises TF's InvalidArgumentError if undecodable."""
    return self._preprocess(tf().constant(data)).numpy()

  def read(self, path):
    """(float32 [S, S, 3] in [-1, 1], "") or (None, one-line reason); see the module doc."""
    data, error = self.read_bytes(path)
    if error:
      return None, error
    return self.read_data(data, path)

  def read_data(self, data: bytes, name="image"):
    """(float32 [S, S, 3] in [-1, 1], "") or (None, one-line reason) of encoded bytes already in memory (the
    model server's requests): the size, format and pixel checks, then the decoding `read` gives a file.
    `name` only labels the decoder's warnings."""
    error = self.limits.file_size_error(len(data)) if data else "empty file"
    if error:
      return None, error
    with native_stderr.captured() as said:  # libjpeg's own lines name no file: they go with this one's.
      error = self._errors(tf().constant([data]))[0].numpy().decode("utf-8")
    if error:
      return None, _with_decoder_lines(error, said)
    try:
      with native_stderr.captured() as said:
        image = self.decode(data)
    except (tf().errors.InvalidArgumentError, tf().errors.UnknownError) as e:
      message = re.sub(r"\{\{[^}]*\}\}\s*", "", e.message or str(e)).strip().splitlines()
      return None, _with_decoder_lines(
          f"not a decodable JPEG or PNG ({message[0] if message else type(e).__name__})", said)
    if said.lines:  # Decoded, with the decoder's complaint (e.g. a truncated JPEG, its rest filled grey).
      logging.warning("%s: decoded, but the decoder said: %s", name, "; ".join(said.lines[:3]))
    return image, ""

  def read_bytes(self, path):
    """(the file's bytes, "") or (None, reason): links out of the file's folder, anything but a regular file
    and files over the size limit are refused before a byte is read."""
    real = os.path.realpath(path)
    folder = os.path.realpath(os.path.dirname(os.path.abspath(path)))
    if os.path.dirname(real) != folder and not real.startswith(folder + os.sep):
      return None, "a link out of the images folder; not followed"
    try:  # Non-blocking: opening a FIFO must not wait for a writer (regular files ignore the flag).
      with open(os.open(real, os.O_RDONLY | os.O_NONBLOCK), "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
          return None, "not a regular file"
        error = self.limits.file_size_error(info.st_size)
        if error:
          return None, error
        data = f.read(self.limits.max_bytes + 1)
    except OSError as e:
      return None, e.strerror or str(e)
    if not data:
      return None, "empty file"
    return data, self.limits.file_size_error(len(data))


def _with_decoder_lines(reason, said):
  """`reason`, with what the decoder printed while reading the file (its first lines) when it said anything."""
  return f"{reason}; the decoder said: {'; '.join(said.lines[:3])}" if said.lines else reason


def stack(images, image_size: int):
  """[N, S, S, 3] float32 of a list of arrays (an empty list gives N = 0)."""
  if not images:
    return np.zeros((0, image_size, image_size, 3), np.float32)
  return np.stack(images).astype(np.float32, copy=False)
