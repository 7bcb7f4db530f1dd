"""The ISIC archive's challenge training sets (2019; 2018 = HAM10000) as TFDS datasets: external data for 2020.

Build one from the manual downloads (see `MANUAL_DOWNLOAD_INSTRUCTIONS`); the last line printed is the
dataset directory, which `load` and `tfds.builder_from_directory` read:

  python -m melanoma_jax.data.isic_archive --year=2019 --image_size=512 --manual_dir=DOWNLOADS --data_dir=OUT

The same with TFDS's own command (from the repository root, or with the package on PYTHONPATH); `--config`
is needed, as `tfds build` otherwise builds every preset config, and names a preset (`{year}_{size}`, sizes
in PRESET_SIZES) or, for another size, gives it as JSON:

  tfds build isic_archive --imports=melanoma_jax.data.isic_archive --config=2019_512 \
      --manual_dir=DOWNLOADS --data_dir=OUT
  tfds build isic_archive --imports=melanoma_jax.data.isic_archive \
      --config='{"name": "2019_300", "year": 2019, "image_size": 300}' --manual_dir=DOWNLOADS --data_dir=OUT

Each image is resized by the TFRecord converter's `records.load_resized_jpeg` (centre crop, bicubic, JPEG
95). Features: image, image_name (ISIC id), diagnosis (ClassLabel over CLASSES, 2018's AKIEC read as AK),
target (1 = MEL), age_approx (float32, NaN when blank), sex, anatom_site_general_challenge (the 2020 site
vocabulary, `sites`), lesion_id ("" when blank). Images whose id is in the 2020 training table, and 2018
images the 2019 download also lists, are left out and reported (`dedup`; the report is in the dataset's
metadata.json, read back with `duplicates(directory)`). A bad download is one InputError line naming the
file: a missing CSV or image folder, an image listed but absent, an unreadable JPEG, a ground-truth row
that is not one-hot.

Modules, one job each: `download` (the layouts, reading and checking the CSVs), `sites` (mapping values to
the 2020 vocabulary), `dedup` (duplicates and their report), `builder` (the TFDS builder and its configs),
`reader` (`load`, for training), `command` (`build`, the command line).
"""
from melanoma_jax.data.isic_archive.builder import config_for
from melanoma_jax.data.isic_archive.builder import IsicArchive
from melanoma_jax.data.isic_archive.builder import IsicArchiveConfig
from melanoma_jax.data.isic_archive.builder import MANUAL_DOWNLOAD_INSTRUCTIONS
from melanoma_jax.data.isic_archive.builder import PRESET_SIZES
from melanoma_jax.data.isic_archive.command import build
from melanoma_jax.data.isic_archive.download import CLASSES
from melanoma_jax.data.isic_archive.download import LAYOUTS
from melanoma_jax.data.isic_archive.download import YEARS
from melanoma_jax.data.isic_archive.reader import class_counts
from melanoma_jax.data.isic_archive.reader import duplicates
from melanoma_jax.data.isic_archive.reader import load

__all__ = ["CLASSES", "IsicArchive", "IsicArchiveConfig", "LAYOUTS", "MANUAL_DOWNLOAD_INSTRUCTIONS",
           "PRESET_SIZES", "YEARS", "build", "class_counts", "config_for", "duplicates", "load"]
