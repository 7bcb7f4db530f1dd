"""What an image file must pass before it is decoded: its size on disk, its format and its pixel count, the
last two read from the file's first bytes (the JPEG or PNG header), never from decoding it.

A JPEG or PNG of a few tens of KB can declare 20000x20000 pixels (1.2 GB once decoded to RGB, several GB as
the float image the resize reads); such a file is refused by its header. The limits:
* `max_file_mb` (predict --max_file_mb, default 50 MB): checked from the file system before the file is
  read; at most `max_bytes` + 1 bytes are ever read.
* `max_pixels` (predict --max_pixels, default 40 million, e.g. 7300x5500; the largest ISIC 2020 images are
  6000x4000): width x height from the header (PNG: IHDR; JPEG: the first start-of-frame marker, found by
  PIL's JPEG header parser, which reads markers only).
With them the predict command of the test's tiny model peaks at about 900 MB beside a 20000x20000 PNG bomb of
about 50 KB; decoding a 10000x10000 one took 2.4 GB (`tests/test_inference_safety.py`, peak RSS bounded).
A file whose first bytes are another image format (GIF, WebP, BMP, TIFF) is named as such, whatever its
extension, instead of reaching a decoder that would misread it.
"""
import dataclasses
import io
import warnings

MB = 1 << 20
DEFAULT_MAX_FILE_MB = 50
DEFAULT_MAX_PIXELS = 40_000_000
READ = ("JPEG", "PNG")
_SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
               (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x01\x00", "ICO"))


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
    if size <= self.max_bytes:
      return ""
    return (f"{size} bytes is over --max_file_mb={self.max_file_mb:g} ({self.max_bytes} bytes); "
            "raise it to read this file")

  def header_error(self, data: bytes):
    """"" or why the encoded image `data` is not decoded (format, unreadable header, too many pixels)."""
    kind = image_format(data)
    if kind not in READ:
      return f"a {kind} image; only JPEG and PNG are read" if kind else "not a decodable JPEG or PNG (unknown format)"
    try:
      width, height = dimensions(data, kind)
    except (OSError, SyntaxError, ValueError, IndexError) as e:
      return f"not a decodable {kind} ({str(e).splitlines()[0] if str(e) else 'no size in its header'})"
    if width * height > self.max_pixels:
      return (f"{width}x{height} = {width * height} pixels is over --max_pixels={self.max_pixels}; "
              "raise it to read this image")
    return ""


def image_format(data: bytes):
  """"JPEG", "PNG", "GIF", "WebP", "BMP", "TIFF", "ICO" from the first bytes of `data`, or "" if none."""
  if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
    return "WebP"
  return next((kind for signature, kind in _SIGNATURES if data.startswith(signature)), "")


def dimensions(data: bytes, kind: str):
  """(width, height) declared by the header of JPEG or PNG `data`; raises ValueError or OSError if absent."""
  if kind == "PNG":
    if data[12:16] != b"IHDR":
      raise ValueError("no IHDR chunk")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
  from PIL import JpegImagePlugin  # pylint: disable=g-import-not-at-top
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    # The plugin's own constructor parses markers up to the first start-of-frame: the header only, and without
    # Image.open's decompression-bomb check, which is this module's job with its own limit.
    return JpegImagePlugin.JpegImageFile(io.BytesIO(data)).size
