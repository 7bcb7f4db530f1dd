"""What to draw: a patient's style (skin, hair, the look of their nevi) and the parameters of one lesion.

A patient's benign nevi are small variations of their nevus style; a melanoma is that style pushed towards
the ABCD rule (Asymmetry, irregular Border, several Colours, larger Diameter) by a per-lesion severity; a few
benign lesions are look-alikes (dysplastic nevi, blue nevi, angiomas). These are numbers, not pixels:
`render` turns them into an image.
"""
import dataclasses

import numpy as np

from melanoma_jax.data.synthetic import seeding

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
  nevus_family: int = -1  # Ugly-duckling sets: the nevi's colour family (_NEVUS_FAMILIES); -1 otherwise.


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


def patient_style(seed, patient_id, independent_nevi=False):
  """The PatientStyle of a patient, a pure function of (seed, patient_id).

  `independent_nevi` (ugly-duckling sets): the nevus fields come from a style drawn on a stream of their
  own, so a patient's nevi carry no trace of their skin, and a stranger's nevus on this skin (an ugly
  duckling) is as plausible as the patient's own. Skin and hair are the same either way.
  """
  style = make_patient_style(seeding.stable_rng(seed, patient_id, seeding.PATIENT_STREAM))
  if not independent_nevi:
    return style
  return dataclasses.replace(style, **make_nevus_style(seeding.stable_rng(seed, patient_id, seeding.NEVUS_STREAM)))


# Colour families of benign nevi in ugly-duckling sets (linear RGB): tan, mid brown, dark brown, reddish
# brown, grey-brown. Distinct families make one patient's nevi unlike another's, as moles differ between people.
_NEVUS_FAMILIES = np.array([[0.70, 0.52, 0.40], [0.50, 0.33, 0.22], [0.30, 0.19, 0.13], [0.55, 0.33, 0.25],
                            [0.46, 0.38, 0.33]], np.float32)


def make_nevus_style(rng, other_than=-1):
  """{nevus_* field of PatientStyle: value} of benign nevi in an ugly-duckling set, independent of the skin.

  Wider between patients than `make_patient_style`'s (which ties nevi to the skin): the personal "style" an
  ugly duckling breaks. Both a patient's own nevi and a stranger's (the duckling's donor) come from here.
  `other_than` (a family index) draws the family uniformly among the others: a donor unlike the patient.
  Over patients, whose own family is uniform, the donors' families are then uniform too, so a duckling's
  look is distributed exactly as a benign nevus's.
  """
  count = len(_NEVUS_FAMILIES)
  index = int(rng.integers(count)) if other_than < 0 else (other_than + 1 + int(rng.integers(count - 1))) % count
  family = _NEVUS_FAMILIES[index]
  return {"nevus_family": index,
          # Lighter or darker within the family, the hue nearly kept: a brown mole stays brown.
          "nevus_rgb": tuple(float(c) for c in np.clip(family * rng.uniform(0.85, 1.15) * rng.uniform(0.96, 1.04, 3),
                                                       0, 1)),
          "nevus_radius": float(rng.uniform(0.15, 0.5)), "nevus_aspect": float(rng.uniform(1.0, 1.6)),
          "nevus_centre_dark": float(rng.uniform(-0.2, 0.5)), "nevus_network": float(rng.uniform(0.0, 0.6))}


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


def _ugly_duckling_kind(rng, style, kind, strength):
  """(kind, donor style or None) of a lesion of an ugly-duckling set of `strength` in (0, 1].

  With probability `strength` a melanoma is drawn as a typical nevus of a stranger: the "donor" style is the
  patient's own with a fresh nevus style of another colour family (`make_nevus_style`). It looks like some
  patient's benign mole, only not like this patient's own. With the same probability a benign lesion is the
  patient's own typical nevus (no look-alike), so at strength 1 only within-patient comparison separates
  the classes.
  """
  if rng.uniform() >= strength:
    return kind, None
  if kind == "melanoma":
    return kind, dataclasses.replace(style, **make_nevus_style(rng, other_than=style.nevus_family))
  return "nevus", None


def make_lesion_params(rng, style, malignant, ugly_duckling=0.0):
  """Draws one lesion: a variant of the patient's nevus style, a benign look-alike, or a melanoma.

  `ugly_duckling` in [0, 1]: see `_ugly_duckling_kind`; 0 draws exactly what the generator always drew.
  """
  kind, donor = _lesion_kind(rng, malignant), None
  if ugly_duckling > 0.0:  # Only then: the draws of an ordinary set stay as they are.
    kind, donor = _ugly_duckling_kind(rng, style, kind, float(ugly_duckling))
  s = 0.0 if donor is not None else _severity(rng, kind)
  centre = tuple(float(c) for c in rng.normal(0.0, 0.08, 2))
  if donor is not None:
    look = _nevus_look(rng, donor, 0.0, centre, atypical=False)
  elif kind == "melanoma":
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

