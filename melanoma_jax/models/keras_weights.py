"""Keras application weights -> variables of the equal Flax backbone, cached with orbax.

Public names:
  load_keras_weights(source, num_classes="auto") -> {'params': ..., 'batch_stats': ...}
  backbone_name(variables) -> which of `backbones.BACKBONES` the variables belong to.
  init_backbone_variables(source, include_top) -> the same; what the training code calls.
  save_variables(variables, directory, force=False): writes the orbax cache read back by the above.
  main(argv): the cache CLI,
    python -m melanoma_jax.models.keras_weights --source FILE --out DIR [--no-top] [--force]

The architecture is recognised from the source: a layer named `stem_conv` makes it an EfficientNet
(the variant, B0-B7, is the one whose layers it has: `efficientnet_keras.py`), anything else is
matched against InceptionResNetV2 (`inception_resnet_v2_keras.py`). Each family's module owns its
layer mapping; this one reads the layers and caches the result. A source that fits neither is
refused in one InputError line naming the first layer that does not fit and both shapes.

`source` is one of:
  - a legacy Keras HDF5 file: a full model (`model.save("x.h5")`) or weights only (the layout of
    the ImageNet files keras.applications downloads),
  - a Keras 3 `.weights.h5` file (`model.save_weights`),
  - a live `keras.Model`,
  - a directory written by `save_variables` / the CLI,
  - "imagenet" or "imagenet:<backbone>" (e.g. "imagenet:efficientnet_b3"; plain "imagenet" is
    InceptionResNetV2): Keras downloads the official weights (needs internet or Keras' file cache).
`num_classes`: "auto" keeps the source's top if it has one; None drops it (backbone only);
an int requires a top with that many classes.
"""
import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import flax.traverse_util
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from melanoma_jax.models import backbones
from melanoma_jax.models import efficientnet as effnet
from melanoma_jax.models import efficientnet_keras
from melanoma_jax.models import inception_resnet_v2_keras as irv2_keras
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.tf_host import tf

AUTO = "auto"
TOP = "predictions"
IRV2 = "inception_resnet_v2"
_BN_ROLES = ("beta", "moving_mean", "moving_variance")
_MODULE = "melanoma_jax.models.keras_weights"

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
  """'conv2d_1/kernel:0' or 'kernel' -> 'kernel'; Keras 2 names a depthwise kernel 'depthwise_kernel'."""
  role = weight_name.split("/")[-1].split(":")[0]
  return "kernel" if role == "depthwise_kernel" else role


def _text(value) -> str:
  return value.decode("utf8") if isinstance(value, bytes) else str(value)


@dataclasses.dataclass(frozen=True)
class _Read:
  """What a source holds: its weight-carrying layers, and whether its Keras graph has the ImageNet
  `Rescaling` of EfficientNet (None when the source has no graph: a weights-only file)."""
  layers: List[_Layer]
  imagenet_rescaling: Optional[bool] = None


def _read_keras_model(model) -> _Read:
  scales = [(type(layer).__name__, getattr(layer, "scale", None)) for layer in model.layers]
  layers = []
  for layer in model.layers:
    if layer.weights:
      layers.append(_Layer(layer.name, {_role(v.name): np.asarray(v, np.float32)
                                        for v in layer.weights}))
  return _Read(layers, efficientnet_keras.has_imagenet_rescaling(scales))


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
  if ranks == [1, 1, 0]:  # Normalization.
    return ("mean", "variance", "count")
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


def _keras3_candidates(group: h5py.Group) -> Tuple[str, ...]:
  """The backbones a `.weights.h5` without layer names may hold: the EfficientNets with as many
  depthwise convolutions (Keras' keys: depthwise_conv2d[_N]) as blocks, else InceptionResNetV2."""
  depthwise = sum(1 for key in group if key.split("_")[:2] == ["depthwise", "conv2d"])
  if not depthwise:
    return (IRV2,)
  return tuple(efficientnet_keras.name(v) for v in effnet.VARIANTS
               if len(effnet.blocks(v)) == depthwise)


def _read_keras3_via_keras(path: str, candidates: Sequence[str],
                           top_classes: Optional[int]) -> _Read:
  """Loads a `.weights.h5` without layer names into a fresh Keras model, by Keras' own mapping: the
  first of `candidates` that takes it."""
  error = None
  for name in candidates:
    model = _keras_application(name, weights=None, num_classes=top_classes)
    try:
      model.load_weights(path)
    except Exception as e:  # pylint: disable=broad-except
      error = e
      continue
    read = _read_keras_model(model)
    return _Read(read.layers)  # A weights-only file: no graph to say whether it rescales.
  raise InputError(f"{path}: Keras cannot load it into {' or '.join(candidates)}: "
                   f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}"
                   ) from error


