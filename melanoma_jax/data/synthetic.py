"""Synthetic dermoscopy images for the real SIIM-ISIC 2020 metadata: the project's default, offline data.

Every metadata row gets one drawn image: skin of the patient's tone under a dermoscope (dark circular
corners, uneven light, hair) with one lesion. A patient's benign nevi share a "nevus style" (colour, size,
shape, pigment network); a malignant lesion follows the ABCD rule (Asymmetry, irregular Border, several
Colours incl. blue-grey/white/red, larger Diameter) to a degree set by a per-lesion severity, so it is the
"ugly duckling" among that patient's lesions. A per-lesion severity moves a melanoma from "looks like this
patient's nevi" (10% are subtle) to florid; 4.5% of benign lesions are look-alikes (dysplastic nevi, some with
grey-blue regression, blue nevi, red angiomas). So the classes overlap: pixels separate them well (a small
CNN trained from scratch reaches an AUC of about 0.9), not perfectly.

Everything is a pure function of (seed, patient_id) and (seed, image_name), so the same seed gives the same
bytes in any order, in any process.

  python -m melanoma_jax.data.synthetic --out DIR --num_patients 200 --image_size 128 --seed 0
"""
import argparse
import dataclasses
import functools
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import time
import zlib

import numpy as np
import pandas as pd
from PIL import Image
from PIL import ImageDraw

from melanoma_jax.data import metadata
from melanoma_jax.data import records
from melanoma_jax.utils.errors import InputError

GENERATOR_VERSION = 1
MANIFEST = "synthetic.json"
# Default subset: 250 of the 2,056 train patients (about 4,000 images, about 70 malignant) and the test
# patients in the same proportion (84 of 690, about 1,300 images). See `select_patients`.
DEFAULT_NUM_PATIENTS = 250
DEFAULT_MIN_MALIGNANT = 60
JPEG_QUALITY = 90
# Rate at which hidden labels of synthetic test images are malignant: the real train rate, 584 / 33,126.
TEST_MALIGNANT_RATE = 584 / 33126

# Stream tags: keep the random draws of different purposes independent.
_PATIENT_STREAM, _IMAGE_STREAM, _TEST_LABEL_STREAM, _SELECT_STREAM = range(4)

# Linear RGB in [0, 1].
_SKIN_LIGHT = np.array([0.95, 0.78, 0.70], np.float32)
_SKIN_MEDIUM = np.array([0.82, 0.60, 0.46], np.float32)
_SKIN_DARK = np.array([0.50, 0.34, 0.25], np.float32)
# Colours of melanoma (the "C" of ABCD), with their base weights and the weight gained with severity.
_PALETTE = {
    "light_brown": ([0.62, 0.42, 0.28], 0.8, 0.0),
    "dark_brown": ([0.33, 0.20, 0.13], 1.0, 0.3),
    "black": ([0.11, 0.08, 0.08], 0.05, 0.9),
    "blue_grey": ([0.42, 0.48, 0.58], 0.05, 2.0),
    "white": ([0.80, 0.78, 0.80], 0.02, 0.9),
    "red": ([0.78, 0.30, 0.32], 0.02, 0.8),
}
_BENIGN_KINDS = ("nevus", "atypical_nevus", "blue_nevus", "angioma")
_BENIGN_KIND_P = (0.885, 0.08, 0.02, 0.015)
SUBTLE_MELANOMA_RATE = 0.1  # Melanomas drawn with little of the ABCD features (in situ, featureless).
_OUTPUT_FILES = ("train.csv", "test.csv", "test_hidden_labels.csv", records.CODES_FILE, "contact_sheet.png",
                 "SYNTHETIC.md", MANIFEST)


# ---------------------------------------------------------------------------------------------------------
# Seeding.

def stable_rng(seed, key, stream):
  """A numpy Generator from (seed, key, stream); `key` (e.g. an image name) is hashed with crc32."""
  key_hash = zlib.crc32(str(key).encode("utf-8"))
  return np.random.default_rng([int(seed), key_hash, int(stream)])


# ---------------------------------------------------------------------------------------------------------
# Patient and lesion parameters.

@dataclasses.dataclass(frozen=True)
class PatientStyle:
  """What a patient's images share: skin, hair, and the look of their benign nevi."""
  skin_rgb: tuple  # Base skin colour, linear RGB in [0, 1].
  redness: float  # Strength of blotchy erythema of the skin.
  hair_density: float  # Expected number of hair strands per image.
  hair_rgb: tuple  # Colour of hair strands.
  nevus_rgb: tuple  # Colour of the patient's benign nevi.
  nevus_radius: float  # Mean nevus radius, in half-image units (1 = half the image side).
  nevus_aspect: float  # Elongation of nevi (1 = round).
  nevus_centre_dark: float  # Centre-to-rim darkening of nevi (negative: lighter centre).
  nevus_network: float  # Strength of the pigment network of nevi.


