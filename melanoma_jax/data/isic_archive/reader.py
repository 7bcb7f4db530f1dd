"""Reading a built archive set back, for training: the directory the command printed -> tf.data examples.

`load` yields dicts whose shared keys mean what the 2020 TFRecord pipeline's do (`pipeline._parse` and its
`target` lookup): `image` the JPEG bytes (tf.string) or, with `image_size`, the image decoded by
`pipeline.decode_image` (float32 [0, 255]); `image_name` (tf.string); `target` (int64, 1 = melanoma). Extra:
`diagnosis` (int64 index into CLASSES), `age_approx` (float32, NaN when blank), `sex`,
`anatom_site_general_challenge`, `lesion_id` (tf.string, "" when unknown).
"""
import os

from melanoma_jax.data import pipeline
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

FEATURES = ("image", "image_name", "diagnosis", "target", "age_approx", "sex",
            "anatom_site_general_challenge", "lesion_id")


def builder(directory):
  """The read-only TFDS builder of a dataset directory the isic_archive command wrote; InputError if not one."""
  tf()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  directory = os.fspath(directory)
  if not os.path.isfile(os.path.join(directory, "dataset_info.json")):
    raise InputError(f"{directory}: not a built dataset directory (no dataset_info.json; pass the directory "
                     "the isic_archive command printed)")
  result = tfds.builder_from_directory(directory)
  missing = [k for k in FEATURES if k not in result.info.features]
  if missing:
    raise InputError(f"{directory}: not an isic_archive dataset (its features lack {', '.join(missing)})")
  return result


def duplicates(directory):
  """The duplicates report the build wrote into the dataset's metadata.json (see `dedup`)."""
  return dict(builder(directory).info.metadata)["duplicates"]


def load(directory, split="train", *, image_size=None, process_index=0, process_count=1, shuffle_files=False,
         read_config=None):
  """The examples of a built archive set as a tf.data.Dataset of dicts (keys: see the module docstring).

  `process_index` of `process_count`: this process's share, disjoint from the others' and together covering
  the split (`tfds.split_for_jax_process`; examples dealt as evenly as they go). `image_size` None keeps the
  JPEG bytes, as the 2020 parser does; an int decodes them as the 2020 pipeline does.
  """
  if not 0 <= int(process_index) < int(process_count):
    raise InputError(f"process_index must be in [0, {process_count}), got {process_index}")
  ds_builder = builder(directory)
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if int(process_count) > 1:
    split = tfds.split_for_jax_process(split, process_index=int(process_index), process_count=int(process_count))
  ds = ds_builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                             decoders={"image": tfds.decode.SkipDecoding()})
  if image_size is not None:
    size = int(image_size)
    ds = ds.map(lambda r: dict(r, image=pipeline.decode_image(r["image"], size)),
                num_parallel_calls=tf().data.AUTOTUNE)
  return ds



def class_counts(directory):
  """{class of CLASSES: images} of a built set's train split, from the metadata.json its build wrote."""
  counts = dict(builder(directory).info.metadata).get("class_counts")
  if counts is None:
    raise InputError(f"{directory}: its metadata.json lacks class_counts (built by an older version; build it again)")
  return {name: int(n) for name, n in counts.items()}
