"""Building one archive set: what the command and a test call (`build`), and the command line (`main`)."""
import argparse
import contextlib
import io
import logging
import os
import sys

from melanoma_jax.data.isic_archive import builder as builder_lib
from melanoma_jax.data.isic_archive import dedup
from melanoma_jax.data.isic_archive import download
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError


def build(year, image_size, manual_dir, data_dir, exclude_2020=None):
  """Builds (or finds already built) the set of `year` at `image_size`; returns (dataset dir, report).

  The dataset directory is the one `tfds.builder_from_directory` and `isic_archive.load` read.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  config = builder_lib.config_for(year, image_size)
  manual_dir, data_dir = os.path.abspath(os.fspath(manual_dir)), os.path.abspath(os.fspath(data_dir))
  if not os.path.isdir(manual_dir):
    raise InputError(f"{manual_dir}: manual download folder not found")
  ds_builder = builder_lib.IsicArchive(config=config, data_dir=data_dir, exclude_2020=exclude_2020)
  ds_builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir, compute_stats=tfds.download.ComputeStatsMode.SKIP))
  directory = os.fspath(ds_builder.data_dir)
  report = dict(tfds.builder_from_directory(directory).info.metadata)["duplicates"]
  # TFDS reuses a built set whatever it was built with: one left out another 2020 table is not this one.
  _, wanted = dedup.ids_2020(exclude_2020)
  if report["excluded"]["in_2020"].get("source_sha256") != files.sha256(wanted):
    raise InputError(f"{directory}: already built leaving out the ids of another 2020 table "
                     f"({report['excluded']['in_2020'].get('source')}, not {wanted}); remove it or choose "
                     "another --data_dir")
  return directory, report


@contextlib.contextmanager
def _quiet_tfds():
  """TFDS's own chatter kept out of the command's output: stdout is the report and, last, the directory, and
  a failure is its one error line. TFDS's prints (they name the directory the report names) are dropped, its
  warnings (a custom config's name) muted, its progress bars kept only on a terminal."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not sys.stderr.isatty():
    tfds.disable_progress_bar()
  absl_logger = logging.getLogger("absl")
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m melanoma_jax.data.isic_archive",
                                   description="Builds an ISIC archive challenge set as a TFDS dataset; "
                                   "prints the report and, last, the dataset directory.")
  parser.add_argument("--year", type=int, required=True, choices=download.YEARS)
  parser.add_argument("--image_size", "--image-size", type=int, default=512)
  parser.add_argument("--manual_dir", "--manual-dir", required=True, help="folder holding the downloads")
  parser.add_argument("--data_dir", "--data-dir", required=True, help="TFDS data folder to write into")
  parser.add_argument("--exclude_2020", "--exclude-2020", default=None,
                      help="2020 train.csv whose image_name ids are left out (default: the embedded one)")
  args = parser.parse_args(argv)
  try:
    with _quiet_tfds():
      directory, report = build(args.year, args.image_size, args.manual_dir, args.data_dir, args.exclude_2020)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print("\n".join(dedup.report_lines(report)))
  print(directory)
  return 0
