"""Which patients: the seeded subset of the real metadata that gets images, and the hidden test labels."""
import logging

import numpy as np

from melanoma_jax.data.synthetic import seeding
from melanoma_jax.utils.errors import InputError

# Default subset: 250 of the 2,056 train patients (about 4,000 images, about 70 malignant) and the test
# patients in the same proportion (84 of 690, about 1,300 images). See `select_patients`.
DEFAULT_NUM_PATIENTS = 250
DEFAULT_MIN_MALIGNANT = 60
# Rate at which hidden labels of synthetic test images are malignant: the real train rate, 584 / 33,126.
TEST_MALIGNANT_RATE = 584 / 33126


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
  rng = seeding.stable_rng(seed, "select_patients", seeding.SELECT_STREAM)
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
  rng = seeding.stable_rng(seed, "select_test_patients", seeding.SELECT_STREAM)
  return sorted(_systematic_draw(rng, list(per_patient.index), per_patient.to_numpy(), num_test_patients))


def default_num_test_patients(num_patients, num_train_patients, num_all_test_patients):
  """Test patients in the real test:train proportion (690:2,056); all of them when train is whole."""
  if not num_patients or num_patients >= num_train_patients:
    return num_all_test_patients
  return max(1, int(round(num_patients * num_all_test_patients / num_train_patients)))


def hidden_test_labels(test_df, seed):
  """Ground truth drawn for synthetic test images: malignant at the real train rate, per image name."""
  draws = [seeding.stable_rng(seed, name, seeding.TEST_LABEL_STREAM).uniform()
           for name in test_df["image_name"]]
  return (np.asarray(draws) < TEST_MALIGNANT_RATE).astype(np.int64)

