"""tf.data input pipeline (host side): TFRecords -> decoded, augmented, [-1, 1]-scaled, device-sharded batches.

Targets and fold ids are looked up from the CSV by `image_name`, so both record layouts work and fields the
records lack are joined from the table. Every random choice (order, oversampling, augmentation) is a
stateless function of (seed, epoch, example position): an epoch's stream is the same however often it is
rebuilt, which is what makes a killed run resume to the same result.
"""
import dataclasses
import functools
import math
from typing import Optional

import jax
import numpy as np
from absl import logging

from melanoma_jax.data import records
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
  """Parsed records of `files`, files interleaved, sharded by JAX process for multi-host runs."""
  tf_ = tf()
  files_ds = tf_.data.Dataset.from_tensor_slices(list(files))
  if jax.process_count() > 1:
    files_ds = files_ds.shard(jax.process_count(), jax.process_index())
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


def _affine_matrix(seed, size, aug, flip_lr=None, flip_ud=None):
  """A random output->input projective transform (flips, rotation, shear, zoom, shift) as the 8 TF parameters.

  `flip_lr` / `flip_ud`: boolean scalars; the flips are folded into the same transform, so they cost
  nothing beyond the one resampling pass.
  """
  tf_ = tf()
  u = tf_.random.stateless_uniform([6], seed=seed, minval=-1.0, maxval=1.0)
  deg = math.pi / 180.0
  rotation = u[0] * aug.rotation_deg * deg
  shear = u[1] * aug.shear_deg * deg
  zoom_x = 1.0 + u[2] * aug.zoom
  zoom_y = 1.0 + u[3] * aug.zoom
  shift_x = u[4] * aug.shift * size
  shift_y = u[5] * aug.shift * size
  c, s = tf_.cos(rotation), tf_.sin(rotation)
  one, zero = tf_.ones([]), tf_.zeros([])
  sign = lambda flip: one if flip is None else tf_.where(flip, -one, one)
  # Forward map (input -> output) about the image centre: flip, zoom, shear, rotate; its inverse samples
  # the input.
  flips = tf_.reshape(tf_.stack([sign(flip_lr), zero, zero, zero, sign(flip_ud), zero, zero, zero, one]),
                      [3, 3])
  rot = tf_.reshape(tf_.stack([c, -s, zero, s, c, zero, zero, zero, one]), [3, 3])
  shr = tf_.reshape(tf_.stack([one, tf_.tan(shear), zero, zero, one, zero, zero, zero, one]), [3, 3])
  zm = tf_.reshape(tf_.stack([zoom_x, zero, zero, zero, zoom_y, zero, zero, zero, one]), [3, 3])
  half = (size - 1) / 2.0
  to_centre = tf_.reshape(tf_.stack([one, zero, -half, zero, one, -half, zero, zero, one]), [3, 3])
  back = tf_.reshape(tf_.stack([one, zero, half + shift_x, zero, one, half + shift_y, zero, zero, one]),
                     [3, 3])
  forward = back @ rot @ shr @ zm @ flips @ to_centre
  inverse = tf_.linalg.inv(forward)
  inverse = inverse / inverse[2, 2]
  return tf_.reshape(inverse, [9])[:8]


def _colour_params(seeds, aug):
  """Random brightness shift b (in [0, 255] units), contrast factor c and saturation factor s."""
  tf_ = tf()
  b = (tf_.random.stateless_uniform([], seeds[3], -aug.brightness, aug.brightness) * 255.0
       if aug.brightness else tf_.zeros([]))
  c = (tf_.random.stateless_uniform([], seeds[4], 1.0 - aug.contrast, 1.0 + aug.contrast)
       if aug.contrast else tf_.ones([]))
  s = (tf_.random.stateless_uniform([], seeds[5], 1.0 - aug.saturation, 1.0 + aug.saturation)
       if aug.saturation else tf_.ones([]))
  return tf_.stack([b, c, s])


def _colour_map(image, params, contrast: bool, saturation: bool):
  """Brightness, contrast and saturation jitter as one per-pixel affine colour map, applied in one pass.

  Equal to applying them one after another: brightness adds b; contrast scales about the (shifted)
  per-channel mean by c; saturation scales about the per-pixel grey (channel mean) by s. Composed:
  out = c * s * x + c * (1 - s) * grey(x) + d, with d from the per-channel mean, b, c and s.
  """
  tf_ = tf()
  b, c, s = params[0], params[1], params[2]
  mean = tf_.reduce_mean(image, axis=[0, 1]) if contrast else tf_.zeros([3])
  e = mean * (1.0 - c) + b  # After brightness and contrast: c * x + e.
  d = s * e + (1.0 - s) * tf_.reduce_mean(e)
  out = (c * s) * image + d
  if saturation:
    out = out + (c * (1.0 - s)) * tf_.reduce_mean(image, axis=-1, keepdims=True)
  return out


