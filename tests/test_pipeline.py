"""The tf.data pipeline: scaling, augmentation, oversampling, determinism, padded evaluation, corrupt JPEGs."""
import dataclasses
import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from melanoma_jax.data import augment as augment_lib
from melanoma_jax.data import metadata, pipeline, records
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

SIZE = 16


def _jpeg(value):
  buffer = io.BytesIO()
  image = np.zeros((SIZE, SIZE, 3), np.uint8)
  image[..., 0] = value
  image[: SIZE // 2, :, 1] = 255 - value
  Image.fromarray(image).save(buffer, format="JPEG", quality=100)
  return buffer.getvalue()


def _options(**overrides):
  """ImagePipeline's plain arguments: 2 images per device x 8 emulated devices = 16 per global batch."""
  return {"image_size": SIZE, "global_batch": 16, "num_devices": 8, "augment": None, **overrides}


class _Aug:
  """Mutable augmentation ranges (augment_lib.augment reads them as attributes, like augment_lib.Augment)."""

  def __init__(self, **changes):
    self.__dict__.update(dataclasses.asdict(augment_lib.Augment()), **changes)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  """61 train images (12 malignant) of the real metadata in 3 shards, and 9 test images."""
  out = tmp_path_factory.mktemp("records")
  train = metadata.load_metadata(metadata.EMBEDDED_TRAIN_CSV)
  train = pd.concat([train[train["target"] == 1].head(12), train[train["target"] == 0].head(49)],
                    ignore_index=True)
  test = metadata.load_metadata(metadata.EMBEDDED_TEST_CSV, "test").head(9)
  codes = records.fit_codes(train, test)
  files = records.write_resized_records(train, [_jpeg(i * 4) for i in range(len(train))], out, "train", 3, codes)
  test_files = records.write_resized_records(test, [_jpeg(200 + i) for i in range(9)], out, "test", 1, codes)
  return train, test, files, test_files


def _pipeline(dataset, options, val_count=21):
  train, _, files, test_files = dataset
  targets = dict(zip(train["image_name"], train["target"]))
  names = list(train["image_name"])
  val = names[:4] + names[-(val_count - 4):]  # Both classes on each side.
  train_names = [n for n in names if n not in set(val)]
  return pipeline.ImagePipeline(files, test_files, targets, train_names, val, **options)


def test_scaling_matches_inception_range():
  np.testing.assert_allclose(pipeline.scale_for_inception(np.array([0.0, 127.5, 255.0])), [-1.0, 0.0, 1.0])


def test_padded_evaluation_sees_every_example_once(dataset):
  pipe = _pipeline(dataset, _options())
  assert pipe.global_batch == 16
  names, masks, xs = [], [], []
  for batch, batch_names in pipe.device_batches(pipe.val_dataset(), pipe.train_files):
    assert batch["x"].shape == (8, 2, SIZE, SIZE, 3)
    names += batch_names
    masks.append(batch["mask"].reshape(-1))
    xs.append(batch["x"].reshape(-1, SIZE, SIZE, 3))
  mask = np.concatenate(masks)
  assert len(mask) == 32 and mask.sum() == 21  # 21 examples in 2 batches, 11 padded slots.
  real = [n for n, m in zip(names, mask) if m]
  assert sorted(real) == sorted(pipe.val_names)
  assert np.all(np.concatenate(xs)[mask == 0] == 0)
  x = np.concatenate(xs)[mask > 0]
  assert x.min() >= -1.0 and x.max() <= 1.0


def test_test_dataset_has_every_test_image(dataset):
  _, test, _, test_files = dataset
  pipe = _pipeline(dataset, _options())
  names = [n for batch, batch_names in pipe.device_batches(pipe.test_dataset(len(test)), test_files)
           for n, m in zip(batch_names, batch["mask"].reshape(-1)) if m]
  assert names == list(test["image_name"])


def _epoch(pipe, epoch, seed=0):
  return [batch for batch, _ in pipe.device_batches(pipe.train_dataset(epoch, seed), pipe.train_files)]


def test_training_stream_oversamples_and_replays_exactly(dataset):
  config = _options(oversample_share=0.5, augment=augment_lib.Augment())
  pipe = _pipeline(dataset, config)
  first = _epoch(pipe, 0)
  assert len(first) == pipe.steps_per_epoch == 40 // 16
  y = np.concatenate([b["y"].reshape(-1) for b in first])
  natural = pipe.train_positives / pipe.num_train
  assert natural < 0.25 and y.mean() > 0.35  # Oversampled well above the natural rate.
  again = _epoch(pipe, 0)
  for a, b in zip(first, again):  # Same (seed, epoch): the same stream, augmentation included.
    np.testing.assert_array_equal(a["x"], b["x"])
  other = _epoch(pipe, 1)
  assert not np.array_equal(first[0]["x"], other[0]["x"])


def test_augmentation_is_seeded_and_in_range():
  aug = _Aug()
  image = tf().constant(np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32))
  a = augment_lib.augment(image, tf().constant([1, 2], tf().int64), aug).numpy()
  b = augment_lib.augment(image, tf().constant([1, 2], tf().int64), aug).numpy()
  c = augment_lib.augment(image, tf().constant([1, 3], tf().int64), aug).numpy()
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c) and a.shape == (SIZE, SIZE, 3)
  # Brightness shifts of up to +-255 push the unclipped result past [0, 255]; the output is clipped to it
  # (saturated pixels, not a rescaled image).
  shifted = [augment_lib.augment(image, tf().constant([k, 2], tf().int64), _Aug(brightness=1.0)).numpy()
             for k in range(8)]
  assert all(out.min() >= 0.0 and out.max() <= 255.0 for out in shifted)
  assert max(np.mean((out == 0.0) | (out == 255.0)) for out in shifted) > 0.1


