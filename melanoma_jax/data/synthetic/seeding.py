"""Seeding: every random draw of the generator comes from `stable_rng`, on one of the streams below.

A stream keeps the draws of one purpose apart from the others: a patient's style, an image, a hidden test
label and the patient subset never share a generator, even for the same seed and key. The stream ids are part
of the output: changing one changes every dataset (bump GENERATOR_VERSION).
"""
import zlib

import numpy as np

PATIENT_STREAM = 0  # A patient's style; key: patient_id.
IMAGE_STREAM = 1  # Everything drawn for one image; key: image_name.
TEST_LABEL_STREAM = 2  # The hidden label of a synthetic test image; key: image_name.
SELECT_STREAM = 3  # The train and the test patient subsets; keys: "select_patients", "select_test_patients".
NEVUS_STREAM = 4  # Ugly-duckling sets only: a patient's nevus style, drawn apart from the skin; key: patient_id.
PLAIN_STREAM = 5  # The plain generator only: a patient's style; key: patient_id.
ARCHIVE_STREAM = 6  # ISIC archive layouts (`archive`): an image's class look and metadata; key: its ISIC id.


def stable_rng(seed, key, stream):
  """A numpy Generator from (seed, key, stream); `key` (e.g. an image name) is hashed with crc32."""
  key_hash = zlib.crc32(str(key).encode("utf-8"))
  return np.random.default_rng([int(seed), key_hash, int(stream)])
