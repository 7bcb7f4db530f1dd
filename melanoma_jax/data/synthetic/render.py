"""Drawing: one dermoscopy-like image (skin, lesion, hair, dermoscope light) as pixels and as JPEG bytes.

All drawing is vectorised over the pixel grid; every random draw comes from the image's own generator, in a
fixed order, so an image is a pure function of its arguments.
"""
import functools
import io
import math

import numpy as np
from PIL import Image
from PIL import ImageDraw

from melanoma_jax.data.synthetic import lesions
from melanoma_jax.data.synthetic import seeding
from melanoma_jax.utils.errors import InputError

JPEG_QUALITY = 90


@functools.lru_cache(maxsize=8)
def _grid(size):
  """Pixel-centre coordinates (x, y) in [-1, 1], float32, read-only."""
  axis = ((np.arange(size, dtype=np.float32) + 0.5) / size) * 2.0 - 1.0
  x, y = np.meshgrid(axis, axis)
  x.setflags(write=False)
  y.setflags(write=False)
  return x, y


def _smooth_noise(rng, size, cells):
  """A smooth random field of about unit variance: a cells x cells grid, bicubic-upsampled."""
  cells = max(2, int(cells))
  grid = rng.standard_normal((cells, cells)).astype(np.float32)
  return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC)) * 1.3


def _fractal_noise(rng, size, cells, octaves=3):
  """Sum of smooth noise fields, each octave twice as fine and half as strong; about unit variance."""
  total, weight = 0.0, 0.0
  for octave in range(octaves):
    total = total + _smooth_noise(rng, size, min(cells * 2 ** octave, size)) * 0.5 ** octave
    weight += 0.25 ** octave
  return total / math.sqrt(weight)


def _smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _periodic_table(amplitudes, phases, samples=512):
  """The border radius factor 1 + sum_k a_k cos(k t + p_k), tabulated over one turn."""
  theta = np.linspace(-np.pi, np.pi, samples, endpoint=False)
  k = np.arange(1, len(amplitudes) + 1)[:, None]
  table = 1.0 + (np.asarray(amplitudes)[:, None] * np.cos(k * theta + np.asarray(phases)[:, None])).sum(0)
  return theta, np.maximum(table, 0.3)


def _lesion_radius(params, size):
  """Normalized radius of every pixel (1 on the border), from the lesion's ellipse and border."""
  x, y = _grid(size)
  dx, dy = x - params.centre[0], y - params.centre[1]
  c, s = math.cos(params.angle), math.sin(params.angle)
  u, v = dx * c + dy * s, (-dx * s + dy * c) * params.aspect
  theta = np.arctan2(v, u)
  table_theta, table = _periodic_table(params.border_amplitudes, params.border_phases)
  border = np.interp(theta, table_theta, table, period=2 * np.pi).astype(np.float32)
  return np.sqrt(u * u + v * v) / (params.radius * border)


