"""Keras EfficientNet B0-B7 layers -> variables of the Flax `EfficientNet`: this family's Keras mapping.

`keras_weights.py` reads the Keras layers from a file or a live model and hands them here as objects
with `.name` and `.weights` ({role: array}, role being e.g. 'kernel', 'gamma', 'moving_mean').
Keras names every EfficientNet layer with weights (`stem_conv`, `block2a_expand_bn`, `top_bn`,
`predictions`) except its `Normalization`, which is matched by its weights (mean, variance, count).
The variant is whichever of B0-B7 the layers fit entirely; when none does, the refusal names the first
layer (in network order) that does not fit the variant that the source follows furthest.

Keras adds a `Rescaling` by 1/sqrt(ImageNet stddev) after its `Normalization` only when it builds
the model with weights="imagenet", whose files store the ImageNet standard deviations as the variance
(tensorflow/tensorflow#49930). The mapping folds that rescaling into the variance (x / sqrt(v) /
sqrt(s) = x / sqrt(v * s)) when told the source has it, or, told nothing (a weights-only file), when
the stored variance is exactly those standard deviations: the official ImageNet files.
"""
import dataclasses
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from melanoma_jax.models import efficientnet as effnet
from melanoma_jax.utils.errors import InputError

NORMALIZATION = "normalization"
TOP = "predictions"
_NORMALIZATION_ROLES = frozenset(("mean", "variance", "count"))

Flat = Dict[Tuple[str, ...], np.ndarray]


def name(variant: str) -> str:
  """The backbone name of `variant`: "b3" -> "efficientnet_b3"."""
  return f"efficientnet_{variant}"


@dataclasses.dataclass(frozen=True)
class Unit:
  """One Keras layer: its name and, per weight role, (flat Flax path or None to drop, Keras shape)."""
  layer: str
  targets: Dict[str, Tuple[Optional[Tuple[str, ...]], Tuple[int, ...]]]


def units(variant: str, num_classes: Optional[int]) -> Tuple[Unit, ...]:
  """Every weight-carrying Keras layer of EfficientNet<variant>(classes=num_classes), in network order."""
  out = [Unit(NORMALIZATION, {"mean": (("batch_stats", NORMALIZATION, "mean"), (3,)),
                              "variance": (("batch_stats", NORMALIZATION, "var"), (3,)),
                              "count": (None, ())})]

  def conv(path, shape, bias=False):
    targets = {"kernel": (("params",) + path + ("kernel",), shape)}
    if bias:
      targets["bias"] = (("params",) + path + ("bias",), shape[-1:])
    out.append(Unit("_".join(path), targets))

  def bn(path, channels):
    out.append(Unit("_".join(path), {
        "gamma": (("params",) + path + ("scale",), (channels,)),
        "beta": (("params",) + path + ("bias",), (channels,)),
        "moving_mean": (("batch_stats",) + path + ("mean",), (channels,)),
        "moving_variance": (("batch_stats",) + path + ("var",), (channels,))}))

  stem, top = effnet.widths(variant)
  conv(("stem_conv",), (3, 3, 3, stem))
  bn(("stem_bn",), stem)
  channels = stem
  for b in effnet.blocks(variant):
    if b.expand_ratio != 1:
      conv((b.name, "expand_conv"), (1, 1, b.filters_in, b.filters))
      bn((b.name, "expand_bn"), b.filters)
    conv((b.name, "dwconv"), (b.kernel, b.kernel, b.filters, 1))
    bn((b.name, "bn"), b.filters)
    if 0 < b.se_ratio <= 1:
      conv((b.name, "se_reduce"), (1, 1, b.filters, b.filters_se), bias=True)
      conv((b.name, "se_expand"), (1, 1, b.filters_se, b.filters), bias=True)
    conv((b.name, "project_conv"), (1, 1, b.filters, b.filters_out))
    bn((b.name, "project_bn"), b.filters_out)
    channels = b.filters_out
  conv(("top_conv",), (1, 1, channels, top))
  bn(("top_bn",), top)
  if num_classes is not None:
    conv((TOP,), (top, num_classes), bias=True)
  return tuple(out)


def _to_flax(path: Tuple[str, ...], array: np.ndarray) -> np.ndarray:
  """Keras' depthwise kernel [k, k, channels, 1] is Flax's grouped-conv kernel [k, k, 1, channels]."""
  if path[-2] == "dwconv":
    k, k2, channels, _ = array.shape
    return array.reshape(k, k2, 1, channels)
  return array


def flax_shapes(variant: str, num_classes: Optional[int]) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{(collection, *path): shape} of `EfficientNet(variant, num_classes)`'s variables."""
  return {path: _to_flax(path, np.empty(shape, np.float32)).shape
          for unit in units(variant, num_classes) for path, shape in unit.targets.values() if path}