def _skin_colour(tone):
  """Skin colour for a tone in [0, 1] (0 = very fair, 1 = dark), piecewise linear."""
  if tone < 0.5:
    return _SKIN_LIGHT + (_SKIN_MEDIUM - _SKIN_LIGHT) * (tone / 0.5)
  return _SKIN_MEDIUM + (_SKIN_DARK - _SKIN_MEDIUM) * ((tone - 0.5) / 0.5)


def make_patient_style(rng):
  """Draws a PatientStyle; mostly fair skin, as in the ISIC 2020 cohort."""
  tone = float(rng.beta(1.4, 3.5))
  skin = _skin_colour(tone) * rng.uniform(0.94, 1.04, 3)
  # Nevi are melanin on top of the skin: a multiplicative brown filter, darker on darker skin.
  depth = rng.uniform(0.0, 1.0)
  tan_filter = np.array([0.78, 0.62, 0.52]) + (np.array([0.42, 0.29, 0.23]) - [0.78, 0.62, 0.52]) * depth
  nevus = skin * tan_filter * rng.uniform(0.93, 1.05, 3) * (1.0 - 0.15 * tone)
  grey_hair = rng.uniform() < 0.25
  hair = (np.array([0.55, 0.53, 0.50]) if grey_hair else np.array([0.16, 0.11, 0.08])) * rng.uniform(0.7, 1.3)
  return PatientStyle(
      skin_rgb=tuple(float(c) for c in np.clip(skin, 0, 1)),
      redness=float(rng.uniform(0.0, 0.6)),
      hair_density=float(rng.choice([0.0, 0.5, 2.0, 5.0], p=[0.35, 0.25, 0.25, 0.15])
                         * rng.uniform(0.5, 1.5)),
      hair_rgb=tuple(float(c) for c in np.clip(hair, 0, 1)),
      nevus_rgb=tuple(float(c) for c in np.clip(nevus, 0, 1)),
      nevus_radius=float(rng.uniform(0.2, 0.42)),
      nevus_aspect=float(rng.uniform(1.0, 1.35)),
      nevus_centre_dark=float(rng.uniform(-0.1, 0.35)),
      nevus_network=float(rng.uniform(0.0, 0.45)),
  )


def patient_style(seed, patient_id):
  """The PatientStyle of a patient, a pure function of (seed, patient_id)."""
  return make_patient_style(stable_rng(seed, patient_id, _PATIENT_STREAM))


@dataclasses.dataclass(frozen=True)
class LesionParams:
  """Geometry and colours of one lesion (coordinates in half-image units, image centre at 0)."""
  kind: str  # "melanoma" or one of _BENIGN_KINDS.
  severity: float  # 0 for a typical nevus; grows with how strongly ABCD features show.
  centre: tuple
  radius: float
  aspect: float
  angle: float
  border_amplitudes: tuple  # Fourier amplitudes of the border radius, orders 1..K.
  border_phases: tuple
  border_warp: float  # Amplitude of a noise field added to the normalized radius (ragged edge).
  edge: float  # Width of the soft rim, in normalized radius.
  base_rgb: tuple
  centre_dark: float
  network: float  # Strength of the pigment network.
  network_warp: float  # How irregular the network is.
  blobs: tuple  # ((rgb, x, y, width, opacity), ...): regions of other colours.
  dots: float  # Density of dark dots / globules.
  dots_peripheral: bool


def _border_spectrum(rng, asymmetry, irregularity, orders=16):
  """Fourier amplitudes of the border: low orders give asymmetry, high orders a notched border."""
  k = np.arange(1, orders + 1)
  low = asymmetry * rng.uniform(0.5, 1.0, orders) / k
  high = irregularity * rng.uniform(0.3, 1.0, orders) / np.sqrt(k)
  amplitudes = np.where(k <= 3, low, high * (k >= 4))
  return tuple(float(a) for a in amplitudes), tuple(float(p) for p in rng.uniform(0, 2 * np.pi, orders))


def _palette_draw(rng, severity, count):
  """`count` distinct melanoma colour names, the dermal ones more likely at high severity."""
  names = list(_PALETTE)
  weights = np.array([_PALETTE[n][1] + _PALETTE[n][2] * severity for n in names])
  picks = rng.choice(len(names), size=min(count, len(names)), replace=False, p=weights / weights.sum())
  return [names[i] for i in picks]


