"""What an image must pass before it is decoded: its size, its format and its pixel count, the last two read
from its first bytes (the JPEG or PNG header), never from decoding it. One implementation, in TensorFlow ops,
serves the predict command (one file at a time) and the exported SavedModel's graph (a batch).

A JPEG or PNG of a few tens of KB can declare 20000x20000 pixels (1.2 GB once decoded to RGB, several GB as
the float image the resize reads); such an image is refused by its header. The limits:
* `max_file_mb` (predict and export --max_file_mb, default 50 MB): the predict command checks it from the
  file system before the file is read, and reads at most `max_bytes` + 1 bytes; the graph checks the length.
* `max_pixels` (--max_pixels, default 40 million, e.g. 7300x5500; the largest ISIC 2020 images are
  6000x4000): width x height from the header (PNG: the IHDR chunk's first 8 bytes; JPEG: the start-of-frame
  marker, read by `tf.image.extract_jpeg_shape`, which parses markers only).
Any other image format (GIF, WebP, BMP, TIFF, ICO) is named by its signature, whatever the file's extension,
instead of reaching a decoder that would misread it.

`errors` never fails: an image whose JPEG header cannot be parsed gets its reason, as every other, through a
`tf.data` pipeline that drops the failing elements (`ignore_errors`) and `collect`, which gathers what is left
(also used to decode a batch image by image without one broken image failing the others).
With these limits the predict command of the test's tiny model peaks at about 900 MB beside a 20000x20000
PNG bomb of about 50 KB; decoding a 10000x10000 one took 2.4 GB (`tests/test_inference_safety.py`).
"""
import dataclasses

from melanoma_jax.utils.tf_host import tf

MB = 1 << 20
DEFAULT_MAX_FILE_MB = 50
DEFAULT_MAX_PIXELS = 40_000_000
READ = ("JPEG", "PNG")
# First bytes of each format, first match wins; WebP is "RIFF", 4 bytes of length, then "WEBP".
SIGNATURES = ((0, b"\x89PNG\r\n\x1a\n", "PNG"), (0, b"\xff\xd8\xff", "JPEG"), (0, b"GIF8", "GIF"),
              (8, b"WEBP", "WebP"), (0, b"BM", "BMP"), (0, b"II*\x00", "TIFF"), (0, b"MM\x00*", "TIFF"),
              (0, b"\x00\x00\x01\x00", "ICO"))
_PAD = 32  # Zero bytes appended before reading fixed offsets: a short input then reads zeros, never fails.


@dataclasses.dataclass(frozen=True)
class Limits:
  """The largest file (MB of 2^20 bytes) and image (width x height) read; see the module doc."""
  max_file_mb: float = DEFAULT_MAX_FILE_MB
  max_pixels: int = DEFAULT_MAX_PIXELS

  @property
  def max_bytes(self):
    return int(self.max_file_mb * MB)

  def file_size_error(self, size):
    """"" or why a file of `size` bytes is not read."""
    return "" if size <= self.max_bytes else f"{size}{self._over_file_size}"

  @property
  def _over_file_size(self):
    return (f" bytes is over --max_file_mb={self.max_file_mb:g} ({self.max_bytes} bytes); "
            "raise it to read this file")

  def errors(self, image_bytes):
    """TF: string [n] of encoded images -> string [n]: "" for an image to decode, else why not (one line)."""
    tf_ = tf()
    image_bytes = tf_.reshape(image_bytes, [-1])
    padded = tf_.strings.join([image_bytes, tf_.constant(b"\0" * _PAD)])
    length = tf_.strings.length(image_bytes)
    kind = tf_.fill(tf_.shape(image_bytes), "")
    for offset, signature, name in reversed(SIGNATURES):
      kind = tf_.where(tf_.strings.substr(padded, offset, len(signature)) == signature, name, kind)
    has_size, width, height = _dimensions(image_bytes, padded, kind)
    pixels = width * height
    as_text = tf_.strings.as_string
    reasons = [  # First true wins.
        (length == 0, tf_.fill(tf_.shape(kind), "empty file")),
        (length > self.max_bytes, tf_.strings.join([as_text(length), self._over_file_size])),
        (kind == "", tf_.fill(tf_.shape(kind), "not a decodable JPEG or PNG (unknown format)")),
        ((kind != "JPEG") & (kind != "PNG"),
         tf_.strings.join(["a ", kind, " image; only JPEG and PNG are read"])),
        (~has_size, tf_.strings.join(["not a decodable ", kind, " (no size in its header)"])),
        (pixels > self.max_pixels, tf_.strings.join([
            as_text(width), "x", as_text(height), " = ", as_text(pixels),
            f" pixels is over --max_pixels={self.max_pixels}; raise it to read this image"])),
    ]
    error = tf_.fill(tf_.shape(kind), "")
    for condition, reason in reversed(reasons):
      error = tf_.where(condition, reason, error)
    return error


def _dimensions(image_bytes, padded, kind):
  """TF: (whether the header gave a size, width, height), int64 [n] each, of the PNGs and JPEGs of a batch."""
  tf_ = tf()
  # A PNG's IHDR chunk: width and height, 4 big-endian bytes each, at bytes 16-23.
  raw = tf_.reshape(tf_.cast(tf_.io.decode_raw(tf_.strings.substr(padded, 16, 8), tf_.uint8), tf_.int64), [-1, 8])
  big_endian = lambda b: ((b[:, 0] * 256 + b[:, 1]) * 256 + b[:, 2]) * 256 + b[:, 3]
  png = (kind == "PNG") & (tf_.strings.substr(padded, 12, 4) == "IHDR")
  jpegs = tf_.where(kind == "JPEG")[:, 0]
  headers = tf_.data.Dataset.from_tensor_slices((jpegs, tf_.gather(image_bytes, jpegs))).map(
      lambda i, b: (i, tf_.cast(tf_.image.extract_jpeg_shape(b), tf_.int64))).ignore_errors()
  index, shapes = collect(headers, (tf_.TensorSpec([], tf_.int64), tf_.TensorSpec([3], tf_.int64)))
  n = tf_.shape(image_bytes, out_type=tf_.int64)
  scatter = lambda values: tf_.scatter_nd(index[:, None], values, n)
  jpeg = scatter(tf_.ones_like(index, tf_.bool))
  width = tf_.where(png, big_endian(raw[:, :4]), scatter(shapes[:, 1]))
  height = tf_.where(png, big_endian(raw[:, 4:]), scatter(shapes[:, 0]))
  return png | jpeg, width, height


def collect(dataset, spec):
  """TF: every element of `dataset` (elements of TensorSpecs `spec`), stacked; a leading dimension of 0 if it
  has none (`get_single_element` of the one batch, or of an empty stand-in)."""
  tf_ = tf()
  empty = tf_.nest.map_structure(lambda s: tf_.zeros([0] + s.shape.as_list(), s.dtype), spec)
  return dataset.batch(1 << 30).concatenate(tf_.data.Dataset.from_tensors(empty)).take(1).get_single_element()