def _keras_application(name: str, weights, num_classes: Optional[int]):
  """keras.applications' model for backbone `name` (logits out when it has a top)."""
  keras = _keras()
  constructor = backbones.display_name(name)
  kwargs = dict(weights=weights, include_top=num_classes is not None)
  if num_classes is not None:
    kwargs.update(classes=num_classes, classifier_activation=None)
  return getattr(keras.applications, constructor)(**kwargs)


def _legacy_rescaling(f: h5py.File) -> Optional[bool]:
  """Whether a legacy full-model file's graph (`model_config`) has EfficientNet's ImageNet Rescaling."""
  if "model_config" not in f.attrs:
    return None
  config = json.loads(_text(f.attrs["model_config"]))
  layers = config.get("config", {}).get("layers", [])
  return efficientnet_keras.has_imagenet_rescaling(
      [(layer.get("class_name"), layer.get("config", {}).get("scale")) for layer in layers])


def _read_h5(path: str) -> _Read:
  """Layers of a legacy or Keras 3 HDF5 weights file."""
  if not h5py.is_hdf5(path):
    raise InputError(f"{path}: not an HDF5 file; expected Keras weights (.h5 or .weights.h5) "
                     f"or a directory written by `python -m {_MODULE}`")
  with h5py.File(path, "r") as f:
    if "model_weights" in f and "layer_names" in f["model_weights"].attrs:
      return _Read(_read_legacy_group(f["model_weights"]), _legacy_rescaling(f))
    if "layer_names" in f.attrs:
      return _Read(_read_legacy_group(f))
    keys = [k for k in ("layers", "_layer_checkpoint_dependencies") if k in f]
    if not keys:
      raise InputError(f"{path}: HDF5 file without Keras weights (no 'layer_names', "
                       "'model_weights' or 'layers')")
    layers = _read_keras3_group(f[keys[0]])
    if layers is not None:
      return _Read(layers)
    top_classes = _keras3_top_classes(f[keys[0]])
    candidates = _keras3_candidates(f[keys[0]])
  return _read_keras3_via_keras(path, candidates, top_classes)


def _download_imagenet(source: str, num_classes) -> _Read:
  """The official ImageNet weights of "imagenet" (InceptionResNetV2) or "imagenet:<backbone>"."""
  name = source.partition(":")[2] or IRV2
  if name not in backbones.BACKBONES:
    raise InputError(f"{source!r}: the backbone after 'imagenet:' must be one of "
                     f"{', '.join(backbones.BACKBONES)}")
  if num_classes not in (AUTO, None, 1000):
    raise InputError(f"the ImageNet top has 1000 classes, not num_classes={num_classes}")
  try:
    model = _keras_application(name, weights="imagenet",
                               num_classes=None if num_classes is None else 1000)
  except Exception as e:  # pylint: disable=broad-except
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise InputError(f"could not get the ImageNet {name} weights from Keras (no "
                     f"internet? download the .h5 elsewhere and pass its path): {reason}") from e
  return _read_keras_model(model)


# ----------------------------------------------------------------------------------------- mapping
def _map(read: _Read, num_classes, where: str) -> Tuple[str, Flat]:
  """(backbone name, flat Flax variables) of the layers, by the family the layers belong to."""
  if any(layer.name == "stem_conv" for layer in read.layers):
    variant, flat = efficientnet_keras.map_layers(read.layers, num_classes, where,
                                                  read.imagenet_rescaling)
    return efficientnet_keras.name(variant), flat
  return IRV2, irv2_keras.map_layers(read.layers, num_classes, where)


def _expected(flat: Flat, num_classes: Optional[int], where: str) -> Tuple[str, Dict]:
  """(backbone name, {path: shape}) of the backbone that converted variables `flat` belong to."""
  if ("params", "stem_conv", "kernel") not in flat:
    return IRV2, irv2_keras.expected_shapes(num_classes)
  variant = efficientnet_keras.identify(flat)
  if variant is None:
    stem = tuple(flat[("params", "stem_conv", "kernel")].shape)
    raise InputError(f"{where}: variables of no EfficientNet B0-B7 (stem_conv kernel {stem}, "
                     f"{len({k[1] for k in flat if k[1].startswith('block')})} blocks)")
  return efficientnet_keras.name(variant), efficientnet_keras.flax_shapes(variant, num_classes)