def _blob(rng, rgb, centre, radius, spread, width, opacity):
  """A colour region placed inside the lesion, at up to `spread` of its radius from the centre."""
  r, a = spread * radius * np.sqrt(rng.uniform()), rng.uniform(0, 2 * np.pi)
  position = (centre[0] + r * np.cos(a), centre[1] + r * np.sin(a))
  return (tuple(float(c) for c in rgb), float(position[0]), float(position[1]),
          float(width * radius * rng.uniform(0.7, 1.3)), float(opacity))


def _lesion_kind(rng, malignant):
  """'melanoma' if malignant, else a benign kind: mostly typical nevi, a few look-alikes of melanoma."""
  if malignant:
    return "melanoma"
  return str(rng.choice(_BENIGN_KINDS, p=_BENIGN_KIND_P))


def _severity(rng, kind):
  """ABCD strength in [0, 1]: most melanomas clear, some subtle (in situ); atypical nevi mildly abnormal."""
  if kind == "melanoma":
    if rng.uniform() < SUBTLE_MELANOMA_RATE:
      return float(rng.uniform(0.05, 0.3))
    return float(rng.beta(2.5, 1.0))
  if kind == "atypical_nevus":
    return float(rng.uniform(0.15, 0.6))
  return 0.0


def _melanoma_look(rng, style, s, centre):
  """The patient's nevus turned towards ABCD by severity s: 0 looks like their nevi, 1 is florid.

  A: asymmetric, elongated; B: notched, ragged border; C: darker, with up to 5 colour regions (dermal
  blue-grey, white, red, black likelier at high s); D: up to about twice the patient's nevus radius.
  """
  radius = style.nevus_radius * np.exp(rng.normal(0.0, 0.12)) * (1.0 + 1.4 * s) + 0.05 * s
  tint = 1.0 - s * np.array([rng.uniform(0.2, 0.5), rng.uniform(0.25, 0.6), rng.uniform(0.15, 0.55)])
  blobs = []
  for name in _palette_draw(rng, s, int(round(4.5 * s * rng.uniform(0.7, 1.0)))):
    opacity = rng.uniform(0.7, 1.0) * (0.4 + 0.6 * s)
    blobs.append(_blob(rng, _PALETTE[name][0], centre, radius, 0.75, rng.uniform(0.25, 0.55), opacity))
  network = style.nevus_network * (1 - s) + rng.uniform(0.1, 0.5) * s * (1 - 0.5 * s)
  return dict(
      radius=radius, base=np.asarray(style.nevus_rgb) * tint, blobs=blobs,
      asymmetry=0.03 + 0.34 * s, irregularity=0.006 + 0.08 * s, warp=0.02 + 0.13 * s,
      edge=rng.uniform(0.2, 0.45) * (1 - s) + rng.uniform(0.1, 0.35) * s, network=network,
      network_warp=0.1 + 0.8 * s, dots=rng.uniform(0.0, 1.0) * s, peripheral=True,
      aspect=style.nevus_aspect * (1.0 + 0.5 * s * rng.uniform()),
      centre_dark=style.nevus_centre_dark * (1 - s) + rng.uniform(-0.2, 0.3) * s)


def _nevus_look(rng, style, s, centre, atypical):
  """The patient's nevus style with small variation; atypical (dysplastic): mild A, B, C and larger."""
  radius = style.nevus_radius * np.exp(rng.normal(0.0, 0.12)) * (1.0 + 0.6 * s)
  nevus_rgb = np.asarray(style.nevus_rgb)
  blobs = []
  if atypical:
    blobs.append(_blob(rng, nevus_rgb * 0.6, centre, radius, 0.5, rng.uniform(0.3, 0.6), 0.6))
    if rng.uniform() < 0.35:  # Regression: a grey-blue patch, as in melanoma.
      blobs.append(_blob(rng, _PALETTE["blue_grey"][0], centre, radius, 0.6, rng.uniform(0.25, 0.5),
                         rng.uniform(0.4, 0.7)))
  return dict(
      radius=radius, base=nevus_rgb * rng.uniform(0.92, 1.08, 3), blobs=blobs,
      asymmetry=0.03 + 0.3 * s, irregularity=0.006 + 0.06 * s, warp=0.02 + 0.1 * s,
      edge=rng.uniform(0.2, 0.45), network=style.nevus_network * rng.uniform(0.8, 1.2),
      network_warp=0.1 + 0.5 * s, dots=rng.uniform(0.0, 0.3) * (rng.uniform() < 0.3), peripheral=False,
      aspect=style.nevus_aspect * rng.uniform(0.95, 1.05), centre_dark=style.nevus_centre_dark)


