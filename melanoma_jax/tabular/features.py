"""Tabular features from the ISIC metadata: a preprocessor fitted on training rows only.

`fit(train_df, patient_context)` learns the categories and the scaling statistics from the training rows;
the returned immutable `Preprocessor` transforms training, validation and test rows alike and never learns
anything from them. The output columns are fixed at fit time (`Preprocessor.columns`), so they cannot
shift between train and test.

Encoding:
  * `sex`, `anatom_site_general_challenge`: one-hot over the categories seen in the training rows (sorted),
    plus a `=missing` bit per column set where the value is missing (a missing site is its own state, not
    "no site"). A category never seen in training (e.g. a new site in test.csv) is encoded all-zero
    (neither a known category nor missing); `transform` logs a warning with the count.
  * `age_approx`: Min-Max scaled with the training minimum and maximum, clipped to [0, 1]; missing -> 0,
    plus an `age_approx=missing` bit.
  * Patient context (optional, the metadata "ugly duckling"): per-patient statistics computed from the rows
    of the table being transformed (train.csv rows for training and validation, test.csv rows for test),
    never from targets. Counts are log1p'ed; each feature is standardised with the training mean and
    standard deviation and clipped to [-5, 5], so an extreme test patient (e.g. more images than any in
    train) saturates rather than extrapolates. (Standardising rather than Min-Max matters here: several of
    these have long tails that Min-Max squeezes into a sliver of [0, 1], and the MLP then barely uses them.)
"""
import dataclasses
from typing import Dict, Tuple

from absl import logging
import numpy as np
import pandas as pd

from melanoma_jax.utils.errors import InputError

SEX, SITE, AGE = "sex", "anatom_site_general_challenge", "age_approx"
CATEGORICAL_COLUMNS = (SEX, SITE)
FEATURE_COLUMNS = (SEX, AGE, SITE)
MISSING = "missing"
CONTEXT_CLIP = 5.0
# The sites of the ISIC 2020 taxonomy, for the patient's site profile (fixed, so never fitted).
ISIC_SITES = ("head/neck", "lower extremity", "oral/genital", "palms/soles", "torso", "upper extremity")

# Patient-context features, in their fixed column order. "Visit" = the patient's images at one age.
CONTEXT_FEATURES = (
    "log_patient_images",          # images of the patient
    "log_images_same_age",         # images of the patient at this age (the visit's size)
    "log_images_same_site",        # images of the patient at this site
    "log_images_same_age_site",    # images of the visit at this site
    "log_same_site_other_ages",    # images of the patient at this site at other ages
    "log_images_before",           # images of the patient at younger ages
    "log_images_after",            # images of the patient at older ages
    "log_smallest_visit",
    "log_largest_visit",
    "log_images_per_visit",        # patient's images / distinct ages
    "share_same_age",              # visit size / patient's images
    "share_same_site",             # images at this site / patient's images
    "visit_share_same_site",       # images of the visit at this site / visit size
    "visit_vs_largest",            # visit size / the patient's largest visit
    "site_vs_patient_mean",        # images at this site / the patient's mean per site
    "patient_sites",               # distinct sites (missing counts as one)
    "patient_ages",                # distinct ages (visits)
    "sites_at_age",                # distinct sites of the visit
    "site_visits",                 # distinct ages with an image at this site
    "age_minus_patient_min",
    "age_minus_patient_mean",
    "patient_max_minus_age",
    "patient_age_span",
    "patient_age_std",
    "age_rank_in_patient",         # 0 at the patient's first age, 1 at the last
    "patient_mean_age",
    "patient_site_missing_share",
) + tuple(f"patient_share_{site}" for site in ISIC_SITES)  # the patient's site profile


def _table_name(df):
  return df.attrs.get("path", "<table>")


def check_columns(df, patient_context):
  """Raises InputError naming the table and the column if a feature column is missing or not numeric."""
  required = FEATURE_COLUMNS + (("patient_id",) if patient_context else ())
  missing = [c for c in required if c not in df.columns]
  if missing:
    raise InputError(f"{_table_name(df)}: missing feature column(s) {', '.join(missing)}")
  if not pd.api.types.is_numeric_dtype(df[AGE]):
    raise InputError(f"{_table_name(df)}: column {AGE} is not numeric")


