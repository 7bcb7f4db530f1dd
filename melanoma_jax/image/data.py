"""The image task's data: its data source, the patient-grouped fold split and the fold's tf.data pipeline."""
import dataclasses
import os

import numpy as np
import pandas as pd
from absl import logging

from melanoma_jax.data import diagnosis, external
from melanoma_jax.data import folds as folds_lib
from melanoma_jax.data import pipeline as pipeline_lib
from melanoma_jax.data import sources
from melanoma_jax.training import distributed, losses


def data_dir_of(run, workdir):
  """`run.data_dir`, or (when it is "") the synthetic set generated (once; reused after) into WORKDIR/data
  (by process 0 of a multi-process run; the others wait for it)."""
  if run.data_dir:
    return run.data_dir
  from melanoma_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  data_dir = os.path.join(workdir, "data")
  if distributed.is_primary():
    summary = synthetic.generate_dataset(data_dir, **run.synthetic_kwargs)
    logging.info("synthetic data in %s: %s", data_dir,
                 {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
  distributed.barrier("synthetic data")
  return data_dir


def resolve_data(run, workdir):
  """The run's ImageData, from `data_dir_of(run, workdir)`."""
  data = sources.resolve(data_dir_of(run, workdir))
  logging.info("%s", data.leakage_report)
  logging.info("records: %d train and %d test file(s), %s layout", len(data.train_files),
               len(data.test_files), data.layout)
  return data


@dataclasses.dataclass
class Split:
  train_df: pd.DataFrame
  val_df: pd.DataFrame


def make_split(run, data):
  """The training and validation rows of fold `run.fold`; both sides must hold both classes."""
  fold_ids = folds_lib.assign_folds(data.train_df, run.num_folds, run.seed)
  folds_lib.check_folds_have_both_classes(data.train_df, fold_ids, [run.fold])
  train_df = data.train_df[fold_ids != run.fold].reset_index(drop=True)
  val_df = data.train_df[fold_ids == run.fold].reset_index(drop=True)
  logging.info("fold %d/%d: %d training images (%d malignant), %d validation images (%d malignant) of "
               "disjoint patients", run.fold, run.num_folds, len(train_df), train_df["target"].sum(),
               len(val_df), val_df["target"].sum())
  return Split(train_df, val_df)


def labels_of(run, data):
  """{image_name: diagnosis class index} of the training table for a diagnosis target, else None."""
  if run.target != "diagnosis":
    return None
  return dict(zip(data.train_df["image_name"], diagnosis.labels_2020(data.train_df, data.train_df.attrs.get(
      "path", "train.csv"))))


def external_sets(run):
  """The run's external training sets (`config.extra_data`), checked; () when none."""
  sets = external.open_sets(run.extra_data)
  for one in sets:
    logging.info("external training data %s: %d images (%d melanoma)", one.directory, one.num_images,
                 one.positives)
  return sets


def make_pipeline(run, data, split, extra=()):
  """The fold's pipeline; `extra` (`external_sets(run)`) joins its training stream only."""
  targets = dict(zip(data.train_df["image_name"], data.train_df["target"].astype(int)))
  return pipeline_lib.ImagePipeline(data.train_files, data.test_files, targets, split.train_df["image_name"],
                                    split.val_df["image_name"], labels=labels_of(run, data), external=extra,
                                    **run.pipeline_kwargs)


def training_class_counts(run, data, split, extra=()):
  """Training images per diagnosis class (2020 fold rows and external sets), or None for a binary target."""
  labels = labels_of(run, data)
  if labels is None:
    return None
  counts = np.bincount([labels[n] for n in split.train_df["image_name"]], minlength=len(diagnosis.CLASSES))
  return counts + np.sum([e.counts() for e in extra], axis=0, dtype=np.int64) if extra else counts


def stream_class_weights(run, pipeline, class_counts=None):
  """`run.class_weights`, or each class's 1 / (K n_c) of the training stream after oversampling: the binary
  target's N / (2 N_c); a diagnosis target's over its classes present (`class_counts`: training images per
  class), MEL at the oversampled share and the others sharing the rest as in the data."""
  if run.class_weights:
    return run.class_weights
  share = pipeline.positive_share()
  if run.target != "diagnosis":
    return 1.0 / (2.0 * (1.0 - share)), 1.0 / (2.0 * share)
  counts = np.asarray(class_counts, np.float64).copy()
  counts[diagnosis.MEL] = 0.0
  shares = (1.0 - share) * counts / counts.sum()
  shares[diagnosis.MEL] = share
  return losses.stream_class_weights(shares)
