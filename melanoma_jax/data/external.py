"""External training images beside the 2020 set (`config.extra_data`): built ISIC archive sets, read through
TFDS into the record dicts the 2020 training stream uses, for training only (validation, oof.csv, the report
and the submission stay 2020-only, so the validation AUC is the 2020-only AUC)."""
import dataclasses
import glob
import os
from typing import Dict, Tuple

from melanoma_jax.data import diagnosis, isic_archive
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf


@dataclasses.dataclass(frozen=True)
class ExternalSet:
  """One built archive set: its dataset directory and its images per diagnosis class."""
  directory: str
  class_counts: Dict[str, int]

  @property
  def num_images(self) -> int:
    return sum(self.class_counts.values())

  @property
  def positives(self) -> int:
    return int(self.class_counts.get(diagnosis.CLASSES[diagnosis.MEL], 0))

  def counts(self) -> Tuple[int, ...]:
    """Images per class, in diagnosis.CLASSES order."""
    return tuple(int(self.class_counts.get(name, 0)) for name in diagnosis.CLASSES)

  def files(self):
    """The files that define the set (its records and TFDS' description of them), for the run's identity."""
    return sorted(p for p in glob.glob(os.path.join(self.directory, "*")) if os.path.isfile(p))

  def records(self, process_index=0, process_count=1):
    """This process's share of the set (disjoint from the other processes', TFDS' split_for_jax_process) as
    {image (JPEG bytes), image_name, target, label (the diagnosis class)} dicts, the 2020 records' keys."""
    ds = isic_archive.load(self.directory, "train", process_index=process_index, process_count=process_count)
    return ds.map(lambda r: {"image": r["image"], "image_name": r["image_name"], "target": r["target"],
                             "label": tf().cast(r["diagnosis"], tf().int64)},
                  num_parallel_calls=tf().data.AUTOTUNE)


def open_sets(spec: str) -> Tuple[ExternalSet, ...]:
  """The sets of `spec`, dataset directories separated by commas ("" none); one-line InputError for a
  directory that is not a built set or is named twice."""
  directories = [d.strip() for d in str(spec or "").split(",") if d.strip()]
  seen = set()
  sets = []
  for directory in directories:
    real = os.path.realpath(directory)
    if real in seen:
      raise InputError(f"config.extra_data: {directory} is named twice (its images would count twice)")
    seen.add(real)
    sets.append(ExternalSet(directory, isic_archive.class_counts(directory)))
  return tuple(sets)