def _skin(rng, style, size):
  """Skin under polarized light: base tone, uneven pigment, blotchy redness, fine texture."""
  base = np.asarray(style.skin_rgb, np.float32)
  shade = 1.0 + 0.04 * _smooth_noise(rng, size, 4)
  blotch = np.clip(_smooth_noise(rng, size, 6), 0, None) * style.redness * 0.08
  texture = 0.015 * _smooth_noise(rng, size, size // 3)
  rgb = base * (shade + texture)[..., None]
  rgb -= blotch[..., None] * np.array([-0.3, 0.6, 0.5], np.float32)
  return rgb


def _network(rng, params, size):
  """Honeycomb pigment network in [0, 1] (1 on the lines); warped and broken with `network_warp`."""
  period = float(rng.uniform(0.07, 0.1))
  fade = float(np.clip((period * size / 2 - 2.5) / 2.0, 0.0, 1.0))  # Avoid aliasing at small sizes.
  if params.network <= 0.0 or fade == 0.0:
    return None
  x, y = _grid(size)
  warp = 0.015 + params.network_warp * 0.03
  u = x + warp * _smooth_noise(rng, size, 10)
  v = y + warp * _smooth_noise(rng, size, 10)
  a = rng.uniform(0, np.pi)
  frequency = 4 * np.pi / period / math.sqrt(3)
  wave = 0.0
  for turn in (0.0, np.pi / 3, 2 * np.pi / 3):  # Three plane waves at 60 degrees: hexagonal cells.
    wave = wave + np.cos((u * math.cos(a + turn) + v * math.sin(a + turn)) * frequency)
  lines = _smoothstep((0.5 - wave) / 2.0)
  broken = _smoothstep(0.7 + (0.3 + params.network_warp) * _smooth_noise(rng, size, 6))
  return lines * broken * params.network * fade


def _lesion_colour(rng, params, radius, size):
  """Colour inside the lesion: base with radial profile, network, colour blobs, dots."""
  x, y = _grid(size)
  rim = np.clip(radius, 0.0, 1.0)
  mottle = 0.08 * _fractal_noise(rng, size, 6, 4)
  shade = 1.0 - params.centre_dark * (1.0 - rim) + mottle
  rgb = np.asarray(params.base_rgb, np.float32) * shade[..., None]
  network = _network(rng, params, size)
  if network is not None:
    rgb *= (1.0 - 0.45 * network * (1.2 - rim))[..., None]
  for colour, bx, by, width, opacity in params.blobs:
    d2 = ((x - bx) ** 2 + (y - by) ** 2) / (width * width)
    field = np.exp(-0.5 * d2) + 0.45 * _fractal_noise(rng, size, 5, 3) - 0.45
    mask = _smoothstep(field / 0.35 + 0.3) * opacity
    rgb += (np.asarray(colour, np.float32) - rgb) * mask[..., None]
  if params.dots > 0.0:
    speckle = _smooth_noise(rng, size, max(4, size // 5))
    where = _smoothstep((rim - 0.55) / 0.3) if params.dots_peripheral else 1.0 - rim
    dots = _smoothstep((speckle - 2.3 + 1.2 * params.dots) / 0.5) * where
    rgb *= (1.0 - 0.7 * dots)[..., None]
  return rgb


def _lesion(rng, params, size):
  """(alpha, rgb) of the lesion: alpha is 1 inside, falling to 0 across a soft, ragged rim."""
  radius = _lesion_radius(params, size)
  radius = radius + params.border_warp * _fractal_noise(rng, size, 8, 3)
  alpha = _smoothstep((1.0 - radius) / params.edge + 0.5)
  return alpha, _lesion_colour(rng, params, radius, size)


def _hair_mask(rng, style, size):
  """Coverage in [0, 1] of hair strands: curved lines drawn 4x supersampled, then downsampled."""
  count = rng.poisson(style.hair_density)
  if count == 0:
    return None
  scale = 4 if size <= 256 else 2
  big = size * scale
  canvas = Image.new("L", (big, big), 0)
  draw = ImageDraw.Draw(canvas)
  t = np.linspace(0.0, 1.0, 16)[:, None]
  for _ in range(count):
    p0, p2 = rng.uniform(-0.2, 1.2, 2) * big, rng.uniform(-0.2, 1.2, 2) * big
    p1 = (p0 + p2) / 2 + rng.normal(0, 0.25, 2) * big
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    width = max(1, int(round(big * rng.uniform(0.002, 0.005))))
    draw.line([tuple(p) for p in points], fill=int(rng.uniform(170, 255)), width=width, joint="curve")
  return np.asarray(canvas.resize((size, size), Image.BOX), np.float32) / 255.0


def _dermoscope_light(rng, size):
  """Multiplicative light: uneven illumination and the dark circular corners of the dermoscope lens."""
  x, y = _grid(size)
  cx, cy = rng.normal(0.0, 0.1, 2)
  r2 = (x - cx) ** 2 + (y - cy) ** 2
  light = 1.0 - rng.uniform(0.05, 0.25) * r2
  field_radius = rng.uniform(0.95, 1.6)  # Beyond ~1.41 the field of view covers the whole square.
  edge = rng.uniform(0.03, 0.12)
  light *= 1.0 - 0.97 * _smoothstep((np.sqrt(r2) - field_radius) / edge + 0.5)
  return light


def render_lesion(rng, patient_style, malignant, size, ugly_duckling=0.0):
  """One dermoscopy-like image, uint8 [size, size, 3]: the patient's skin, one lesion, light, hair."""
  if size < 8:
    raise InputError(f"image size must be >= 8 pixels, got {size}")
  params = lesions.make_lesion_params(rng, patient_style, bool(malignant), ugly_duckling)
  return draw_lesion(rng, patient_style, params, size)


def draw_lesion(rng, patient_style, params, size):
  """The image of given lesion parameters, uint8 [size, size, 3]: the patient's skin, the lesion, light, hair."""
  if size < 8:
    raise InputError(f"image size must be >= 8 pixels, got {size}")
  rgb = _skin(rng, patient_style, size)
  alpha, colour = _lesion(rng, params, size)
  rgb += (colour - rgb) * alpha[..., None]
  hair = _hair_mask(rng, patient_style, size)
  if hair is not None:
    rgb += (np.asarray(patient_style.hair_rgb, np.float32) - rgb) * (0.85 * hair)[..., None]
  rgb *= _dermoscope_light(rng, size)[..., None]
  rgb *= rng.uniform(0.95, 1.04, 3).astype(np.float32)  # White balance of the camera.
  rgb += rng.normal(0.0, 0.01, rgb.shape).astype(np.float32)
  return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def encode_jpeg(image, quality=JPEG_QUALITY):
  """JPEG bytes of a uint8 RGB array (deterministic for the same Pillow / libjpeg)."""
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
  return buffer.getvalue()


def render_image(seed, image_name, patient_id, malignant, size, ugly_duckling=0.0):
  """JPEG bytes of the image of one metadata row, a pure function of its arguments.

  `ugly_duckling` in [0, 1] (0: the ordinary set): see `lesions.make_lesion_params`.
  """
  rng = seeding.stable_rng(seed, image_name, seeding.IMAGE_STREAM)
  style = lesions.patient_style(seed, patient_id, independent_nevi=ugly_duckling > 0.0)
  return encode_jpeg(render_lesion(rng, style, malignant, size, ugly_duckling))

