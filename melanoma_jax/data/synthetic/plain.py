"""The plain generator: flat lesions on one skin colour, a pure ugly-duckling set with nothing else to learn.

Every image is the same constant skin colour (for every patient and image: no skin texture, no hair, no
uneven light, no dark dermoscope corners) with one lesion, a flat filled shape with a soft edge. Each patient
has a nevus style, a pure function of (seed, patient_id): lesion colour (a continuous path over tan, brown,
reddish and grey-brown), darkness, size and outline (the amplitude of border harmonics 2..4, elongation).
A benign lesion is the patient's style with small per-image jitter (position near the centre, rotation,
+-10% size, +-3% colour). A malignant lesion is the same kind of typical nevus in a donor style: another
patient-like style drawn from the image's own stream, nothing else differs.

Benign and malignant images have the same distribution over patients, so an image-only model is at chance and
only comparing a patient's images finds the melanoma. Exactly so: a style is a point u of the unit torus
[0, 1)^5 (colour, darkness, size, irregularity, elongation), each coordinate read linearly onto its range, and
a patient's u is uniform. A donor is u shifted by an independent s (mod 1), so a donor is uniform too, and s is
drawn by rejection to move colour, darkness and size together by at least MIN_DONOR_SHIFT (torus distance),
so the donor clearly differs from the patient. A shift of d on the torus moves the coordinate by d or 1 - d
on its range, never less. The donor's irregularity, elongation and harmonics are drawn afresh.

Structurally different from the default `render` generator, so that a design tuned there can be tested here:
no skin texture, hair, light or vignette; skin identical for every patient (there it is the patient's tone);
style only by colour, darkness, size and outline (there also centre shading, pigment network, colour blobs,
dots); a melanoma never looks malignant (there, without ugly_duckling=1, ABCD features; with it, a donor of
another discrete colour family).

Everything is a pure function of (seed, patient_id) and (seed, image_name), so the same seed gives the same
bytes in any order, in any process.
"""
import dataclasses
import math

import numpy as np

from melanoma_jax.data.synthetic import render
from melanoma_jax.data.synthetic import seeding
from melanoma_jax.utils.errors import InputError

SKIN_RGB = (0.88, 0.72, 0.62)  # In [0, 1], for every patient and image.
# The colour path of nevi, from the style's colour coordinate 0 to 1: tan, brown, reddish brown, grey-brown.
_COLOUR_PATH = np.array([[0.80, 0.60, 0.45], [0.58, 0.38, 0.26], [0.66, 0.34, 0.28], [0.52, 0.47, 0.45]])
_MAX_DARKENING = 0.55  # Darkness coordinate 1 multiplies the colour by 1 - this.
_RADIUS = (0.2, 0.48)  # Equal-area radius, in half-image units (1 = half the image side).
_MAX_IRREGULARITY = 0.12  # Largest amplitude of the border harmonics, as a share of the radius.
_MAX_ELONGATION = 1.5  # Ratio of the long to the short axis.
_HARMONICS = np.array([2, 3, 4])  # Order 1 only shifts the shape.
_EDGE = 0.18  # Width of the soft rim, in normalized radius.
MIN_DONOR_SHIFT = 0.35  # Torus distance of a donor from its patient in (colour, darkness, size); at most 0.87.
_SHIFTED = 3  # The coordinates the minimum shift applies to: colour, darkness, size.


@dataclasses.dataclass(frozen=True)
class PlainStyle:
  """A nevus style: torus coordinates (colour, darkness, size, irregularity, elongation), border shape."""
  coords: tuple  # Five numbers in [0, 1).
  harmonic_weights: tuple  # Relative amplitudes of border harmonics 2..4.
  harmonic_phases: tuple


def _draw_style(rng, coords=None):
  coords = rng.uniform(size=5) if coords is None else coords
  return PlainStyle(coords=tuple(float(c) for c in coords),
                    harmonic_weights=tuple(float(w) for w in rng.uniform(0.5, 1.0, len(_HARMONICS))),
                    harmonic_phases=tuple(float(p) for p in rng.uniform(0, 2 * np.pi, len(_HARMONICS))))