def test_identity_affine_keeps_the_image():
  aug = _Aug()
  aug.flip, aug.brightness, aug.contrast, aug.saturation = False, 0.0, 0.0, 0.0
  aug.rotation_deg, aug.shear_deg, aug.zoom, aug.shift = 0.0, 0.0, 0.0, 0.0
  image = tf().constant(np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32))
  np.testing.assert_allclose(augment_lib.augment(image, tf().constant([0, 0], tf().int64), aug), image, atol=1e-3)
  # A 90-degree rotation alone is an exact pixel permutation: output (x, y) samples input (y, S-1-x).
  quarter_turn = tf().constant([0.0, 1.0, 0.0, -1.0, 0.0, SIZE - 1.0, 0.0, 0.0])
  np.testing.assert_array_equal(augment_lib.projective_warp(image, quarter_turn).numpy(),
                                np.rot90(image.numpy(), k=-1))
  # Rotation alone (any drawn angle) gives a rigid map: an orthonormal linear part, no perspective.
  aug.rotation_deg = 90.0
  matrix = augment_lib._affine_matrix(tf().constant([0, 0], tf().int64), float(SIZE), aug).numpy()
  linear = matrix[[0, 1, 3, 4]].reshape(2, 2)
  np.testing.assert_allclose(linear @ linear.T, np.eye(2), atol=1e-5)
  np.testing.assert_allclose(matrix[6:], 0.0, atol=1e-7)
  assert abs(linear[0, 1]) > 1e-3  # Some rotation was drawn.


def test_compiled_warp_equals_tensorflows_projective_transform():
  """The XLA-compiled resampling against TF's own kernel (bilinear, reflect), far transforms included."""
  tf_ = tf()
  aug = _Aug()
  aug.rotation_deg, aug.shear_deg, aug.zoom, aug.shift = 180.0, 30.0, 0.5, 0.5  # Much sampled off-image.
  image = tf_.constant(np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE + 7, 3)).astype(np.float32))
  for k in range(6):
    transform = augment_lib._affine_matrix(tf_.constant([k, 5], tf_.int64), float(SIZE), aug,
                                        tf_.constant(k % 2 == 0), tf_.constant(k % 3 == 0))
    if k == 5:  # A projective (non-affine) transform too.
      transform = transform + tf_.constant([0, 0, 0, 0, 0, 0, 1e-3, -2e-3])
    expected = tf_.raw_ops.ImageProjectiveTransformV3(
        images=image[None], transforms=transform[None], output_shape=tf_.shape(image)[:2], fill_value=0.0,
        interpolation="BILINEAR", fill_mode="REFLECT")[0].numpy()
    ours = tf_.function(augment_lib.projective_warp, jit_compile=True)(image, transform).numpy()
    np.testing.assert_allclose(ours, expected, atol=0.02)