def _reflect(coord, length):
  """Maps sample coordinates into [0, length - 1] by mirroring about the outer pixel edges
  (... c b a | a b c ... | ... c b a), ImageProjectiveTransformV3's 'REFLECT'."""
  tf_ = tf()
  period = 2.0 * length
  m = tf_.math.floormod(coord + 0.5, period)
  m = tf_.where(m < length, m, period - m) - 0.5
  return tf_.clip_by_value(m, 0.0, length - 1.0)


def projective_warp(image, transform):
  """Bilinear resampling of [H, W, C] `image` at the input points of TF's 8-parameter output->input
  `transform`, reflect fill: ImageProjectiveTransformV3(..., 'BILINEAR', 'REFLECT') as gathers that XLA
  compiles into one pass (4 to 7 times faster on the CPU than that kernel)."""
  tf_ = tf()
  shape = tf_.shape(image)
  h, w, channels = shape[0], shape[1], shape[2]
  t = transform
  ys, xs = tf_.meshgrid(tf_.range(h, dtype=tf_.float32), tf_.range(w, dtype=tf_.float32), indexing="ij")
  k = t[6] * xs + t[7] * ys + 1.0
  x = _reflect((t[0] * xs + t[1] * ys + t[2]) / k, tf_.cast(w, tf_.float32))
  y = _reflect((t[3] * xs + t[4] * ys + t[5]) / k, tf_.cast(h, tf_.float32))
  x0, y0 = tf_.floor(x), tf_.floor(y)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  x0, y0 = tf_.cast(x0, tf_.int32), tf_.cast(y0, tf_.int32)
  x1, y1 = tf_.minimum(x0 + 1, w - 1), tf_.minimum(y0 + 1, h - 1)
  flat = tf_.reshape(image, tf_.stack([h * w, channels]))
  at = lambda yy, xx: tf_.gather(flat, yy * w + xx)
  top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
  bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
  return top * (1.0 - wy) + bottom * wy


@functools.lru_cache(maxsize=None)  # One traced function per static choice, shared by every pipeline.
def _compiled_augment(geometric: bool, contrast: bool, saturation: bool, colour: bool):
  """One XLA-compiled function doing warp, colour map and clip in a single program."""
  tf_ = tf()

  def fused(image, transform, colour_params):
    image = tf_.cast(image, tf_.float32)
    if geometric:
      image = projective_warp(image, transform)
    if colour:
      image = _colour_map(image, colour_params, contrast, saturation)
    return tf_.clip_by_value(image, 0.0, 255.0)

  return tf_.function(fused, jit_compile=True, reduce_retracing=False)


def augment(image, seed, aug):
  """One fused random affine with flips (reflect fill, bilinear), then one fused colour jitter; [0, 255].

  The random parameters are drawn with TF's stateless ops; the pixel work is one XLA-compiled program
  (`projective_warp` + `_colour_map` + clip), because TF's own resampling kernel was the pipeline's
  bottleneck on a CPU (benchmarks/input_pipeline.py measures it; docs/performance.md has the figures).
  """
  tf_ = tf()
  size = tf_.shape(image)[0]
  seeds = tf_.random.experimental.stateless_split(seed, 6)
  geometric = bool(aug.rotation_deg or aug.shear_deg or aug.zoom or aug.shift or aug.flip)
  colour = bool(aug.brightness or aug.contrast or aug.saturation)
  transform = tf_.zeros([8])
  if geometric:
    flip_lr = flip_ud = None
    if aug.flip:
      flip_lr = tf_.random.stateless_uniform([], seeds[1]) < 0.5
      flip_ud = tf_.random.stateless_uniform([], seeds[2]) < 0.5
    transform = _affine_matrix(seeds[0], tf_.cast(size, tf_.float32), aug, flip_lr, flip_ud)
  params = _colour_params(seeds, aug) if colour else tf_.zeros([3])
  fused = _compiled_augment(geometric, bool(aug.contrast), bool(aug.saturation), colour)
  return fused(image, transform, params)


@dataclasses.dataclass(frozen=True)
class Augment:
  """Ranges of the random training augmentation (0 or False turns a part off)."""
  rotation_deg: float = 180.0
  shear_deg: float = 10.0
  zoom: float = 0.1
  shift: float = 0.1
  flip: bool = True
  brightness: float = 0.1
  contrast: float = 0.1
  saturation: float = 0.1


