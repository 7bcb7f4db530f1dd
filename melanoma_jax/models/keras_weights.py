"""Keras InceptionResNetV2 weights -> variables of the Flax `InceptionResNetV2`, cached with orbax.

Public names:
  load_keras_weights(source, num_classes="auto") -> {'params': ..., 'batch_stats': ...}
  init_backbone_variables(source, include_top) -> the same; what the training code calls.
  save_variables(variables, directory, force=False): writes the orbax cache read back by the above.
  main(argv): the cache CLI,
    python -m melanoma_jax.models.keras_weights --source FILE --out DIR [--no-top] [--force]

`source` is one of:
  - a legacy Keras HDF5 file: a full model (`model.save("x.h5")`) or weights only (the layout of
    the ImageNet files keras.applications downloads),
  - a Keras 3 `.weights.h5` file (`model.save_weights`),
  - a live `keras.Model`,
  - a directory written by `save_variables` / the CLI,
  - "imagenet": Keras downloads the official weights (needs internet or Keras' file cache).
`num_classes`: "auto" keeps the source's top layer if it has one; None drops it (backbone only);
an int requires a top with that many classes.

Layers are matched by structure, never by auto-generated names: Keras names each unnamed layer
`<class>_<counter>` with a global creation counter, so the unnamed Conv2D and BatchNormalization
layers are put in creation order (their counters' relative order; any offset works) and paired with
`inception_resnet_v2.conv_bn_paths()`. The layers Keras names explicitly (`block35_1_conv`, ...,
`conv_7b`, `conv_7b_bn`) are matched by those names and the one Dense layer is the top. Every
shape is checked; the first mismatch raises InputError naming the layer and both shapes.
"""
import argparse
import dataclasses
import functools
import os
import re
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import flax.traverse_util
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from melanoma_jax.models import inception_resnet_v2 as irv2
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

AUTO = "auto"
TOP = "predictions"
_TOP_CONV, _ = irv2.TOP_CONV
_BN_ROLES = ("beta", "moving_mean", "moving_variance")
_MODULE = "melanoma_jax.models.keras_weights"
_COUNTER = re.compile(r"^(.*?)(?:_(\d+))?$")

Variables = Dict[str, Any]
Flat = Dict[Tuple[str, ...], np.ndarray]


@dataclasses.dataclass(frozen=True)
class _Layer:
  """A Keras layer with weights: its name and {role: array}, role being e.g. 'kernel', 'beta'."""
  name: str
  weights: Dict[str, np.ndarray]

  @property
  def kind(self) -> str:
    kernel = self.weights.get("kernel")
    if "moving_mean" in self.weights:
      return "bn"
    if kernel is not None and kernel.ndim == 4:
      return "conv"
    if kernel is not None and kernel.ndim == 2:
      return "dense"
    return "other"

  def shapes(self) -> Dict[str, Tuple[int, ...]]:
    return {role: tuple(a.shape) for role, a in self.weights.items()}


# ----------------------------------------------------------------------------------------- readers
def _role(weight_name: str) -> str:
  """'conv2d_1/kernel:0' or 'kernel' -> 'kernel'."""
  return weight_name.split("/")[-1].split(":")[0]