def test_fused_colour_jitter_equals_the_operations_in_turn():
  aug = _Aug()
  aug.flip, aug.rotation_deg, aug.shear_deg, aug.zoom, aug.shift = False, 0.0, 0.0, 0.0, 0.0
  aug.brightness, aug.contrast, aug.saturation = 0.1, 0.2, 0.3
  tf_ = tf()
  image = tf_.constant(np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32))
  for k in range(4):
    seed = tf_.constant([k, 7], tf_.int64)
    seeds = tf_.random.experimental.stateless_split(seed, 6)
    x = image + tf_.random.stateless_uniform([], seeds[3], -0.1, 0.1) * 255.0
    mean = tf_.reduce_mean(x, axis=[0, 1], keepdims=True)
    x = (x - mean) * tf_.random.stateless_uniform([], seeds[4], 0.8, 1.2) + mean
    grey = tf_.reduce_mean(x, axis=-1, keepdims=True)
    x = (x - grey) * tf_.random.stateless_uniform([], seeds[5], 0.7, 1.3) + grey
    expected = tf_.clip_by_value(x, 0.0, 255.0).numpy()
    np.testing.assert_allclose(augment_lib.augment(image, seed, aug).numpy(), expected, atol=1e-3)


def test_flips_folded_into_the_affine_are_exact_and_all_occur():
  aug = _Aug()
  aug.rotation_deg, aug.shear_deg, aug.zoom, aug.shift = 0.0, 0.0, 0.0, 0.0
  aug.flip, aug.brightness, aug.contrast, aug.saturation = True, 0.0, 0.0, 0.0
  image = np.random.default_rng(0).uniform(0, 255, (SIZE, SIZE, 3)).astype(np.float32)
  views = {"none": image, "left-right": image[:, ::-1], "up-down": image[::-1], "both": image[::-1, ::-1]}
  seen = set()
  for k in range(16):
    out = augment_lib.augment(tf().constant(image), tf().constant([k, 1], tf().int64), aug).numpy()
    matches = [name for name, view in views.items() if np.abs(out - view).max() < 1e-3]
    assert len(matches) == 1, k
    seen.add(matches[0])
  assert seen == set(views)


def test_corrupt_jpeg_is_named(tmp_path, dataset):
  train, _, _, _ = dataset
  rows = train.head(20)
  images = [_jpeg(i) for i in range(20)]
  images[5] = b"\xff\xd8\xff\xe0 broken"
  files = records.write_resized_records(rows, images, tmp_path, "train", 1, records.fit_codes(rows))
  targets = dict(zip(rows["image_name"], rows["target"]))
  names = list(rows["image_name"])
  pipe = pipeline.ImagePipeline(files, [], targets, names[10:] + [names[0]], names[1:10], **_options())
  with pytest.raises(InputError, match=f"train00-20.tfrec: image {names[5]} is not a decodable JPEG"):
    list(pipe.device_batches(pipe.val_dataset(), files))
  skipping = pipeline.ImagePipeline(files, [], targets, names[10:] + [names[0]], names[1:10],
                                    **_options(skip_corrupt=True))
  seen = sum(int(b["mask"].sum()) for b, _ in skipping.device_batches(skipping.val_dataset(), files))
  assert seen == 8


def test_empty_split_is_refused(dataset):
  train, _, files, _ = dataset
  targets = dict(zip(train["image_name"], train["target"]))
  with pytest.raises(InputError, match="empty split"):
    pipeline.ImagePipeline(files, [], targets, list(train["image_name"]), [], **_options())
