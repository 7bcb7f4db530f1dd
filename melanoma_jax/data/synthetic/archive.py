"""Small synthetic downloads in the ISIC archive's layouts (2019, 2018/HAM10000), for the isic_archive builder.

`write_archive(out_dir, year)` writes one year's image folder and CSVs into out_dir, named and shaped as the
real downloads (`melanoma_jax/data/isic_archive/download.py`), so the builder, external data and a diagnosis
head run offline. Each class has a look of its own on top of the dermoscopy renderer (MEL the renderer's
melanoma, NV its nevus, BCC pink with vessels, AK red and ragged, BKL light tan and sharp, DF a ring with a
pale centre, VASC red-purple, SCC pink-white): easy to tell apart, as a test needs.

Deliberate overlaps exercise the deduplication: the first `num_overlap` 2018 images are the first 2019
images (same id, class, pixels: everything is a function of (seed, id)), and the last `num_in_2020` 2019
ids are image names of the embedded 2020 train.csv. Some 2019 files carry the archive's `_downsampled`
suffix, and some metadata is blank, as in the real downloads.
"""
import dataclasses
import os
import shutil

import pandas as pd

from melanoma_jax.data import metadata
from melanoma_jax.data.synthetic import lesions
from melanoma_jax.data.synthetic import render
from melanoma_jax.data.synthetic import seeding
from melanoma_jax.utils.errors import InputError

