"""What every backbone does at its two ends: refuse an input it cannot take, and open its last feature map
to Grad-CAM. Shared by InceptionResNetV2, the EfficientNets and the tiny test model, so each checks and
exposes the same way."""
from typing import Sequence

import flax.linen as nn

from melanoma_jax.utils.errors import InputError


def check_nhwc(shape: Sequence[int], model: str, min_size: int) -> None:
  """Raises InputError unless `shape` is NHWC with 3 channels and height and width >= `min_size`."""
  shape = tuple(shape)
  if len(shape) != 4 or shape[-1] != 3 or shape[1] < min_size or shape[2] < min_size:
    raise InputError(f"{model} expects images as [batch, height, width, 3] with height and width "
                     f">= {min_size}; got an array of shape {shape}")


def feature_map_hooks(module: nn.Module, x):
  """The last convolutional feature map, open to Flax's own inspection (both no-ops in training):

  `sow`s it as intermediates/feature_map (with `mutable=["intermediates"]`) and adds the zero perturbation
  perturbations/feature_map (present when the variables carry that collection), whose gradient is the
  gradient with respect to the map: what Grad-CAM weighs the map's channels by.
  """
  if not module.is_initializing():  # Perturbations are the caller's to pass, never model variables.
    x = module.perturb("feature_map", x)
  module.sow("intermediates", "feature_map", x)
  return x
