"""An ONNX export (`onnx_export.py`) as the predict command's predictor: `load(folder, model)` -> `OnnxPredictor`.

It has what `predict.predict_folder` reads of an `image.TrainedModel` (`image_size`, `global_batch`,
`score(images).probabilities`, `description`, `unfinished`), so the ONNX engine gets the same Reader, the same
rows and the same error rows as the JAX engine. The folder must be an ONNX export this project wrote: its
marker's format is "onnx" and the model file's bytes are those the export listed (a replaced or edited model is
refused, so what runs is what the export checked against the JAX path).
"""
import dataclasses
import json
import os

import numpy as np

from melanoma_jax.image import setup
from melanoma_jax.inference import onnx_export
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

MODELS = {"fp32": onnx_export.MODEL, "int8": onnx_export.INT8_MODEL}
BATCH = 16  # Images per ONNX Runtime call: memory stays bounded whatever the folder holds.


@dataclasses.dataclass(frozen=True)
class _Scores:
  probabilities: np.ndarray


class OnnxPredictor:
  """Model inputs (float32 [N, S, S, 3] in [-1, 1]) -> probabilities with ONNX Runtime (see the module doc)."""

  unfinished = ""
  engine = "onnx"  # What the model server asks of a predictor (`image.TrainedModel.engine`: "jax").

  def __init__(self, folder, record, model_file, threads=0):
    self.folder, self.record, self.model_file = folder, record, model_file
    self.image_size = int(record["contract"]["image_size"])
    self.tta = setup.tta_views(record["contract"]["tta"])  # Views (exports before views were counted: True).
    self.global_batch = BATCH
    self.session = onnx_export.session(os.path.join(folder, model_file), threads)

  @property
  def description(self):
    return (f"ONNX Runtime, {self.model_file} of {self.folder} ({self.record.get('model', '?')}; "
            f"exported from {self.record.get('workdir', '?')})")

  def score(self, images, batch=None):
    """Probabilities of `images`; ONNX Runtime takes any batch, so `batch` only caps the rows of one call."""
    return _Scores(onnx_export.probabilities(self.session, images, batch or BATCH))


def read_record(folder, flag="--exported"):
  """The marker of ONNX export `folder`; one-line InputError when it is not one."""
  path = os.path.join(folder, onnx_export.MARKER)
  if not os.path.isdir(folder):
    raise InputError(f"{flag}={folder}: not found")
  if not os.path.isfile(path):
    raise InputError(f"{flag}={folder}: not an ONNX export of this project (no {onnx_export.MARKER}); "
                     "write one with python -m melanoma_jax.export --format=onnx")
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    if record.get("format") != "onnx" or not isinstance(record.get("files"), dict):
      raise ValueError("not an ONNX export's record")
    int(record["contract"]["image_size"])
    if setup.tta_views(record["contract"].get("tta")) is None:
      raise ValueError(f"contract tta {record['contract'].get('tta')!r} is not a number of views")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{path}: unreadable ({e}); export again") from None
  return record


def load(folder, model="fp32", threads=0):
  """The OnnxPredictor of export `folder`'s `model` ("fp32" or "int8"); InputError (one line) when the folder
  is not an ONNX export, lacks that model, or the model's bytes are not those the export wrote."""
  if model not in MODELS:
    raise InputError(f"--model={model}: must be one of {', '.join(MODELS)}")
  record = read_record(folder)
  name = MODELS[model]
  path = os.path.join(folder, name)
  if name not in record["files"] or not os.path.isfile(path):
    raise InputError(f"--exported={folder}: holds no {name}" + (" (export with --quantize=int8)" if model == "int8"
                                                                 else ""))
  if files.sha256(path) != record["files"][name]:
    raise InputError(f"--exported={folder}: {name} is not the file the export wrote (its sha256 differs); "
                     "export again")
  return OnnxPredictor(folder, record, name, threads)