def plain_style(seed, patient_id):
  """The PlainStyle of a patient, a pure function of (seed, patient_id)."""
  return _draw_style(seeding.stable_rng(seed, patient_id, seeding.PLAIN_STREAM))


def donor_style(rng, style):
  """A style as likely as any patient's, at least MIN_DONOR_SHIFT from `style` in colour, darkness, size."""
  while True:
    shift = rng.uniform(size=_SHIFTED)
    if np.linalg.norm(np.minimum(shift, 1.0 - shift)) >= MIN_DONOR_SHIFT:
      break
  moved = (np.asarray(style.coords[:_SHIFTED]) + shift) % 1.0
  return _draw_style(rng, np.concatenate([moved, rng.uniform(size=len(style.coords) - _SHIFTED)]))


def _colour(coords):
  """Lesion colour of the (colour, darkness) coordinates: a point on the colour path, darkened."""
  position = coords[0] * (len(_COLOUR_PATH) - 1)
  low = min(int(position), len(_COLOUR_PATH) - 2)
  rgb = _COLOUR_PATH[low] + (_COLOUR_PATH[low + 1] - _COLOUR_PATH[low]) * (position - low)
  return rgb * (1.0 - _MAX_DARKENING * coords[1])


def _smoothstep(t):
  t = np.clip(t, 0.0, 1.0)
  return t * t * (3.0 - 2.0 * t)


def _alpha(style, size, centre, angle, scale):
  """Lesion coverage in [0, 1] of every pixel: the style's outline, placed, rotated and scaled."""
  _, _, size_u, irregularity_u, elongation_u = style.coords
  axis = ((np.arange(size, dtype=np.float64) + 0.5) / size) * 2.0 - 1.0
  x, y = np.meshgrid(axis - centre[0], axis - centre[1])
  stretch = math.sqrt(1.0 + (_MAX_ELONGATION - 1.0) * elongation_u)  # Elongates at the same area.
  u = (x * math.cos(angle) + y * math.sin(angle)) / stretch
  v = (-x * math.sin(angle) + y * math.cos(angle)) * stretch
  theta = np.arctan2(v, u)[..., None]
  amplitudes = _MAX_IRREGULARITY * irregularity_u * np.asarray(style.harmonic_weights)
  border = 1.0 + (amplitudes * np.cos(_HARMONICS * theta + np.asarray(style.harmonic_phases))).sum(-1)
  radius = (_RADIUS[0] + (_RADIUS[1] - _RADIUS[0]) * size_u) * scale
  return _smoothstep((1.0 - np.hypot(u, v) / (radius * border)) / _EDGE + 0.5)


def render_plain_lesion(rng, style, malignant, size):
  """uint8 [size, size, 3]: the skin and one lesion, in `style` (benign) or a donor's (malignant)."""
  if size < 8:
    raise InputError(f"image size must be >= 8 pixels, got {size}")
  centre = np.clip(rng.normal(0.0, 0.05, 2), -0.1, 0.1)
  angle, scale = rng.uniform(0, 2 * np.pi), rng.uniform(0.9, 1.1)
  tint = rng.uniform(0.97, 1.03, 3)
  if malignant:
    style = donor_style(rng, style)
  alpha = _alpha(style, size, centre, angle, scale)[..., None]
  skin = np.asarray(SKIN_RGB)
  rgb = skin + (np.clip(_colour(style.coords) * tint, 0.0, 1.0) - skin) * alpha
  return (np.clip(rgb, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def render_plain_image(seed, image_name, patient_id, malignant, size):
  """JPEG bytes of the plain image of one metadata row, a pure function of its arguments."""
  rng = seeding.stable_rng(seed, image_name, seeding.IMAGE_STREAM)
  return render.encode_jpeg(render_plain_lesion(rng, plain_style(seed, patient_id), bool(malignant), size))