def identify(flat: Flat) -> Optional[str]:
  """The variant whose variables `flat` has exactly (top or not), or None."""
  has_top = ("params", TOP, "kernel") in flat
  num_classes = flat[("params", TOP, "kernel")].shape[1] if has_top else None
  shapes = {path: tuple(array.shape) for path, array in flat.items()}
  for variant in effnet.VARIANTS:
    if flax_shapes(variant, num_classes) == shapes:
      return variant
  return None


def _shapes(layer) -> Dict[str, Tuple[int, ...]]:
  return {role: tuple(np.shape(a)) for role, a in layer.weights.items()}


def _match(variant: str, by_name: Dict[str, Any], num_classes, where: str):
  """(flat, None) when the layers are those of `variant`, else (None, (units matched, InputError))."""
  model = f"EfficientNet{variant.upper()}"
  flat = {}
  expected = units(variant, num_classes)
  for position, unit in enumerate(expected):
    layer = by_name.get(unit.layer)
    if layer is None:
      return None, (position, InputError(f"{where}: layer '{unit.layer}' of {model} is missing"))
    if set(layer.weights) != set(unit.targets):
      return None, (position, InputError(
          f"{where}: layer '{layer.name}' has weights {_shapes(layer)}, {model}'s needs "
          f"{ {role: shape for role, (_, shape) in unit.targets.items()} }"))
    for role, (path, shape) in unit.targets.items():
      got = tuple(np.shape(layer.weights[role]))
      if got != shape:
        return None, (position, InputError(
            f"{where}: layer '{layer.name}' does not match {model}: its {role} has shape {got}, "
            f"{model} needs {shape}"))
      if path is not None:
        flat[path] = _to_flax(path, np.asarray(layer.weights[role], np.float32))
  used = {unit.layer for unit in expected}
  for key, layer in by_name.items():
    if key not in used:  # B1 has every layer of B0, and more.
      return None, (len(expected), InputError(
          f"{where}: layer '{layer.name}' with weights {_shapes(layer)} is not part of {model}"))
  return flat, None


def map_layers(layers: Sequence[Any], num_classes, where: str,
               imagenet_rescaling: Optional[bool] = None) -> Tuple[str, Flat]:
  """(variant, flat Flax variables) from the weight-carrying Keras layers of an EfficientNet.

  Args:
    layers: objects with `.name` and `.weights` ({role: array}).
    num_classes: "auto" (the source's top if it has one), None (drop it) or the top's class count.
    where: the source, to start error messages with.
    imagenet_rescaling: whether the Keras model has the ImageNet `Rescaling` after `Normalization`;
      None decides it from the stored variance (the module docstring).

  Raises:
    InputError: the layers fit no variant (naming the first layer that does not fit the closest one),
      a missing or different top, or a layer no variant has.
  """
  by_name = {}
  for layer in layers:
    if set(layer.weights) == _NORMALIZATION_ROLES:  # Keras' auto-named `normalization[_N]`.
      by_name[NORMALIZATION] = layer
    else:
      by_name[layer.name] = layer
  top = by_name.get(TOP)
  if num_classes == "auto":
    num_classes = np.shape(top.weights["kernel"])[1] if top is not None and "kernel" in top.weights else None
  elif num_classes is not None and top is None:
    raise InputError(f"{where}: no top (Dense '{TOP}') layer, so num_classes={num_classes} cannot "
                     "be loaded; use num_classes=None (include_top=False) for the backbone alone")
  if num_classes is None:
    by_name.pop(TOP, None)
  failures = []
  for variant in effnet.VARIANTS:
    flat, failure = _match(variant, by_name, num_classes, where)
    if flat is not None:
      break
    failures.append(failure)
  else:
    raise max(failures, key=lambda f: f[0])[1]
  var_path = ("batch_stats", NORMALIZATION, "var")
  stddev = np.asarray(effnet.IMAGENET_STDDEV_RGB, np.float32)
  if imagenet_rescaling is None:
    imagenet_rescaling = bool(np.array_equal(flat[var_path], stddev))
  if imagenet_rescaling:
    flat[var_path] = flat[var_path] * stddev
  return variant, flat


def has_imagenet_rescaling(layer_classes_and_scales: List[Tuple[str, Any]]) -> bool:
  """Whether a Keras model's (class name, `scale` config) layers include the ImageNet `Rescaling`:
  a Rescaling whose scale is one value per channel (the 1/255 one is a single number)."""
  return any(cls == "Rescaling" and np.ndim(scale) > 0 for cls, scale in layer_classes_and_scales)
