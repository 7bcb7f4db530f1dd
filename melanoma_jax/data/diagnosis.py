"""Diagnosis targets: the ISIC 2019 classes and the 2020 data's `diagnosis` mapped onto them.

The 1st-place SIIM-ISIC 2020 solution trained a softmax over these classes instead of a binary target and
read the melanoma probability off it (`config.target=diagnosis`). MEL is class 0, so p(MEL) is the first
column wherever class probabilities are written.
"""
import numpy as np
import pandas as pd

from melanoma_jax.utils.errors import InputError

CLASSES = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK")
MEL = 0
# The 2020 `diagnosis` values onto the 2019 classes (the 1st place's mapping); anything else is UNK.
FROM_2020 = {
    "melanoma": "MEL",
    "nevus": "NV",
    "seborrheic keratosis": "BKL", "lichenoid keratosis": "BKL", "solar lentigo": "BKL", "lentigo NOS": "BKL",
    "cafe-au-lait macule": "UNK", "atypical melanocytic proliferation": "UNK", "unknown": "UNK",
}


def labels_2020(df: pd.DataFrame, source: str = "train.csv") -> np.ndarray:
  """int32 class indices of the rows of a 2020 table (`diagnosis`, `target`). A malignant row is MEL
  whatever its diagnosis says (the target defines melanoma in 2020), a benign one never is."""
  if "diagnosis" not in df.columns:
    raise InputError(f"{source}: config.target=diagnosis needs a 'diagnosis' column")
  names = df["diagnosis"].fillna("unknown").astype(str).map(lambda d: FROM_2020.get(d, "UNK"))
  labels = names.map(CLASSES.index).to_numpy(np.int32)
  malignant = df["target"].to_numpy() == 1
  labels[malignant] = MEL
  labels[~malignant & (labels == MEL)] = CLASSES.index("UNK")
  return labels


def class_columns() -> list:
  """The oof.csv columns of the class probabilities: p_MEL, p_NV, ..."""
  return [f"p_{name}" for name in CLASSES]