def patient_context_frame(df):
  """Per-row patient statistics (CONTEXT_FEATURES) from the rows of `df` alone; no targets.

  A missing site is its own site; a missing age is its own visit; features undefined for a row are 0.
  """
  site_missing = df[SITE].isna().to_numpy()
  frame = pd.DataFrame({
      "p": df["patient_id"].astype(str).to_numpy(),
      "age": df[AGE].to_numpy(dtype=np.float64),
      "site": df[SITE].astype(object).where(~site_missing, "\0missing").astype(str).to_numpy(),
      "site_missing": site_missing.astype(np.float64),
  })
  for site in ISIC_SITES:
    frame[site] = (frame["site"] == site).astype(np.float64)

  def per(keys, column, how):
    return frame.groupby(keys, sort=False, dropna=False)[column].transform(how).to_numpy(np.float64)

  n = per("p", "p", "size")
  n_age = per(["p", "age"], "p", "size")
  n_site = per(["p", "site"], "p", "size")
  n_age_site = per(["p", "age", "site"], "p", "size")
  frame["n_age"] = n_age
  ages = per("p", "age", "nunique")
  sites = per("p", "site", "nunique")
  age = frame["age"].to_numpy()
  age_min, age_max, age_mean = per("p", "age", "min"), per("p", "age", "max"), per("p", "age", "mean")
  rank = frame.groupby("p", sort=False)["age"].rank(method="dense").to_numpy() - 1.0
  # Images of the patient at younger ages: cumulative visit sizes in age order.
  visits = frame.groupby(["p", "age"], sort=True)["p"].size().rename("size").reset_index()
  visits["through"] = visits.groupby("p")["size"].cumsum()
  through = frame[["p", "age"]].merge(visits, on=["p", "age"], how="left")["through"].to_numpy(np.float64)
  before = through - n_age
  values = {
      "log_patient_images": np.log1p(n),
      "log_images_same_age": np.log1p(n_age),
      "log_images_same_site": np.log1p(n_site),
      "log_images_same_age_site": np.log1p(n_age_site),
      "log_same_site_other_ages": np.log1p(n_site - n_age_site),
      "log_images_before": np.log1p(before),
      "log_images_after": np.log1p(n - through),
      "log_smallest_visit": np.log1p(per("p", "n_age", "min")),
      "log_largest_visit": np.log1p(per("p", "n_age", "max")),
      "log_images_per_visit": np.log1p(n / np.maximum(ages, 1.0)),
      "share_same_age": n_age / n,
      "share_same_site": n_site / n,
      "visit_share_same_site": n_age_site / n_age,
      "visit_vs_largest": n_age / per("p", "n_age", "max"),
      "site_vs_patient_mean": n_site * sites / n,
      "patient_sites": sites,
      "patient_ages": ages,
      "sites_at_age": per(["p", "age"], "site", "nunique"),
      "site_visits": per(["p", "site"], "age", "nunique"),
      "age_minus_patient_min": age - age_min,
      "age_minus_patient_mean": age - age_mean,
      "patient_max_minus_age": age_max - age,
      "patient_age_span": age_max - age_min,
      "patient_age_std": per("p", "age", "std"),
      "age_rank_in_patient": rank / np.maximum(ages - 1.0, 1.0),
      "patient_mean_age": age_mean,
      "patient_site_missing_share": per("p", "site_missing", "mean"),
  }
  for site in ISIC_SITES:
    values[f"patient_share_{site}"] = per("p", site, "mean")
  result = pd.DataFrame({name: values[name] for name in CONTEXT_FEATURES}, index=df.index)
  return result.replace([np.inf, -np.inf], np.nan).fillna(0.0)


