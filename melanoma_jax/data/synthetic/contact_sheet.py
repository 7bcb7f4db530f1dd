"""The contact sheet: a labelled PNG of a few patients' lesions, to see what the generator draws."""
import io

import numpy as np
import pandas as pd
from PIL import Image
from PIL import ImageDraw

from melanoma_jax.data.synthetic import generators


def write(train_df, seed, size, path, patients=4, benign_per_patient=4, ugly_duckling=0.0,
          generator=generators.DEFAULT):
  """A labelled PNG grid: per row, a few benign lesions of one patient and then their malignant one."""
  tile = int(np.clip(size, 160, 256))
  with_malignant = sorted(train_df.loc[train_df["target"] == 1, "patient_id"].unique())[:patients]
  chosen = with_malignant or sorted(train_df["patient_id"].unique())[:patients]
  rows = []
  for patient in chosen:
    lesions = train_df[train_df["patient_id"] == patient]
    rows.append(pd.concat([lesions[lesions["target"] == 0].head(benign_per_patient),
                           lesions[lesions["target"] == 1].head(1)]))
  columns = max(len(r) for r in rows)
  label_h = 28
  sheet = Image.new("RGB", (columns * tile, len(rows) * (tile + label_h)), "white")
  draw = ImageDraw.Draw(sheet)
  for r, row in enumerate(rows):
    for c, (_, item) in enumerate(row.iterrows()):
      jpeg = generators.render_image(generator, seed, item["image_name"], item["patient_id"], item["target"] == 1,
                                     size, ugly_duckling)
      image = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((tile, tile), Image.BICUBIC)
      left, top = c * tile, r * (tile + label_h)
      sheet.paste(image, (left, top))
      malignant = item["target"] == 1
      draw.text((left + 4, top + tile + 2), ("MALIGNANT" if malignant else "benign"),
                fill=(200, 0, 0) if malignant else (0, 100, 0))
      draw.text((left + 4, top + tile + 14), f"{item['patient_id']} {item['image_name']}", fill=(60, 60, 60))
  sheet.save(path)