def _blue_nevus_look(rng, style):
  """Blue nevus: small, round, evenly blue-grey, darker in the centre."""
  return dict(
      radius=style.nevus_radius * rng.uniform(0.6, 0.9),
      base=np.asarray(_PALETTE["blue_grey"][0]) * rng.uniform(0.6, 0.9), blobs=[],
      asymmetry=0.03, irregularity=0.01, warp=0.02, edge=rng.uniform(0.15, 0.3), network=0.0,
      network_warp=0.0, dots=0.0, peripheral=False, aspect=rng.uniform(1.0, 1.15), centre_dark=0.3)


def _angioma_look(rng, style):
  """Angioma: round, sharply bounded, red to purple lacunae."""
  base = np.array([0.62, 0.20, 0.28]) * rng.uniform(0.7, 1.1, 3)
  return dict(
      radius=style.nevus_radius * rng.uniform(0.7, 1.1), base=base, blobs=[],
      asymmetry=0.04, irregularity=0.01, warp=0.03, edge=rng.uniform(0.1, 0.2), network=0.0,
      network_warp=0.0, dots=rng.uniform(0.4, 0.9), peripheral=False, aspect=rng.uniform(1.0, 1.2),
      centre_dark=0.1)


def make_lesion_params(rng, style, malignant):
  """Draws one lesion: a variant of the patient's nevus style, a benign look-alike, or a melanoma."""
  kind = _lesion_kind(rng, malignant)
  s = _severity(rng, kind)
  centre = tuple(float(c) for c in rng.normal(0.0, 0.08, 2))
  if kind == "melanoma":
    look = _melanoma_look(rng, style, s, centre)
  elif kind == "blue_nevus":
    look = _blue_nevus_look(rng, style)
  elif kind == "angioma":
    look = _angioma_look(rng, style)
  else:
    look = _nevus_look(rng, style, s, centre, atypical=kind == "atypical_nevus")
  amplitudes, phases = _border_spectrum(rng, look["asymmetry"], look["irregularity"])
  return LesionParams(
      kind=kind, severity=s, centre=centre, radius=float(min(look["radius"], 0.85)),
      aspect=float(look["aspect"]), angle=float(rng.uniform(0, np.pi)), border_amplitudes=amplitudes,
      border_phases=phases, border_warp=float(look["warp"]), edge=float(look["edge"]),
      base_rgb=tuple(float(c) for c in np.clip(look["base"], 0, 1)), centre_dark=float(look["centre_dark"]),
      network=float(look["network"]), network_warp=float(look["network_warp"]), blobs=tuple(look["blobs"]),
      dots=float(look["dots"]), dots_peripheral=bool(look["peripheral"]))


# ---------------------------------------------------------------------------------------------------------
# Drawing primitives (all vectorised over the pixel grid).

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


def _lesion_coordinates(params, size):
  """Normalized radius (1 on the border) and angle of every pixel, from the lesion's ellipse and border."""
  x, y = _grid(size)
  dx, dy = x - params.centre[0], y - params.centre[1]
  c, s = math.cos(params.angle), math.sin(params.angle)
  u, v = dx * c + dy * s, (-dx * s + dy * c) * params.aspect
  theta = np.arctan2(v, u)
  table_theta, table = _periodic_table(params.border_amplitudes, params.border_phases)
  border = np.interp(theta, table_theta, table, period=2 * np.pi).astype(np.float32)
  radius = np.sqrt(u * u + v * v) / (params.radius * border)
  return radius, theta


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
  radius, _ = _lesion_coordinates(params, size)
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


def render_lesion(rng, patient_style, malignant, size):  # pylint: disable=redefined-outer-name
  """One dermoscopy-like image, uint8 [size, size, 3]: the patient's skin, one lesion, light, hair."""
  if size < 8:
    raise InputError(f"image size must be >= 8 pixels, got {size}")
  params = make_lesion_params(rng, patient_style, bool(malignant))
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


def render_image(seed, image_name, patient_id, malignant, size):
  """JPEG bytes of the image of one metadata row, a pure function of its arguments."""
  rng = stable_rng(seed, image_name, _IMAGE_STREAM)
  return encode_jpeg(render_lesion(rng, patient_style(seed, patient_id), malignant, size))


def _render_job(job):
  return render_image(*job)


# ---------------------------------------------------------------------------------------------------------
# Choosing the patients.