def _check_flat(flat: Flat, num_classes, where: str) -> Tuple[str, Flat]:
  """(backbone name, flat): checks (and trims the top of) already converted variables against the
  shapes of the backbone they belong to."""
  has_top = ("params", TOP, "kernel") in flat
  if num_classes == AUTO:
    num_classes = flat[("params", TOP, "kernel")].shape[1] if has_top else None
  elif num_classes is not None and not has_top:
    raise InputError(f"{where}: converted without the top, so num_classes={num_classes} cannot be "
                     "loaded; use num_classes=None (include_top=False)")
  if num_classes is None:
    flat = {k: v for k, v in flat.items() if k[1] != TOP}
  name, expected = _expected(flat, num_classes, where)
  model = backbones.display_name(name)
  for path, shape in expected.items():
    if path not in flat:
      raise InputError(f"{where}: variable '{'/'.join(path)}' of {model} is missing")
    if tuple(flat[path].shape) != shape:
      raise InputError(f"{where}: variable '{'/'.join(path)}' has shape {tuple(flat[path].shape)}, "
                       f"{model} needs {shape}")
  for path in flat:
    if path not in expected:
      raise InputError(f"{where}: variable '{'/'.join(path)}' is not part of {model}")
  return name, flat


def _to_variables(flat: Flat) -> Variables:
  return flax.traverse_util.unflatten_dict(
      {k: jnp.asarray(v, jnp.float32) for k, v in flat.items()})


# ------------------------------------------------------------------------------------------ public
def load_keras_weights(source, num_classes: Union[int, None, str] = AUTO) -> Variables:
  """Variables of the backbone the source holds (`backbones.backbone(backbone_name(variables),
  num_classes)`), from Keras weights or a converted directory.

  Args:
    source: a Keras .h5 / .weights.h5 path, a live keras.Model, a directory written by
      `save_variables`, or "imagenet[:<backbone>]" (see the module docstring).
    num_classes: "auto" (the source's top if it has one), None (no top) or the top's class count.

  Returns:
    {'params': ..., 'batch_stats': ...} of float32 arrays, for that backbone's `apply`.

  Raises:
    InputError: missing or unreadable source, or one that is none of `backbones.BACKBONES` (the
      message names the first mismatching layer and both shapes).
  """
  return _to_variables(_load(source, num_classes)[1])


def _load(source, num_classes) -> Tuple[str, Flat]:
  if isinstance(source, str) and source.partition(":")[0] == "imagenet":
    return _map(_download_imagenet(source, num_classes), num_classes, "ImageNet weights")
  if not isinstance(source, (str, os.PathLike)):
    keras = _keras()
    if not isinstance(source, keras.Model):
      raise InputError(f"weights source must be a path, 'imagenet' or a keras.Model, got "
                       f"{type(source).__name__}")
    return _map(_read_keras_model(source), num_classes, f"Keras model '{source.name}'")
  path = os.path.abspath(os.path.expanduser(os.fspath(source)))
  if not os.path.exists(path):
    raise InputError(f"weights file not found: {path}")
  if os.path.isdir(path):
    return _check_flat(_restore(path), num_classes, path)
  return _map(_read_h5(path), num_classes, path)


def backbone_name(variables: Variables) -> str:
  """Which of `backbones.BACKBONES` converted `variables` belong to (InputError if none)."""
  flat = {k: np.asarray(v) for k, v in flax.traverse_util.flatten_dict(variables).items()}
  return _check_flat(flat, AUTO, "variables")[0]


def init_backbone_variables(source, include_top: bool) -> Variables:
  """Backbone variables from `source` (Keras file, model, cache directory or "imagenet").

  include_top=False gives the `backbone(name, num_classes=None)` variables (for InceptionResNetV2, those
  that `classifier.with_pretrained_backbone` puts into a MelanomaClassifier); True keeps the source's
  top and requires one.
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
      description="Convert Keras InceptionResNetV2 or EfficientNet B0-B7 weights (.h5 / .weights.h5 / "
      "'imagenet[:<backbone>]') to Flax variables saved with orbax; load them with "
      "load_keras_weights(DIR).")
  parser.add_argument("--source", required=True,
                      help="Keras weights file, 'imagenet' (InceptionResNetV2) or 'imagenet:<backbone>' "
                      f"({', '.join(backbones.BACKBONES)})")
  parser.add_argument("--out", required=True, help="output directory (must not exist)")
  parser.add_argument("--no-top", action="store_true", help="drop the classification top")
  parser.add_argument("--force", action="store_true", help="overwrite --out if it exists")
  args = parser.parse_args(argv)
  try:
    out = os.path.abspath(os.path.expanduser(args.out))
    if os.path.exists(out) and not args.force:
      raise InputError(f"{out} already exists; pass --force to overwrite it")
    name, flat = _load(args.source, num_classes=None if args.no_top else AUTO)
    variables = _to_variables(flat)
    save_variables(variables, out, force=args.force)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  count = sum(np.size(a) for a in jax.tree.leaves(variables))
  top = variables["params"].get(TOP)
  top_text = f"top of {top['kernel'].shape[1]} classes" if top else "no top"
  print(f"wrote {count} values ({top_text}) of {name} to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
