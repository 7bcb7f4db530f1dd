"""The TFDS builder: one year's manual download -> a `train` split of resized JPEGs with labels and metadata.

Configs are named `{year}_{image_size}` (`2019_512`, `2018_256`, ...): the years of `download.LAYOUTS` at
the usual sizes are predefined (PRESET_SIZES); `config_for(year, image_size)` makes one for any other size
(with `tfds build`, pass it as JSON: `--config='{"name": "2019_300", "year": 2019, "image_size": 300}'`).
The 2020 table whose ids are left out is the builder kwarg `exclude_2020` (default: the embedded
train.csv; `tfds build` always uses the default).
"""
import concurrent.futures
import dataclasses
import os

import numpy as np
from etils import epath

from melanoma_jax.data import records
from melanoma_jax.data.isic_archive import dedup
from melanoma_jax.data.isic_archive import download
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

tf()  # Hides the GPUs from TensorFlow before TFDS imports it.
import tensorflow_datasets as tfds  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

PRESET_SIZES = (256, 384, 512, 768, 1024)
_CHUNK = 64  # Images resized at once by the thread pool: bounds the JPEGs held in memory.

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the training data of the ISIC challenge years from https://challenge.isic-archive.com/data/ and
unpack them side by side in one folder (--manual_dir); the 2018 set leaves out the images 2019 also holds
only when both are there:

  ISIC 2019 (task 1, training):
    ISIC_2019_Training_Input/             the JPEGs (ISIC_0000000.jpg, some ISIC_..._downsampled.jpg)
    ISIC_2019_Training_GroundTruth.csv    image, MEL, NV, BCC, AK, BKL, DF, VASC, SCC, UNK (one-hot)
    ISIC_2019_Training_Metadata.csv       image, age_approx, anatom_site_general, lesion_id, sex
  ISIC 2018 (task 3, HAM10000):
    ISIC2018_Task3_Training_Input/        the JPEGs
    ISIC2018_Task3_Training_GroundTruth.csv  image, MEL, NV, BCC, AKIEC, BKL, DF, VASC (one-hot)
    HAM10000_metadata.csv                 lesion_id, image_id, dx, dx_type, age, sex, localization
"""


@dataclasses.dataclass(eq=False)
class IsicArchiveConfig(tfds.core.BuilderConfig):
  """One challenge year at one image size (side of the square, pixels)."""
  year: int = 2019
  image_size: int = 512


def config_for(year, image_size):
  """The config of `year` at `image_size`: a preset one, or a new one named the same way."""
  layout = download.layout(year)
  image_size = int(image_size)
  if image_size < 8:
    raise InputError(f"image_size must be >= 8 pixels, got {image_size}")
  name = f"{layout.year}_{image_size}"
  for config in IsicArchive.BUILDER_CONFIGS:
    if config.name == name:
      return config
  return IsicArchiveConfig(name=name, year=layout.year, image_size=image_size,
                           description=f"ISIC {layout.year} training images at {image_size}x{image_size}")


class IsicArchive(tfds.core.GeneratorBasedBuilder):
  """The ISIC archive's challenge training sets (2019, 2018/HAM10000) as external data for SIIM-ISIC 2020."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release: 2019 and 2018 training sets, deduplicated against 2020."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS
  BUILDER_CONFIGS = [
      IsicArchiveConfig(name=f"{year}_{size}", year=year, image_size=size,
                        description=f"ISIC {year} training images at {size}x{size}")
      for year in sorted(download.LAYOUTS, reverse=True) for size in PRESET_SIZES]

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS 4.9.10 looks this file up through importlib_resources, a package it does not declare (absent
    # here); the file is known, and no checksums file beside it is ever needed (the download is manual).
    return epath.Path(__file__)

  def __init__(self, *, exclude_2020=None, **kwargs):
    self._exclude_2020 = exclude_2020
    super().__init__(**kwargs)

  def _info(self):
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        description=("Dermoscopic training images of an ISIC challenge year, centre-cropped and resized by "
                     "the project's TFRecord converter; diagnosis over the ISIC 2019 classes, target = "
                     "melanoma, metadata in the SIIM-ISIC 2020 vocabulary."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="jpeg"),
            "image_name": tfds.features.Text(doc="ISIC id, without the _downsampled suffix"),
            "diagnosis": tfds.features.ClassLabel(names=download.CLASSES),
            "target": tfds.features.Scalar(np.int64, doc="1 for melanoma (MEL), else 0"),
            "age_approx": tfds.features.Scalar(np.float32, doc="age in years; NaN when blank"),
            "sex": tfds.features.Text(doc="male, female or empty"),
            "anatom_site_general_challenge": tfds.features.Text(doc="2020 site vocabulary, empty if unknown"),
            "lesion_id": tfds.features.Text(doc="the archive's lesion id, empty if blank"),
        }),
        supervised_keys=("image", "target"),
        homepage="https://challenge.isic-archive.com/data/",
        metadata=tfds.core.MetadataDict(),
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    year = self.builder_config.year
    table = download.read_download(manual_dir, year)
    kept, report = dedup.deduplicate(table, year, manual_dir, self._exclude_2020)
    # Written beside the data as metadata.json; the class counts let training weigh its stream without
    # reading every image first.
    counts = kept["diagnosis"].value_counts()
    self.info.metadata.update({"duplicates": report,
                               "class_counts": {c: int(counts.get(c, 0)) for c in download.CLASSES}})
    return {"train": self._generate_examples(kept)}

  def _generate_examples(self, table):
    size = self.builder_config.image_size
    rows = table.to_dict("records")
    with concurrent.futures.ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
      for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        # The one resizing function of the TFRecord converter, so both data sources look alike.
        images = pool.map(lambda row: records.load_resized_jpeg(row["path"], size), chunk)
        for row, image in zip(chunk, images):
          yield row["image_name"], {
              "image": image, "image_name": row["image_name"], "diagnosis": row["diagnosis"],
              "target": int(row["diagnosis"] == download.MELANOMA), "age_approx": np.float32(row["age_approx"]),
              "sex": row["sex"], "anatom_site_general_challenge": row["anatom_site_general_challenge"],
              "lesion_id": row["lesion_id"]}