CLASSES = {2019: ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"),  # UNK: empty, as in the real set.
           2018: ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")}
_GROUND_TRUTH_COLUMNS = {2019: ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"),
                         2018: CLASSES[2018]}
_FILES = {2019: ("ISIC_2019_Training_Input", "ISIC_2019_Training_Metadata.csv", "ISIC_2019_Training_GroundTruth.csv"),
          2018: ("ISIC2018_Task3_Training_Input", "HAM10000_metadata.csv", "ISIC2018_Task3_Training_GroundTruth.csv")}
_SITES = {2019: ("anterior torso", "posterior torso", "lateral torso", "head/neck", "upper extremity",
                 "lower extremity", "palms/soles", "oral/genital", ""),
          2018: ("back", "trunk", "abdomen", "chest", "face", "scalp", "ear", "neck", "upper extremity", "hand",
                 "lower extremity", "foot", "acral", "genital", "unknown")}
_FIRST_ID = {2019: 80000, 2018: 90000}  # Past the real 2019 archive's ids; 2020's ids are skipped (`_own_ids`).
# (base colour, radius scale, centre darkening, edge, dots, border warp) of the benign classes' looks.
_LOOKS = {
    "BCC": ((0.86, 0.62, 0.62), 1.0, -0.2, 0.15, 0.8, 0.05),
    "AK": ((0.80, 0.40, 0.35), 1.3, 0.0, 0.35, 0.0, 0.25),
    "AKIEC": ((0.80, 0.40, 0.35), 1.3, 0.0, 0.35, 0.0, 0.25),
    "BKL": ((0.72, 0.58, 0.40), 1.1, 0.0, 0.06, 0.3, 0.02),
    "DF": ((0.45, 0.30, 0.22), 0.8, -0.8, 0.3, 0.0, 0.02),
    "VASC": ((0.55, 0.12, 0.30), 0.7, 0.1, 0.08, 0.9, 0.02),
    "SCC": ((0.90, 0.76, 0.74), 1.4, -0.4, 0.2, 0.0, 0.15),
}


def _params(rng, style, diagnosis):
  """Lesion parameters of a class: the renderer's melanoma or nevus, or a nevus recoloured and reshaped."""
  params = lesions.make_lesion_params(rng, style, malignant=diagnosis == "MEL")
  if diagnosis in ("MEL", "NV"):
    return params
  rgb, scale, centre_dark, edge, dots, warp = _LOOKS[diagnosis]
  return dataclasses.replace(params, base_rgb=rgb, radius=min(0.8, params.radius * scale), centre_dark=centre_dark,
                             edge=edge, dots=dots, dots_peripheral=False, border_warp=warp, network=0.0, blobs=())


def archive_image(seed, image_id, diagnosis, size):
  """JPEG bytes of one archive image of class `diagnosis`, a pure function of the arguments."""
  rng = seeding.stable_rng(seed, image_id, seeding.ARCHIVE_STREAM)
  style = lesions.make_patient_style(rng)
  return render.encode_jpeg(render.draw_lesion(rng, style, _params(rng, style, diagnosis), size))


def _own_ids(year, count):
  """`count` ISIC ids from the year's first id on, skipping every 2020 id: only the deliberate overlaps with
  2020 (`num_in_2020`) may be left out as duplicates of 2020 images."""
  taken = set()
  for path in (metadata.EMBEDDED_TRAIN_CSV, metadata.EMBEDDED_TEST_CSV):
    taken.update(pd.read_csv(path, usecols=["image_name"])["image_name"])
  ids, number = [], _FIRST_ID[year]
  while len(ids) < count:
    if f"ISIC_{number:07d}" not in taken:
      ids.append(f"ISIC_{number:07d}")
    number += 1
  return ids


def _images(year, num_images, num_overlap, num_in_2020):
  """[(ISIC id, class)] of a year's images. The i-th own 2019 image is of class i mod 8, the 2020 names
  come last, so a shared 2018 image (the first `num_overlap` 2019 ids) has its 2019 class whatever the
  2019 set's size; 2018's own images go on cycling from there."""
  if year == 2019:
    names = sorted(pd.read_csv(metadata.EMBEDDED_TRAIN_CSV, usecols=["image_name"])["image_name"])[:num_in_2020]
    own = _own_ids(2019, num_images - len(names))
    return [(n, CLASSES[2019][i % 8]) for i, n in enumerate(own + names)]
  shared = [(image_id, "AKIEC" if c == "AK" else c)
            for image_id, c in zip(_own_ids(2019, num_overlap), CLASSES[2019])]
  return shared + [(image_id, CLASSES[2018][(num_overlap + i) % 7])
                   for i, image_id in enumerate(_own_ids(2018, num_images - num_overlap))]


def _metadata_row(seed, year, image_id, index):
  """One metadata row; every sixth age, sex and (2019) lesion id is blank, so blanks are always exercised."""
  rng = seeding.stable_rng(seed, image_id + "/metadata", seeding.ARCHIVE_STREAM)
  age = "" if index % 6 == 1 else f"{5 * int(rng.integers(1, 18)):.1f}"
  sex = ("" if year == 2019 else "unknown") if index % 6 == 4 else str(rng.choice(["male", "female"]))
  site = _SITES[year][index % len(_SITES[year])]  # Cycled: every value of the year's vocabulary appears.
  lesion = f"{'BCN' if year == 2019 else 'HAM'}_{index // 2:07d}"  # Two images a lesion, as follow-ups are.
  if year == 2019:
    return {"image": image_id, "age_approx": age, "anatom_site_general": site,
            "lesion_id": "" if index % 6 == 5 else lesion, "sex": sex}
  return {"lesion_id": lesion, "image_id": image_id, "dx": "", "dx_type": "histo", "age": age, "sex": sex,
          "localization": site}


def write_archive(out_dir, year=2019, num_images=24, seed=0, image_size=64, num_overlap=3, num_in_2020=2):
  """Writes one year's synthetic download into out_dir (created if needed); returns a summary dict whose
  `classes` is {ISIC id: class of the isic_archive CLASSES (2018's AKIEC as AK)}. `num_in_2020` is 2019's
  only; `num_overlap` is 2018's (at most 7: 2019's first classes, all of which 2018 has).

  Refuses (InputError) to write over any of the year's files already in out_dir. Everything is written in
  a scratch folder inside out_dir first and moved into place, the ground-truth CSV last, so a killed run
  never leaves a download that looks complete.
  """
  year = int(year)
  if year not in CLASSES:
    raise InputError(f"year must be 2019 or 2018, got {year}")
  if not (0 <= num_overlap <= min(7, num_images) and 0 <= num_in_2020 <= num_images and image_size >= 8):
    raise InputError(f"need 0 <= num_overlap <= min(7, num_images), 0 <= num_in_2020 <= num_images and "
                     f"image_size >= 8, got {num_overlap}, {num_in_2020}, {num_images}, {image_size}")
  out_dir = os.path.abspath(os.fspath(out_dir))
  images_name, metadata_name, truth_name = _FILES[year]
  present = [n for n in _FILES[year] if os.path.lexists(os.path.join(out_dir, n))]
  if present:
    raise InputError(f"{os.path.join(out_dir, present[0])}: already exists; not writing over it")
  scratch = os.path.join(out_dir, f".synthetic_archive_{year}.partial")
  if os.path.lexists(scratch):
    shutil.rmtree(scratch)  # Ours by its name: an earlier killed run's.
  os.makedirs(os.path.join(scratch, images_name))
  truth_rows, meta_rows, classes = [], [], {}
  for index, (image_id, diagnosis) in enumerate(_images(year, num_images, num_overlap, num_in_2020)):
    # Every fourth 2019 image is stored (and listed) under the archive's `_downsampled` name.
    name = image_id + ("_downsampled" if year == 2019 and index % 4 == 3 else "")
    with open(os.path.join(scratch, images_name, name + ".jpg"), "wb") as f:
      f.write(archive_image(seed, image_id, "AK" if diagnosis == "AKIEC" else diagnosis, image_size))
    truth_rows.append({"image": name, **{c: float(c == diagnosis) for c in _GROUND_TRUTH_COLUMNS[year]}})
    row = _metadata_row(seed, year, image_id, index)
    if year == 2018:
      row["dx"] = diagnosis.lower()
    meta_rows.append(row)
    classes[image_id] = "AK" if diagnosis == "AKIEC" else diagnosis
  pd.DataFrame(meta_rows).to_csv(os.path.join(scratch, metadata_name), index=False)
  pd.DataFrame(truth_rows).to_csv(os.path.join(scratch, truth_name), index=False, float_format="%.1f")
  for name in (images_name, metadata_name, truth_name):
    os.replace(os.path.join(scratch, name), os.path.join(out_dir, name))
  os.rmdir(scratch)
  return {"out_dir": out_dir, "year": year, "num_images": len(classes), "classes": classes,
          "image_size": image_size, "seed": seed}