def _largest_remainder(counts, total):
  """Integer quotas proportional to `counts` that sum to `total` (ties to the earlier entry)."""
  counts = np.asarray(counts, float)
  exact = counts / counts.sum() * total
  quotas = np.floor(exact).astype(int)
  for index in np.argsort(-(exact - quotas), kind="stable")[: total - quotas.sum()]:
    quotas[index] += 1
  return np.minimum(quotas, counts.astype(int))


def _systematic_draw(rng, ids, sizes, count):
  """`count` of `ids`, spread evenly over their sizes: sort by size (seeded ties), take every k-th."""
  if count <= 0:
    return []
  order = np.lexsort((rng.permutation(len(ids)), np.asarray(sizes)))
  step = len(ids) / count
  picks = np.floor(rng.uniform(0, step) + step * np.arange(count)).astype(int)
  return [ids[i] for i in order[np.minimum(picks, len(ids) - 1)]]


def select_patients(train_df, num_patients, seed=0, min_malignant=DEFAULT_MIN_MALIGNANT):
  """Patient ids (sorted) of a seeded subset whose image count and malignant rate match the whole.

  Patients are stratified by their malignant image count (0, 1, 2+); each stratum gets its proportional
  share, drawn systematically over patients sorted by image count, so both the number of images and the
  malignant rate come out close to the full table's (1.8% for ISIC 2020). Only if that leaves fewer than
  `min_malignant` malignant images are patients without one swapped for patients with one (seeded order)
  until it is reached or no candidate is left. `num_patients` None, 0 or >= all keeps every patient.
  """
  per_patient = train_df.groupby("patient_id", sort=True)["target"].agg(["size", "sum"])
  if not num_patients or num_patients >= len(per_patient):
    return list(per_patient.index)
  if num_patients < 0:
    raise InputError(f"num_patients must be >= 0, got {num_patients}")
  rng = stable_rng(seed, "select_patients", _SELECT_STREAM)
  stratum = np.minimum(per_patient["sum"].to_numpy(), 2)
  levels = np.unique(stratum)
  quotas = _largest_remainder([np.sum(stratum == level) for level in levels], num_patients)
  chosen = []
  for level, quota in zip(levels, quotas):
    members = per_patient[stratum == level]
    chosen += _systematic_draw(rng, list(members.index), members["size"].to_numpy(), quota)
  return sorted(_top_up_malignant(rng, per_patient, chosen, min_malignant))


def _top_up_malignant(rng, per_patient, chosen, min_malignant):
  """Swaps benign-only patients of `chosen` for unchosen ones with malignant images up to min_malignant."""
  chosen = list(chosen)
  malignant = int(per_patient.loc[chosen, "sum"].sum())
  if malignant >= min_malignant:
    return chosen
  taken = set(chosen)
  candidates = [p for p in per_patient.index[per_patient["sum"] > 0] if p not in taken]
  benign_only = [p for p in chosen if per_patient.at[p, "sum"] == 0]
  candidates = [candidates[i] for i in rng.permutation(len(candidates))]
  benign_only = [benign_only[i] for i in rng.permutation(len(benign_only))]
  for incoming, outgoing in zip(candidates, benign_only):
    if malignant >= min_malignant:
      break
    chosen[chosen.index(outgoing)] = incoming
    malignant += int(per_patient.at[incoming, "sum"])
  if malignant < min_malignant:
    logging.warning("only %d malignant images reachable with %d patients (min_malignant=%d)",
                    malignant, len(chosen), min_malignant)
  return chosen


def select_test_patients(test_df, num_test_patients, seed=0):
  """Patient ids (sorted) of a seeded test subset, drawn systematically over image counts; None = all."""
  per_patient = test_df.groupby("patient_id", sort=True).size()
  if num_test_patients is None or num_test_patients >= len(per_patient):
    return list(per_patient.index)
  if num_test_patients < 0:
    raise InputError(f"num_test_patients must be >= 0, got {num_test_patients}")
  rng = stable_rng(seed, "select_test_patients", _SELECT_STREAM)
  return sorted(_systematic_draw(rng, list(per_patient.index), per_patient.to_numpy(), num_test_patients))


def default_num_test_patients(num_patients, num_train_patients, num_all_test_patients):
  """Test patients in the real test:train proportion (690:2,056); all of them when train is whole."""
  if not num_patients or num_patients >= num_train_patients:
    return num_all_test_patients
  return max(1, int(round(num_patients * num_all_test_patients / num_train_patients)))


