"""tf.data input pipeline (host side): TFRecords -> decoded, augmented, [-1, 1]-scaled, device-sharded batches.

Targets and fold ids are looked up from the CSV by `image_name`, so both record layouts work and fields the
records lack are joined from the table. Every random choice (order, oversampling, augmentation) is a
stateless function of (seed, epoch, example position): an epoch's stream is the same however often it is
rebuilt, which is what makes a killed run resume to the same result.

Several processes (one run under jax.distributed): each process reads a disjoint share of the training
records every epoch (`sharding.process_share`: whole files when there are at least as many files as processes,
else a disjoint share of the examples), drawn anew from the epoch's seed, and every process yields the
same number of steps. Validation and test images are dealt out by their position in the table
(`sharding.eval_owner`), each process predicting its own; the caller gathers the predictions.
"""
import math
from typing import Optional

import numpy as np
from absl import logging

from melanoma_jax.data import records
from melanoma_jax.data.augment import Augment, augment
from melanoma_jax.data.sharding import eval_owner, process_share
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

_AUTOTUNE = -1  # tf.data.AUTOTUNE, without importing TF at module load.


def _lookup(keys, values, default):
  tf_ = tf()
  init = tf_.lookup.KeyValueTensorInitializer(tf_.constant(list(keys)), tf_.constant(values, tf_.int64))
  return tf_.lookup.StaticHashTable(init, default_value=default)


def _parse(serialized):
  spec = {"image": tf().io.FixedLenFeature([], tf().string),
          "image_name": tf().io.FixedLenFeature([], tf().string)}
  return tf().io.parse_single_example(serialized, spec)


def _records(files, deterministic=True):
  """Parsed records of `files`, files interleaved."""
  tf_ = tf()
  files_ds = tf_.data.Dataset.from_tensor_slices(list(files))
  ds = files_ds.interleave(tf_.data.TFRecordDataset, cycle_length=min(len(files), 8),
                           num_parallel_calls=_AUTOTUNE, deterministic=deterministic)
  return ds.map(_parse, num_parallel_calls=_AUTOTUNE, deterministic=deterministic)


def decode_image(image_bytes, image_size):
  """JPEG bytes -> float32 [image_size, image_size, 3] in [0, 255]."""
  tf_ = tf()
  image = tf_.io.decode_jpeg(image_bytes, channels=3)
  image = tf_.cast(image, tf_.float32)
  shape = tf_.shape(image)
  image = tf_.cond(tf_.logical_and(tf_.equal(shape[0], image_size), tf_.equal(shape[1], image_size)),
                   lambda: image, lambda: tf_.image.resize(image, [image_size, image_size], antialias=True))
  return tf_.ensure_shape(image, [image_size, image_size, 3])


def scale_for_inception(image):
  """[0, 255] -> [-1, 1], the input range Keras' InceptionResNetV2 was trained on."""
  return image / 127.5 - 1.0