class ImagePipeline:
  """Builds the train / eval / predict datasets of one fold split.

  `train_names`, `val_names`: image names of the two sides of the split; `targets`: {image_name: 0/1}.
  `global_batch` rows per step, split over `num_devices`; `oversample_share`: malignant share of the
  training stream (0: the natural rate); `max_steps_per_epoch` > 0 caps an epoch; `skip_corrupt` drops
  undecodable images instead of stopping; `augment` None: no training augmentation.
  """

  def __init__(self, train_files, test_files, targets, train_names, val_names, *, image_size: int,
               global_batch: int, num_devices: int, oversample_share: float = 0.0,
               max_steps_per_epoch: int = 0, skip_corrupt: bool = False, augment: Optional[Augment] = None):
    self.train_files = list(train_files)
    self.test_files = list(test_files)
    self.image_size = int(image_size)
    self.num_devices = int(num_devices)
    self.global_batch = int(global_batch)
    if self.global_batch % self.num_devices:
      raise ValueError(f"global batch {global_batch} does not split over {num_devices} devices")
    self.oversample_share = float(oversample_share or 0.0)
    self.max_steps_per_epoch = int(max_steps_per_epoch or 0)
    self.skip_corrupt = bool(skip_corrupt)
    self.augment = augment
    self.train_names = list(train_names)
    self.val_names = list(val_names)
    self._targets = dict(targets)
    self.train_positives = sum(self._targets[n] for n in self.train_names)
    self.num_train = len(self.train_names)
    if self.num_train == 0 or not self.val_names:
      raise InputError(f"empty split: {self.num_train} training and {len(self.val_names)} validation images")
    if self.train_positives == 0:
      raise InputError("the training split has no malignant image")
    names = self.train_names + self.val_names
    side = [0] * len(self.train_names) + [1] * len(self.val_names)
    self._side = _lookup(names, side, -1)
    self._target = _lookup(names, [self._targets[n] for n in names], -1)

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

  def _labelled(self, side):
    ds = _records(self.train_files)
    ds = ds.map(lambda r: dict(r, side=self._side.lookup(r["image_name"]),
                               target=self._target.lookup(r["image_name"])), num_parallel_calls=_AUTOTUNE)
    return ds.filter(lambda r: tf().equal(r["side"], side))

  def train_dataset(self, epoch, seed):
    """The batches of one training epoch: steps_per_epoch batches of [devices, per_device, ...]."""
    tf_ = tf()
    epoch_seed = int(np.random.default_rng([seed, epoch]).integers(2**31 - 1))
    streams = []
    for label in (0, 1):
      part = self._labelled(0).filter(lambda r, label=label: tf_.equal(r["target"], label))
      count = self.train_positives if label else self.num_train - self.train_positives
      if label:  # The scarce class is drawn many times per epoch: keep its few encoded JPEGs in memory.
        part = part.cache()
      streams.append(part.shuffle(min(count, 4096), seed=epoch_seed + label).repeat())
    total = self.steps_per_epoch * self.global_batch
    skip = self.skip_corrupt
    share = self.positive_share()
    # Twice the draws when corrupt examples may be skipped, so the epoch still fills up.
    choice = tf_.data.Dataset.range(total * (2 if skip else 1)).map(
        lambda i: tf_.cast(tf_.random.stateless_uniform([], [epoch_seed, i]) < share, tf_.int64))
    ds = tf_.data.Dataset.choose_from_datasets(streams, choice)
    ds = ds.enumerate().map(lambda i, r: self._train_example(r, [epoch_seed, i]),
                            num_parallel_calls=_AUTOTUNE, deterministic=True)
    return self._finish(self._skip_corrupt(ds).take(total))

  def _train_example(self, record, seed):
    image = decode_image(record["image"], self.image_size)
    if self.augment is not None:
      image = augment(image, tf().cast(seed, tf().int64), self.augment)
    return {"x": scale_for_inception(image), "y": tf().cast(record["target"], tf().float32),
            "mask": tf().ones([], tf().float32)}

  # ------------------------------------------------------------------------------------------ evaluation
  def _eval_example(self, record):
    return {"x": scale_for_inception(decode_image(record["image"], self.image_size)),
            "y": tf().cast(tf().maximum(record.get("target", tf().constant(0, tf().int64)), 0), tf().float32),
            "mask": tf().ones([], tf().float32), "image_name": record["image_name"]}

  def _padded(self, ds, count):
    """Pads with masked blanks to whole global batches: every example is seen exactly once."""
    tf_ = tf()
    blank = {"x": tf_.zeros([self.image_size, self.image_size, 3]), "y": tf_.zeros([]),
             "mask": tf_.zeros([]), "image_name": tf_.constant(b"")}
    padded_total = max(1, math.ceil(count / self.global_batch)) * self.global_batch
    ds = ds.concatenate(tf_.data.Dataset.from_tensors(blank).repeat()).take(padded_total)
    return self._finish(ds)

  def val_dataset(self):
    ds = self._labelled(1).map(self._eval_example, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return self._padded(self._skip_corrupt(ds), len(self.val_names))

  def test_dataset(self, num_test):
    ds = _records(self.test_files).map(self._eval_example, num_parallel_calls=_AUTOTUNE, deterministic=True)
    return self._padded(self._skip_corrupt(ds), num_test)

  def _skip_corrupt(self, ds):
    """With config.skip_corrupt, drops examples whose decoding failed (logged; counted by the caller)."""
    return ds.ignore_errors(log_warning=True) if self.skip_corrupt else ds

  def _finish(self, ds):
    return ds.batch(self.global_batch, drop_remainder=True).prefetch(_AUTOTUNE)

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