def hidden_test_labels(test_df, seed):
  """Ground truth drawn for synthetic test images: malignant at the real train rate, per image name."""
  draws = [stable_rng(seed, name, _TEST_LABEL_STREAM).uniform() for name in test_df["image_name"]]
  return (np.asarray(draws) < TEST_MALIGNANT_RATE).astype(np.int64)


# ---------------------------------------------------------------------------------------------------------
# Writing a dataset.

def _file_sha256(path):
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def _auto_shards(num_rows):
  return max(1, min(16, num_rows // 250))


def _with_progress(items, total, label, every_s=5.0):
  """Yields `items` unchanged, logging images/s and the ETA every `every_s` seconds."""
  start = last = time.time()
  for done, item in enumerate(items, 1):
    yield item
    now = time.time()
    if now - last >= every_s and done < total:
      rate = done / (now - start)
      logging.info("%s: %d/%d images, %.1f images/s, ETA %.0f s", label, done, total, rate,
                   (total - done) / rate)
      last = now


def _rendered(df, targets, seed, size, num_workers, label):
  """JPEG bytes of df's rows, in order, rendered in `num_workers` processes (1: in this one)."""
  jobs = [(seed, name, patient, bool(t), size)
          for name, patient, t in zip(df["image_name"], df["patient_id"], targets)]
  if num_workers <= 1:
    yield from _with_progress(map(_render_job, jobs), len(jobs), label)
    return
  import multiprocessing  # pylint: disable=g-import-not-at-top
  with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
    yield from _with_progress(pool.imap(_render_job, jobs, chunksize=32), len(jobs), label)


def _contact_sheet(train_df, seed, size, path, patients=4, benign_per_patient=4):
  """A labelled PNG grid: per row, a few benign lesions of one patient and then their malignant one."""
  tile = int(np.clip(size, 160, 256))
  with_malignant = sorted(train_df.loc[train_df["target"] == 1, "patient_id"].unique())[:patients]
  chosen = with_malignant or sorted(train_df["patient_id"].unique())[:patients]
  rows = []
  for patient in chosen:
    lesions = train_df[train_df["patient_id"] == patient]
    rows.append(pd.concat([lesions[lesions["target"] == 0].head(benign_per_patient),
                           lesions[lesions["target"] == 1].head(1)]))
  columns = max(len(r) for r in rows)
  label_h = 28
  sheet = Image.new("RGB", (columns * tile, len(rows) * (tile + label_h)), "white")
  draw = ImageDraw.Draw(sheet)
  for r, row in enumerate(rows):
    for c, (_, item) in enumerate(row.iterrows()):
      jpeg = render_image(seed, item["image_name"], item["patient_id"], item["target"] == 1, size)
      image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((tile, tile), Image.BICUBIC)
      left, top = c * tile, r * (tile + label_h)
      sheet.paste(image, (left, top))
      malignant = item["target"] == 1
      draw.text((left + 4, top + tile + 2), ("MALIGNANT" if malignant else "benign"),
                fill=(200, 0, 0) if malignant else (0, 100, 0))
      draw.text((left + 4, top + tile + 14), f"{item['patient_id']} {item['image_name']}", fill=(60, 60, 60))
  sheet.save(path)


_README = """# Synthetic SIIM-ISIC 2020 lesion images

The IMAGES in this folder are SYNTHETIC: drawn by `melanoma_jax.data.synthetic` (generator version {version},
seed {seed}, {size}x{size} px), not photographs of skin. They imitate dermoscopy (skin tone per patient,
dark circular corners, hair, one lesion) with a learnable but imperfect signal: a patient's benign nevi look
alike, malignant lesions follow the ABCD rule to a varying degree (some subtle), and some benign lesions are
atypical. Models trained on them say nothing about real melanoma detection.

The METADATA (`train.csv`, `test.csv`: image names, patient ids, sex, age, site, diagnosis, target) are real
rows of the SIIM-ISIC Melanoma Classification challenge 2020, for a seeded subset of {train_patients} train
patients ({train_images} images, {train_malignant} malignant) and {test_patients} test patients
({test_images} images). Source: International Skin Imaging Collaboration, SIIM-ISIC 2020 Challenge Dataset,
doi:10.34970/2020-ds01 (Rotemberg et al., Scientific Data 8, 34, 2021). License: CC BY-NC 4.0
(non-commercial use, attribution required).

The real test set has no labels; `test_hidden_labels.csv` holds the labels the generator drew for the
synthetic test images (malignant at the train rate, {test_malignant} here), to score predictions.

Files: `train*.tfrec` / `test*.tfrec` (resized layout, see `melanoma_jax/data/records.py`), `codes.json`,
`contact_sheet.png` (examples per patient: benign, then the malignant one), `synthetic.json` (manifest,
written last: a folder without it is incomplete).
"""


def _params(num_patients, num_test_patients, image_size, seed, min_malignant, num_shards, train_csv,
            test_csv):
  """What determines the dataset's content (the manifest's key to reuse a finished folder).

  Includes a hash of this module's source, so a changed generator never reuses an older dataset.
  """
  return {"generator_version": GENERATOR_VERSION, "generator_sha256": _file_sha256(__file__),
          "num_patients": num_patients,
          "num_test_patients": num_test_patients, "image_size": image_size, "seed": seed,
          "min_malignant": min_malignant, "num_shards": num_shards, "jpeg_quality": JPEG_QUALITY,
          "train_csv_sha256": _file_sha256(train_csv), "test_csv_sha256": _file_sha256(test_csv)}


def _complete_manifest(out_dir, params):
  """The manifest of out_dir if it is complete (all listed files, right sizes) and made with `params`."""
  try:
    with open(os.path.join(out_dir, MANIFEST)) as f:
      manifest = json.load(f)
  except (OSError, json.JSONDecodeError):
    return None
  if manifest.get("params") != params:
    return None
  for name, entry in manifest.get("files", {}).items():
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path) or os.path.getsize(path) != entry["bytes"]:
      return None
  return manifest


def _is_generated_file(name):
  base = name[: -len(".partial")] if name.endswith(".partial") else name
  return base in _OUTPUT_FILES or (base.startswith(("train", "test")) and base.endswith(".tfrec"))


def _check_replaceable(out_dir):
  """InputError unless out_dir is absent or a folder holding only files a generated dataset has."""
  if not os.path.lexists(out_dir):
    return
  if not os.path.isdir(out_dir) or os.path.islink(out_dir):
    raise InputError(f"{out_dir}: exists and is not a folder")
  foreign = [n for n in os.listdir(out_dir) if not _is_generated_file(n)]
  if foreign:
    raise InputError(f"{out_dir}: holds files a synthetic dataset does not have "
                     f"({', '.join(sorted(foreign)[:5])}); not replacing it, choose an empty or new folder")


def _replace_dir(tmp_dir, out_dir):
  """Moves the finished tmp_dir to out_dir, first removing an older generated dataset there."""
  _check_replaceable(out_dir)
  if os.path.lexists(out_dir):
    shutil.rmtree(out_dir)
  os.replace(tmp_dir, out_dir)


def _write_dataset(tmp_dir, train_df, test_df, test_truth, params, num_workers):
  """Writes every file of the dataset into tmp_dir, the manifest last; returns the manifest."""
  seed, size = params["seed"], params["image_size"]
  train_df.to_csv(os.path.join(tmp_dir, "train.csv"), index=False)
  test_df.to_csv(os.path.join(tmp_dir, "test.csv"), index=False)
  pd.DataFrame({"image_name": test_df["image_name"], "target": test_truth}).to_csv(
      os.path.join(tmp_dir, "test_hidden_labels.csv"), index=False)
  codes = records.fit_codes(train_df, test_df)
  shards = params["num_shards"]
  train_images = _rendered(train_df, train_df["target"], seed, size, num_workers, "train")
  records.write_resized_records(train_df, train_images, tmp_dir, "train",
                                shards or _auto_shards(len(train_df)), codes)
  if len(test_df):
    test_images = _rendered(test_df, test_truth, seed, size, num_workers, "test")
    records.write_resized_records(test_df, test_images, tmp_dir, "test", shards or _auto_shards(len(test_df)),
                                  codes)
  records.save_codes(codes, os.path.join(tmp_dir, records.CODES_FILE))
  _contact_sheet(train_df, seed, size, os.path.join(tmp_dir, "contact_sheet.png"))
  counts = {"train_patients": int(train_df["patient_id"].nunique()), "train_images": len(train_df),
            "train_malignant": int(train_df["target"].sum()),
            "test_patients": int(test_df["patient_id"].nunique()), "test_images": len(test_df),
            "test_malignant": int(np.sum(test_truth))}
  with open(os.path.join(tmp_dir, "SYNTHETIC.md"), "w") as f:
    f.write(_README.format(version=GENERATOR_VERSION, seed=seed, size=size, **counts))
  files = {name: {"bytes": os.path.getsize(os.path.join(tmp_dir, name)),
                  "sha256": _file_sha256(os.path.join(tmp_dir, name))}
           for name in sorted(os.listdir(tmp_dir))}
  manifest = {"params": params, "counts": counts, "files": files}
  with open(os.path.join(tmp_dir, MANIFEST), "w") as f:
    json.dump(manifest, f, indent=1, sort_keys=True)
  return manifest


def _summary(out_dir, manifest, seconds, reused):
  def shards(split):
    return [os.path.join(out_dir, n) for n in sorted(manifest["files"])
            if n.startswith(split) and n.endswith(".tfrec")]
  return {**manifest["counts"], "out_dir": os.fspath(out_dir), "reused": reused, "seconds": seconds,
          "train_records": shards("train"), "test_records": shards("test"),
          "train_csv": os.path.join(out_dir, "train.csv"), "test_csv": os.path.join(out_dir, "test.csv"),
          "contact_sheet": os.path.join(out_dir, "contact_sheet.png")}


def generate_dataset(out_dir, num_patients=DEFAULT_NUM_PATIENTS, image_size=128, seed=0,
                     num_test_patients=None, train_csv=metadata.EMBEDDED_TRAIN_CSV,
                     test_csv=metadata.EMBEDDED_TEST_CSV, num_shards=None,
                     min_malignant=DEFAULT_MIN_MALIGNANT, num_workers=1):
  """Draws images for a seeded patient subset of the real metadata and writes the resized-record set.

  Writes into out_dir: train.csv / test.csv (the real rows of the chosen patients), train*/test*.tfrec,
  codes.json, test_hidden_labels.csv, contact_sheet.png, SYNTHETIC.md and, last, synthetic.json. Returns
  a summary dict (counts, paths, seconds, `reused`). If out_dir already holds a complete dataset made with
  the same parameters, it is returned as is. Everything is built in `out_dir.partial` and renamed when
  done, so out_dir is never half-written. `num_patients` None or 0 takes all train patients;
  `num_test_patients` None takes the real test:train proportion; `num_shards` None picks ~250 images a
  shard (at most 16). See `select_patients` for the subset and `min_malignant`.
  """
  start = time.time()
  if image_size < 8:
    raise InputError(f"image_size must be >= 8 pixels, got {image_size}")
  if seed < 0:
    raise InputError(f"seed must be >= 0, got {seed}")
  out_dir = os.path.abspath(os.fspath(out_dir))
  train_all = metadata.load_metadata(train_csv, "train")
  test_all = metadata.load_metadata(test_csv, "test")
  train_patients = select_patients(train_all, num_patients, seed, min_malignant)
  if num_test_patients is None:
    num_test_patients = default_num_test_patients(num_patients, train_all["patient_id"].nunique(),
                                                  test_all["patient_id"].nunique())
  test_patients = select_test_patients(test_all, num_test_patients, seed)
  params = _params(len(train_patients), len(test_patients), image_size, seed, min_malignant, num_shards,
                   train_csv, test_csv)
  manifest = _complete_manifest(out_dir, params)
  if manifest is not None:
    logging.info("%s: complete synthetic dataset with these parameters found, not regenerating", out_dir)
    return _summary(out_dir, manifest, time.time() - start, reused=True)
  _check_replaceable(out_dir)
  train_df = train_all[train_all["patient_id"].isin(train_patients)]
  test_df = test_all[test_all["patient_id"].isin(test_patients)]
  metadata.check_leakage(train_df, test_df)
  tmp_dir = out_dir + ".partial"
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  test_truth = hidden_test_labels(test_df, seed)
  manifest = _write_dataset(tmp_dir, train_df, test_df, test_truth, params, num_workers)
  _replace_dir(tmp_dir, out_dir)
  seconds = time.time() - start
  logging.info("%s: %d train + %d test images in %.1f s", out_dir, len(train_df), len(test_df), seconds)
  return _summary(out_dir, manifest, seconds, reused=False)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num_patients", "--num-patients", type=int, default=DEFAULT_NUM_PATIENTS,
                      help="train patients to draw (0 = all 2,056)")
  parser.add_argument("--num_test_patients", "--num-test-patients", type=int, default=None,
                      help="test patients (default: real test:train proportion)")
  parser.add_argument("--image_size", "--image-size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_malignant", "--min-malignant", type=int, default=DEFAULT_MIN_MALIGNANT)
  parser.add_argument("--num_shards", "--num-shards", type=int, default=None)
  parser.add_argument("--num_workers", "--num-workers", type=int, default=1, help="rendering processes")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    summary = generate_dataset(args.out, args.num_patients, args.image_size, args.seed,
                               args.num_test_patients, num_shards=args.num_shards,
                               min_malignant=args.min_malignant, num_workers=args.num_workers)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_records")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
