"""Keras InceptionResNetV2 layers -> variables of the Flax `InceptionResNetV2`: this family's Keras mapping.

`keras_weights.py` reads the Keras layers from a file or a live model and hands them here as objects
with `.name`, `.weights` ({role: array}), `.kind` ('conv', 'bn', 'dense' or 'other') and `.shapes()`.

Layers are matched by structure, never by auto-generated names: Keras names each unnamed layer
`<class>_<counter>` with a global creation counter, so the unnamed Conv2D and BatchNormalization
layers are put in creation order (their counters' relative order; any offset works) and paired with
`inception_resnet_v2.conv_bn_paths()`. The layers Keras names explicitly (`block35_1_conv`, ...,
`conv_7b`, `conv_7b_bn`) are matched by those names and the one Dense layer is the top. Every
shape is checked; the first mismatch raises InputError naming the layer and both shapes.
"""
import dataclasses
import functools
import re
from typing import Any, Dict, List, Optional, Tuple

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from melanoma_jax.models import inception_resnet_v2 as irv2
from melanoma_jax.utils.errors import InputError

AUTO = "auto"
TOP = "predictions"
_TOP_CONV, _ = irv2.TOP_CONV
_COUNTER = re.compile(r"^(.*?)(?:_(\d+))?$")

Flat = Dict[Tuple[str, ...], np.ndarray]


@functools.lru_cache(maxsize=8)
def expected_shapes(num_classes: Optional[int]) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{(collection, *path): shape} of `InceptionResNetV2(num_classes)`'s variables."""
  model = irv2.InceptionResNetV2(num_classes=num_classes)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)), train=False))
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract).items()}


def _creation_order(layers: List[Any]) -> List[Any]:
  """Auto-named layers sorted by Keras' creation counter (no suffix = first)."""
  def counter(layer):
    suffix = _COUNTER.match(layer.name).group(2)
    return int(suffix) if suffix else -1
  return sorted(layers, key=counter)


@dataclasses.dataclass(frozen=True)
class _Unit:
  """One Keras layer's place in the Flax tree.

  `key` is ("conv", i) / ("bn", i) for the i-th auto-named layer of that kind in creation order,
  else the name Keras gives the layer (TOP stands for the one Dense layer). `targets` maps each
  Keras weight role to its flat Flax key.
  """
  kind: str
  key: Any
  module: str
  targets: Dict[str, Tuple[str, ...]]


def _units(num_classes: Optional[int]) -> List[_Unit]:
  """Every weight-carrying Keras layer of InceptionResNetV2(num_classes), in network order."""
  units = []

  def up(block):
    units.append(_Unit("conv", f"{block}_conv", f"{block}/up", {
        "kernel": ("params", block, "up", "kernel"), "bias": ("params", block, "up", "bias")}))

  def conv_bn(key_conv, key_bn, path):
    module = "/".join(path)
    units.append(_Unit("conv", key_conv, module + "/conv",
                       {"kernel": ("params",) + path + ("conv", "kernel")}))
    units.append(_Unit("bn", key_bn, module + "/bn", {
        "beta": ("params",) + path + ("bn", "bias"),
        "moving_mean": ("batch_stats",) + path + ("bn", "mean"),
        "moving_variance": ("batch_stats",) + path + ("bn", "var")}))

  residual = set(irv2.residual_block_names())
  block = None
  for i, path in enumerate(irv2.conv_bn_paths()):
    if block in residual and path[0] != block:
      up(block)
    block = path[0]
    conv_bn(("conv", i), ("bn", i), path)
  if block in residual:
    up(block)
  conv_bn(_TOP_CONV, f"{_TOP_CONV}_bn", (_TOP_CONV,))
  if num_classes is not None:
    units.append(_Unit("dense", TOP, TOP, {"kernel": ("params", TOP, "kernel"),
                                           "bias": ("params", TOP, "bias")}))
  return units


def map_layers(layers: List[Any], num_classes, where: str) -> Flat:
  """Flat Flax variables {(collection, *path): array} from Keras layers, every shape checked."""
  named = {f"{b}_conv" for b in irv2.residual_block_names()} | {_TOP_CONV, f"{_TOP_CONV}_bn"}
  by_name = {layer.name: layer for layer in layers if layer.name in named}
  auto = {kind: _creation_order([layer for layer in layers
                                 if layer.kind == kind and layer.name not in named])
          for kind in ("conv", "bn")}
  dense = [layer for layer in layers if layer.kind == "dense"]
  for layer in layers:
    if layer.kind == "other":
      raise InputError(f"{where}: layer '{layer.name}' with weights {layer.shapes()} is not part "
                       "of InceptionResNetV2")
  if len(dense) > 1:
    raise InputError(f"{where}: {len(dense)} Dense layers "
                     f"({', '.join(layer.name for layer in dense)}); "
                     "InceptionResNetV2 has one, its top")
  if num_classes == AUTO:
    num_classes = dense[0].weights["kernel"].shape[1] if dense else None
  elif num_classes is not None and not dense:
    raise InputError(f"{where}: no top (Dense '{TOP}') layer, so num_classes={num_classes} cannot "
                     "be loaded; use num_classes=None (include_top=False) for the backbone alone")
  expected = expected_shapes(num_classes)
  flat = {}
  for unit in _units(num_classes):
    if unit.key == TOP:
      layer = dense[0]
    elif isinstance(unit.key, tuple):
      kind, index = unit.key
      if index >= len(auto[kind]):
        raise InputError(
            f"{where}: too few layers: InceptionResNetV2 '{unit.module}' is auto-named "
            f"{'Conv2D' if kind == 'conv' else 'BatchNormalization'} layer number {index + 1} in "
            f"creation order, the source has {len(auto[kind])} of them")
      layer = auto[kind][index]
    elif unit.key in by_name:
      layer = by_name[unit.key]
    else:
      raise InputError(f"{where}: layer '{unit.key}' of InceptionResNetV2 is missing")
    if layer.kind != unit.kind or set(layer.weights) != set(unit.targets):
      needs = {role: expected[path] for role, path in unit.targets.items()}
      raise InputError(f"{where}: layer '{layer.name}' has weights {layer.shapes()}, "
                       f"InceptionResNetV2 '{unit.module}' needs {needs}")
    for role, path in unit.targets.items():
      got, want = tuple(layer.weights[role].shape), expected[path]
      if got != want:
        raise InputError(
            f"{where}: layer '{layer.name}' does not match InceptionResNetV2 '{unit.module}': "
            f"its {role} has shape {got}, InceptionResNetV2 needs {want}")
      flat[path] = layer.weights[role]
  for found in auto.values():
    if len(found) > len(irv2.conv_bn_paths()):
      extra = found[len(irv2.conv_bn_paths())]
      raise InputError(f"{where}: layer '{extra.name}' with weights {extra.shapes()} is not part "
                       "of InceptionResNetV2 (too many layers)")
  return flat


