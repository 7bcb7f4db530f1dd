"""The archive's metadata values mapped onto the 2020 vocabulary, so one model reads both sets alike.

Sites: 2020's `anatom_site_general_challenge` has head/neck, upper extremity, lower extremity, torso,
palms/soles and oral/genital. ISIC 2019 splits the torso (anterior / posterior / lateral); HAM10000 (2018)
names body parts (`localization`). A value this module does not know becomes "" (unknown), as a blank does:
guessing a site would put a wrong value where the 2020 data has a missing one.
"""
import math

SITES_2020 = ("head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital")
UNKNOWN = ""

_SITE_MAP = {
    # 2019's anatom_site_general.
    "anterior torso": "torso", "posterior torso": "torso", "lateral torso": "torso",
    # HAM10000's localization.
    "back": "torso", "trunk": "torso", "abdomen": "torso", "chest": "torso",
    "face": "head/neck", "scalp": "head/neck", "ear": "head/neck", "neck": "head/neck",
    "hand": "upper extremity", "foot": "lower extremity", "acral": "palms/soles", "genital": "oral/genital",
    **{site: site for site in SITES_2020},
}

_SEXES = ("male", "female")


def _blank(value):
  return value is None or (isinstance(value, float) and math.isnan(value)) or not str(value).strip()


def site_2020(value):
  """The 2020 site of an archive site value; "" for a blank, "unknown" or unmapped one."""
  if _blank(value):
    return UNKNOWN
  return _SITE_MAP.get(str(value).strip().lower(), UNKNOWN)


def sex(value):
  """"male" or "female" as in 2020; "" for a blank or HAM10000's "unknown"."""
  if _blank(value):
    return UNKNOWN
  value = str(value).strip().lower()
  return value if value in _SEXES else UNKNOWN


def age(value):
  """The age as a float; NaN when blank (as 2020's age_approx is in pandas)."""
  if _blank(value):
    return float("nan")
  return float(value)