def _text(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


def _read_keras_model(model) -> List[_Layer]:
  layers = []
  for layer in model.layers:
    if layer.weights:
      layers.append(_Layer(layer.name, {_role(v.name): np.asarray(v, np.float32)
                                        for v in layer.weights}))
  return layers


def _read_legacy_group(group: h5py.Group) -> List[_Layer]:
  """Layers of a legacy HDF5 weights group (attrs `layer_names`, per layer `weight_names`)."""
  layers = []
  for name in map(_text, group.attrs["layer_names"]):
    layer_group = group[name]
    names = [_text(n) for n in layer_group.attrs.get("weight_names", [])]
    if names:
      layers.append(_Layer(name, {_role(n): np.asarray(layer_group[n], np.float32)
                                  for n in names}))
  return layers


def _roles_by_shape(arrays: Sequence[np.ndarray]) -> Tuple[str, ...]:
  """Roles of a Keras 3 layer's unnamed variables, from their count and ranks (Keras' order)."""
  ranks = [a.ndim for a in arrays]
  if ranks and ranks[0] in (2, 4):
    return ("kernel", "bias")[:len(arrays)]
  if ranks == [1, 1, 1]:
    return _BN_ROLES
  if ranks == [1, 1, 1, 1]:
    return ("gamma",) + _BN_ROLES
  return tuple(f"variable_{i}" for i in range(len(arrays)))


def _read_keras3_group(group: h5py.Group) -> Optional[List[_Layer]]:
  """Layers of a Keras 3 `.weights.h5`; None when the file lacks the layer names (Keras < 3.4)."""
  layers = []
  for key in group:
    entry = group[key].get("vars")
    if entry is None or not len(entry):
      continue
    if "name" not in entry.attrs:
      return None
    arrays = [np.asarray(entry[i], np.float32) for i in sorted(entry, key=int)]
    layers.append(_Layer(_text(entry.attrs["name"]), dict(zip(_roles_by_shape(arrays), arrays))))
  return layers


def _keras():
  tf()  # TensorFlow first, with its GPUs hidden.
  import keras  # pylint: disable=g-import-not-at-top
  return keras


def _keras3_top_classes(group: h5py.Group) -> Optional[int]:
  """Class count of the Dense top (the only layer with a 2-D first variable) of a `.weights.h5`."""
  for key in group:
    entry = group[key].get("vars")
    if entry is not None and "0" in entry and entry["0"].ndim == 2:
      return entry["0"].shape[1]
  return None


def _read_keras3_via_keras(path: str, top_classes: Optional[int]) -> List[_Layer]:
  """Loads a `.weights.h5` without layer names into a fresh Keras model, by Keras' own mapping."""
  keras = _keras()
  if top_classes is None:
    model = keras.applications.InceptionResNetV2(include_top=False, weights=None)
  else:
    model = keras.applications.InceptionResNetV2(weights=None, classes=top_classes)
  try:
    model.load_weights(path)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{path}: Keras cannot load it into InceptionResNetV2: "
                     f"{str(e).strip().splitlines()[0]}") from e
  return _read_keras_model(model)


def _read_h5(path: str) -> List[_Layer]:
  """Layers of a legacy or Keras 3 HDF5 weights file."""
  if not h5py.is_hdf5(path):
    raise InputError(f"{path}: not an HDF5 file; expected Keras weights (.h5 or .weights.h5) "
                     f"or a directory written by `python -m {_MODULE}`")
  with h5py.File(path, "r") as f:
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
      return _read_legacy_group(f["model_weights"])
    if "layer_names" in f.attrs:
      return _read_legacy_group(f)
    keys = [k for k in ("layers", "_layer_checkpoint_dependencies") if k in f]
    if not keys:
      raise InputError(f"{path}: HDF5 file without Keras weights (no 'layer_names', "
                       "'model_weights' or 'layers')")
    layers = _read_keras3_group(f[keys[0]])
    if layers is not None:
      return layers
    top_classes = _keras3_top_classes(f[keys[0]])
  return _read_keras3_via_keras(path, top_classes)


def _download_imagenet(num_classes) -> List[_Layer]:
  if num_classes not in (AUTO, None, 1000):
    raise InputError(f"the ImageNet top has 1000 classes, not num_classes={num_classes}")
  keras = _keras()
  try:
    model = keras.applications.InceptionResNetV2(weights="imagenet",
                                                 include_top=num_classes is not None)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise InputError("could not get the ImageNet InceptionResNetV2 weights from Keras (no "
                     f"internet? download the .h5 elsewhere and pass its path): {reason}") from e
  return _read_keras_model(model)


# ----------------------------------------------------------------------------------------- mapping
@functools.lru_cache(maxsize=8)
def expected_shapes(num_classes: Optional[int]) -> Dict[Tuple[str, ...], Tuple[int, ...]]:
  """{(collection, *path): shape} of `InceptionResNetV2(num_classes)`'s variables."""
  model = irv2.InceptionResNetV2(num_classes=num_classes)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 75, 75, 3)), train=False))
  return {k: tuple(v.shape) for k, v in flax.traverse_util.flatten_dict(abstract).items()}


def _creation_order(layers: List[_Layer]) -> List[_Layer]:
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


def _map_layers(layers: List[_Layer], num_classes, where: str) -> Flat:
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


def _check_flat(flat: Flat, num_classes, where: str) -> Flat:
  """Checks (and trims the top of) already converted variables against the model's shapes."""
  has_top = ("params", TOP, "kernel") in flat
  if num_classes == AUTO:
    num_classes = flat[("params", TOP, "kernel")].shape[1] if has_top else None
  elif num_classes is not None and not has_top:
    raise InputError(f"{where}: converted without the top, so num_classes={num_classes} cannot be "
                     "loaded; use num_classes=None (include_top=False)")
  if num_classes is None:
    flat = {k: v for k, v in flat.items() if k[1] != TOP}
  expected = expected_shapes(num_classes)
  for path, shape in expected.items():
    if path not in flat:
      raise InputError(f"{where}: variable '{'/'.join(path)}' of InceptionResNetV2 is missing")
    if tuple(flat[path].shape) != shape:
      raise InputError(f"{where}: variable '{'/'.join(path)}' has shape {tuple(flat[path].shape)}, "
                       f"InceptionResNetV2 needs {shape}")
  for path in flat:
    if path not in expected:
      raise InputError(f"{where}: variable '{'/'.join(path)}' is not part of InceptionResNetV2")
  return flat