class ImagePipeline:
  """Builds the train / eval / predict datasets of one fold split.

  `train_names`, `val_names`: image names of the two sides of the split; `targets`: {image_name: 0/1};
  `labels` (a diagnosis target): {image_name: class index}, given to training batches as 'label'.
  `external`: extra training sets (`data.external.ExternalSet`s: `records(process_index, process_count)`,
  `num_images`, `positives`) mixed into the training stream only, in proportion to their size; the counts
  behind the oversampling share and the steps per epoch include them.
  `global_batch` rows per step, split over `num_devices`; `oversample_share`: malignant share of the
  training stream (0: the natural rate); `max_steps_per_epoch` > 0 caps an epoch; `skip_corrupt` drops
  undecodable images instead of stopping; `augment` None: no training augmentation.
  Several processes: this is process `process_index` of `process_count`; `num_devices` are its own
  (local) devices and its batches hold global_batch / process_count rows (see the module docstring).
  """

  def __init__(self, train_files, test_files, targets, train_names, val_names, *, image_size: int,
               global_batch: int, num_devices: int, oversample_share: float = 0.0,
               max_steps_per_epoch: int = 0, skip_corrupt: bool = False, augment: Optional[Augment] = None,
               process_index: int = 0, process_count: int = 1, labels: Optional[dict] = None,
               external=()):
    self.train_files = list(train_files)
    self.test_files = list(test_files)
    self.image_size = int(image_size)
    self.num_devices = int(num_devices)
    self.global_batch = int(global_batch)
    self.process_index, self.process_count = int(process_index), int(process_count)
    self.local_batch = self.global_batch // self.process_count
    if self.global_batch % self.process_count or self.local_batch % self.num_devices:
      raise ValueError(f"global batch {global_batch} does not split over {process_count} process(es) of "
                       f"{num_devices} devices")
    self.oversample_share = float(oversample_share or 0.0)
    self.max_steps_per_epoch = int(max_steps_per_epoch or 0)
    self.skip_corrupt = bool(skip_corrupt)
    self.augment = augment
    self.train_names = list(train_names)
    self.val_names = list(val_names)
    self._targets = dict(targets)
    self.external = tuple(external)
    self.train_positives = sum(self._targets[n] for n in self.train_names) + sum(e.positives for e in self.external)
    self.num_train = len(self.train_names) + sum(e.num_images for e in self.external)
    if not self.train_names or not self.val_names:
      raise InputError(f"empty split: {len(self.train_names)} training and {len(self.val_names)} validation images")
    if self.train_positives == 0:
      raise InputError("the training split has no malignant image")
    names = self.train_names + self.val_names
    side = [0] * len(self.train_names) + [1] * len(self.val_names)
    self._side = _lookup(names, side, -1)
    self._target = _lookup(names, [self._targets[n] for n in names], -1)
    self._label = None if labels is None else _lookup(names, [int(labels[n]) for n in names], -1)
    self._val_owner = _lookup(self.val_names, [eval_owner(i, self.process_count)
                                               for i in range(len(self.val_names))], -1)

  # ------------------------------------------------------------------------------------------ training
  @property
  def steps_per_epoch(self):
    full = max(1, self.num_train // self.global_batch)
    cap = self.max_steps_per_epoch
    return min(full, cap) if cap > 0 else full

  def positive_share(self):
    """Malignant share of the training stream: the configured oversampling share, or the natural one."""
    natural = self.train_positives / self.num_train
    return max(natural, self.oversample_share)

  def _labelled(self, side, files=None):
    ds = _records(self.train_files if files is None else files)
    ds = ds.map(lambda r: dict(r, side=self._side.lookup(r["image_name"]),
                               target=self._target.lookup(r["image_name"])), num_parallel_calls=_AUTOTUNE)
    return ds.filter(lambda r: tf().equal(r["side"], side))

  def _only(self, ds, names):
    """The records of `ds` whose image is one of `names` (this process's share)."""
    if not names:  # A share can be empty (fewer test images than processes); the lookup needs keys.
      return ds.filter(lambda r: tf().constant(False))
    mine = _lookup(names, [1] * len(names), 0)
    return ds.filter(lambda r: tf().equal(mine.lookup(r["image_name"]), 1))

  def train_dataset(self, epoch, seed):
    """The batches of one training epoch: steps_per_epoch batches of [devices, per_device, ...]."""
    tf_ = tf()
    epoch_seed = int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))
    files, names = process_share(self.train_files, self.train_names, self._targets, epoch_seed,
                                 self.process_index, self.process_count)
    records_ds = self._labelled(0, files)
    if names is not None:
      records_ds = self._only(records_ds, names)
    records_ds = self._with_external(records_ds.map(self._training_record), epoch_seed)
    streams = []
    for label in (0, 1):
      part = records_ds.filter(lambda r, label=label: tf_.equal(r["target"], label))
      count = self.train_positives if label else self.num_train - self.train_positives
      if label:  # The scarce class is drawn many times per epoch: keep its few encoded JPEGs in memory.
        part = part.cache()
      streams.append(part.shuffle(min(count, 4096), seed=epoch_seed + label).repeat())
    total = self.steps_per_epoch * self.local_batch  # This process's rows; the same in every process.
    skip = self.skip_corrupt
    share = self.positive_share()  # The global share: each process draws its rows at the same rate.
    draws = total * (2 if skip else 1)  # Twice the draws when corrupt examples may be skipped.
    first = self.process_index * draws  # Each process its own stretch of the one random sequence.
    choice = tf_.data.Dataset.range(first, first + draws).map(
        lambda i: tf_.cast(tf_.random.stateless_uniform([], [epoch_seed, i]) < share, tf_.int64))
    ds = tf_.data.Dataset.choose_from_datasets(streams, choice)
    ds = ds.enumerate(start=first).map(lambda i, r: self._train_example(r, [epoch_seed, i]),
                            num_parallel_calls=_AUTOTUNE, deterministic=True)
    return self._finish(self._skip_corrupt(ds).take(total))

  def _training_record(self, record):
    """A 2020 training record in the keys external sets give: image, image_name, target, label."""
    label = (self._label.lookup(record["image_name"]) if self._label is not None
             else tf().constant(-1, tf().int64))
    return {"image": record["image"], "image_name": record["image_name"], "target": record["target"],
            "label": label}

  def _with_external(self, records_ds, epoch_seed):
    """The 2020 records mixed with this process's share of each external set, each drawn in proportion
    to its size (so a large archive does not come after all of 2020 in the shuffled streams)."""
    if not self.external:
      return records_ds
    sources = [records_ds] + [e.records(self.process_index, self.process_count) for e in self.external]
    sizes = [len(self.train_names)] + [e.num_images for e in self.external]
    return tf().data.Dataset.sample_from_datasets(sources, [n / sum(sizes) for n in sizes], seed=epoch_seed,
                                                  stop_on_empty_dataset=False)

  def _train_example(self, record, seed):
    image = decode_image(record["image"], self.image_size)
    if self.augment is not None:
      image = augment(image, tf().cast(seed, tf().int64), self.augment)
    example = {"x": scale_for_inception(image), "y": tf().cast(record["target"], tf().float32),
               "mask": tf().ones([], tf().float32), "image_name": record["image_name"]}
    if self._label is not None:
      example["label"] = tf().cast(record["label"], tf().int32)
    return example

  # ------------------------------------------------------------------------------------------ evaluation
  def _eval_example(self, record):
    return {"x": scale_for_inception(decode_image(record["image"], self.image_size)),
            "y": tf().cast(tf().maximum(record.get("target", tf().constant(0, tf().int64)), 0), tf().float32),
            "mask": tf().ones([], tf().float32), "image_name": record["image_name"]}

  def _padded(self, ds, count):
    """Pads with masked blanks to whole batches: every example is seen exactly once.

    `count` is the table's count; with several processes each holds at most ceil(count / processes) of
    them and all pad to that, so every process runs the same number of prediction steps.
    """
    tf_ = tf()
    blank = {"x": tf_.zeros([self.image_size, self.image_size, 3]), "y": tf_.zeros([]),
             "mask": tf_.zeros([]), "image_name": tf_.constant(b"")}
    share = math.ceil(count / self.process_count)
    padded_total = max(1, math.ceil(share / self.local_batch)) * self.local_batch
    ds = ds.concatenate(tf_.data.Dataset.from_tensors(blank).repeat()).take(padded_total)
    return self._finish(ds)

  def val_dataset(self):
    """This process's validation images (all of them with one process), padded to whole batches."""
    ds = self._labelled(1)
    if self.process_count > 1:
      ds = ds.filter(lambda r: tf().equal(self._val_owner.lookup(r["image_name"]), self.process_index))
    ds = ds.map(self._eval_example, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return self._padded(self._skip_corrupt(ds), len(self.val_names))

  def test_dataset(self, num_test, test_names=None):
    """This process's test images (all of them with one process; several need `test_names`, the table's
    order), padded to whole batches."""
    ds = _records(self.test_files)
    if self.process_count > 1:
      if test_names is None or len(test_names) != num_test:
        raise ValueError("several processes share the test set by the names of its table")
      mine = [n for i, n in enumerate(test_names) if eval_owner(i, self.process_count) == self.process_index]
      ds = self._only(ds, mine)
    ds = ds.map(self._eval_example, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return self._padded(self._skip_corrupt(ds), num_test)

  def _skip_corrupt(self, ds):
    """With config.skip_corrupt, drops examples whose decoding failed (logged; counted by the caller)."""
    return ds.ignore_errors(log_warning=True) if self.skip_corrupt else ds

  def _finish(self, ds):
    return ds.batch(self.local_batch, drop_remainder=True).prefetch(_AUTOTUNE)

  # ------------------------------------------------------------------------------------------ to devices
  def device_batches(self, ds, files):
    """Yields (sharded numpy batch for the devices, image names) and names the file of a corrupt record."""
    iterator = iter(ds)
    while True:
      try:
        batch = next(iterator)
      except StopIteration:
        return
      except (tf().errors.InvalidArgumentError, tf().errors.DataLossError) as e:
        raise find_corrupt(files, e) from None
      names = batch.pop("image_name", None)
      host = {k: v.numpy() for k, v in batch.items()}
      sharded = {k: v.reshape((self.num_devices, -1) + v.shape[1:]) for k, v in host.items()}
      yield sharded, (None if names is None else [n.decode() for n in names.numpy()])


def find_corrupt(files, error):
  """An InputError naming the first corrupt record file or JPEG among `files` (run only after a failure)."""
  tf_ = tf()
  for path in files:
    try:
      for example in records.read_examples(path):
        try:
          tf_.io.decode_jpeg(example["image"], channels=3)
        except tf_.errors.InvalidArgumentError:
          return InputError(f"{path}: image {example['image_name']} is not a decodable JPEG "
                            "(set config.skip_corrupt=True to skip and count such images)")
    except InputError as e:
      return e
  return InputError(f"reading {len(files)} TFRecord file(s) failed: {str(error).splitlines()[0]}")


def count_check(seen, expected, what, source, skip_corrupt=False):
  """Raises if an evaluation pass saw a different number of examples than its table lists.

  With skip_corrupt, fewer examples (corrupt ones skipped) are logged with their count instead.
  """
  if skip_corrupt and seen < expected:
    logging.warning("%s: %d of the %d image(s) of %s were skipped as corrupt", source, expected - seen,
                    expected, what)
    return
  if seen != expected:
    raise InputError(f"{source}: {what} has {expected} image(s) in its CSV but {seen} in its TFRecords "
                     "(missing or extra records)")
