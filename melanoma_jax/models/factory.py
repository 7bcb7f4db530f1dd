"""The one place models are built, by name, from plain values (never a config): training, prediction, the
benchmarks and the tests all get the same model for the same arguments.

Each model module exposes its Flax module and a `build(**arguments)` of its own arguments (as big_vision's
model modules do); `build_model` passes a model exactly the arguments it names and refuses any other.
"""
import functools
import inspect

import flax.linen as nn
import jax.numpy as jnp

from melanoma_jax.models import backbones, classifier, mlp, tiny
from melanoma_jax.models import kernels as kernels_lib
from melanoma_jax.utils.errors import InputError

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The classifier of every backbone under the backbone's name (its `backbone_name` bound, not an argument).
BUILDERS = {**{name: functools.partial(classifier.build, backbone_name=name) for name in backbones.BACKBONES},
            "tiny": tiny.build, "mlp": mlp.build}
MODELS = tuple(BUILDERS)
CLASSIFIERS = backbones.BACKBONES  # The models built as a MelanomaClassifier.


def _check(field: str, value, allowed) -> None:
  if value not in allowed:
    raise InputError(f"{field}={value!r} must be one of {', '.join(allowed)}")


def arguments(name: str):
  """The argument names the model called `name` is built with."""
  _check("model", name, MODELS)
  bound = getattr(BUILDERS[name], "keywords", {})
  return tuple(p for p in inspect.signature(BUILDERS[name]).parameters if p not in bound)


def build_model(name: str, **kwargs) -> nn.Module:
  """The model called `name`, one of MODELS, built with `kwargs` (each one of `arguments(name)`):

  * "inception_resnet_v2" and "efficientnet_b0" ... "efficientnet_b7": `MelanomaClassifier` (that backbone
    + the head of `head_sizes`), images of at least `backbones.min_image_size(name)` pixels a side: dtype,
    head_sizes, dropout_rate, remat, bn_axis_name, kernels, num_classes;
  * "tiny": `TinyClassifier`: dtype, dropout_rate, bn_axis_name, kernels, num_classes;
  * "mlp": the tabular `MLP`: hidden_sizes, dropout_rate.

  `dtype` is a name in DTYPES (compute dtype; parameters stay float32); `kernels` one of KERNELS or a
  `Kernels` (models/kernels.py), resolved against the backend when the model runs; `bn_axis_name` the pmap
  axis over which BatchNorm averages its batch statistics.

  Raises:
    InputError: an unknown model name, argument, dtype or kernels choice (one line that names which).
  """
  known = arguments(name)
  unknown = sorted(set(kwargs) - set(known))
  if unknown:
    raise InputError(f"model {name!r} has no argument(s) {', '.join(unknown)} (it takes {', '.join(known)})")
  if "dtype" in kwargs:
    _check("dtype", kwargs["dtype"], tuple(DTYPES))
    kwargs["dtype"] = DTYPES[kwargs["dtype"]]
  if "kernels" in kwargs:
    kernels_lib.check(kwargs["kernels"])
  return BUILDERS[name](**kwargs)