def _to_variables(flat: Flat) -> Variables:
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


# ------------------------------------------------------------------------------------------ public
def load_keras_weights(source, num_classes: Union[int, None, str] = AUTO) -> Variables:
  """Variables of `InceptionResNetV2(num_classes)` from Keras weights or a converted directory.

  Args:
    source: a Keras .h5 / .weights.h5 path, a live keras.Model, a directory written by
      `save_variables`, or "imagenet" (see the module docstring).
    num_classes: "auto" (the source's top if it has one), None (no top) or the top's class count.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 arrays, for `InceptionResNetV2.apply`.

  Raises:
    InputError: missing or unreadable source, or one that is not InceptionResNetV2 (the message
      names the first mismatching layer and both shapes).
  """
  if isinstance(source, str) and source == "imagenet":
    return _to_variables(
        _map_layers(_download_imagenet(num_classes), num_classes, "ImageNet weights"))
  if not isinstance(source, (str, os.PathLike)):
    keras = _keras()
    if not isinstance(source, keras.Model):
      raise InputError(f"weights source must be a path, 'imagenet' or a keras.Model, got "
                       f"{type(source).__name__}")
    return _to_variables(
        _map_layers(_read_keras_model(source), num_classes, f"Keras model '{source.name}'"))
  path = os.path.abspath(os.path.expanduser(os.fspath(source)))
  if not os.path.exists(path):
    raise InputError(f"weights file not found: {path}")
  if os.path.isdir(path):
    return _to_variables(_check_flat(_restore(path), num_classes, path))
  return _to_variables(_map_layers(_read_h5(path), num_classes, path))


def init_backbone_variables(source, include_top: bool) -> Variables:
  """Backbone variables from `source` (Keras file, model, cache directory or "imagenet").

  include_top=False gives the `InceptionResNetV2(num_classes=None)` variables that
  `classifier.with_pretrained_backbone` puts into a MelanomaClassifier; True keeps the source's top
  and requires one.
  """
  variables = load_keras_weights(source, num_classes=AUTO if include_top else None)
  if include_top and TOP not in variables["params"]:
    raise InputError(f"{source}: has no top (Dense '{TOP}') layer; use include_top=False")
  return variables


def save_variables(variables: Variables, directory: str, force: bool = False) -> str:
  """Writes converted variables with orbax to `directory` (absolute path returned)."""
  directory = os.path.abspath(os.path.expanduser(directory))
  if os.path.exists(directory) and not force:
    raise InputError(f"{directory} already exists; pass --force (force=True) to overwrite it")
  tree = jax.tree.map(lambda a: np.asarray(a, np.float32), variables)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(directory, tree, force=force)
  return directory


def _restore(directory: str) -> Flat:
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(directory)
  except Exception as e:  # pylint: disable=broad-except
    raise InputError(f"{directory}: not a directory of converted weights written by "
                     f"`python -m {_MODULE}` ({type(e).__name__})") from e
  return {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def main(argv: Optional[Sequence[str]] = None) -> int:
  """CLI: convert Keras weights once and cache them as an orbax checkpoint."""
  parser = argparse.ArgumentParser(
      prog=f"python -m {_MODULE}",
      description="Convert Keras InceptionResNetV2 weights (.h5 / .weights.h5 / 'imagenet') to "
      "Flax variables saved with orbax; load them with load_keras_weights(DIR).")
  parser.add_argument("--source", required=True, help="Keras weights file or 'imagenet'")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--no-top", action="store_true", help="drop the classification top")
  parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
  args = parser.parse_args(argv)
  try:
    out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.exists(out) and not args.force:
      raise InputError(f"{out} already exists; pass --force to overwrite it")
    variables = load_keras_weights(args.source, num_classes=None if args.no_top else AUTO)
    save_variables(variables, out, force=args.force)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = sum(np.size(a) for a in jax.tree.leaves(variables))
  top = variables["params"].get(TOP)
  top_text = f"top of {top['kernel'].shape[1]} classes" if top else "no top"
  print(f"wrote {count} values ({top_text}) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