@dataclasses.dataclass(frozen=True)
class Preprocessor:
  """A fitted, immutable feature encoder: build it with `fit`, serialise with `to_dict`/`from_dict`."""
  categories: Dict[str, Tuple[str, ...]]  # categorical column -> training categories, sorted
  age_min: float
  age_max: float
  context_columns: Tuple[str, ...]        # () without patient context
  context_mean: Tuple[float, ...]
  context_std: Tuple[float, ...]

  @property
  def patient_context(self):
    return bool(self.context_columns)

  @property
  def columns(self):
    """Feature names in the fixed column order of `transform`'s output."""
    names = []
    for column in CATEGORICAL_COLUMNS:
      names += [f"{column}={c}" for c in self.categories[column]] + [f"{column}={MISSING}"]
    return tuple(names + [AGE, f"{AGE}={MISSING}"] + list(self.context_columns))

  def unknown_categories(self, df):
    """{categorical column: number of rows with a (non-missing) value not seen in training}."""
    check_columns(df, False)
    return {c: int((df[c].notna() & ~df[c].isin(self.categories[c])).sum()) for c in CATEGORICAL_COLUMNS}

  def transform(self, df):
    """float32 [len(df), len(columns)]; learns nothing from `df`."""
    check_columns(df, self.patient_context)
    blocks = []
    for column in CATEGORICAL_COLUMNS:
      values, known = df[column], self.categories[column]
      bits = [values.eq(c).fillna(False).to_numpy(bool) for c in known] + [values.isna().to_numpy(bool)]
      blocks.append(np.stack(bits, axis=1))
      unknown = values.notna() & ~values.isin(known)
      if unknown.any():
        logging.warning("%s: %d row(s) with a %s not seen in training (%s): encoded all-zero",
                        _table_name(df), int(unknown.sum()), column,
                        ", ".join(sorted(map(str, set(values[unknown])))[:5]))
    age = df[AGE].to_numpy(np.float64)
    span = self.age_max - self.age_min
    scaled_age = np.clip((age - self.age_min) / (span if span > 0 else 1.0), 0.0, 1.0)
    blocks += [np.nan_to_num(scaled_age, nan=0.0)[:, None], np.isnan(age)[:, None]]
    if self.patient_context:
      context = patient_context_frame(df)[list(self.context_columns)].to_numpy(np.float64)
      standardised = (context - np.asarray(self.context_mean)) / np.asarray(self.context_std)
      blocks.append(np.clip(standardised, -CONTEXT_CLIP, CONTEXT_CLIP))
    return np.concatenate([b.astype(np.float32) for b in blocks], axis=1)

  def to_dict(self):
    return {"categories": {k: list(v) for k, v in self.categories.items()}, "age_min": self.age_min,
            "age_max": self.age_max, "context_columns": list(self.context_columns),
            "context_mean": list(self.context_mean), "context_std": list(self.context_std)}

  @classmethod
  def from_dict(cls, d):
    return cls(categories={k: tuple(v) for k, v in d["categories"].items()},
               age_min=float(d["age_min"]), age_max=float(d["age_max"]),
               context_columns=tuple(d["context_columns"]),
               context_mean=tuple(float(v) for v in d["context_mean"]),
               context_std=tuple(float(v) for v in d["context_std"]))


def fit(train_df, patient_context=False):
  """Fits the encoder on training rows only: their categories, age range and context mean/std."""
  check_columns(train_df, patient_context)
  if train_df.empty:
    raise InputError(f"{_table_name(train_df)}: no training rows to fit the features on")
  categories = {c: tuple(sorted(str(v) for v in train_df[c].dropna().unique())) for c in CATEGORICAL_COLUMNS}
  age = train_df[AGE].to_numpy(np.float64)
  has_age = not np.isnan(age).all()
  context_columns, mean, std = (), (), ()
  if patient_context:
    context = patient_context_frame(train_df)
    context_columns = tuple(context.columns)
    mean = tuple(float(v) for v in context.mean())
    # A constant column would divide by zero: its std is taken as 1 (it maps to 0 either way).
    std = tuple(float(v) if v > 0 else 1.0 for v in context.std(ddof=0))
  return Preprocessor(categories=categories,
                      age_min=float(np.nanmin(age)) if has_age else 0.0,
                      age_max=float(np.nanmax(age)) if has_age else 0.0,
                      context_columns=context_columns, context_mean=mean, context_std=std)
