"""The Keras-equal backbones by name: `backbone(name, num_classes)` is the Flax module whose
`apply(variables, x, train=False)` equals the keras.applications model of that name called on the same
tensor x, with the variables `keras_weights.load_keras_weights` converts from it.

Each takes the input Keras' model takes: InceptionResNetV2 images scaled to [-1, 1] (Keras'
`preprocess_input` runs outside its model), EfficientNet pixels in [0, 255] (its rescaling and
normalisation are inside the model). The project's model input is one for every backbone, the [-1, 1]
images the data pipeline, the predict command and the SavedModel make; `from_model_input` turns it into a
backbone's own convention inside the classifier, so one image gets one probability whichever backbone.
"""
from typing import Optional

import flax.linen as nn

from melanoma_jax.models import efficientnet
from melanoma_jax.models import inception_resnet_v2
from melanoma_jax.models.inception_resnet_v2 import InceptionResNetV2
from melanoma_jax.utils.errors import InputError

INCEPTION_RESNET_V2 = "inception_resnet_v2"
BACKBONES = (INCEPTION_RESNET_V2,) + tuple(f"efficientnet_{v}" for v in efficientnet.VARIANTS)


def backbone(name: str, /, num_classes: Optional[int] = None, **kwargs) -> nn.Module:
  """The Flax module of backbone `name` (one of BACKBONES).

  Args:
    name: "inception_resnet_v2" or "efficientnet_b0" ... "efficientnet_b7".
    num_classes: size of the top Dense layer (logits, Keras' classifier_activation=None); None returns
      the globally average-pooled features (Keras' include_top=False, pooling="avg").
    **kwargs: the module's other attributes (dtype, remat, bn_axis_name, kernels; EfficientNet's
      drop_connect_rate and dropout_rate) and Flax's `name` of the submodule (hence `name` positional).

  Raises:
    InputError: an unknown name, in one line that lists BACKBONES.
  """
  if name not in BACKBONES:
    raise InputError(f"backbone {name!r} must be one of {', '.join(BACKBONES)}")
  if name == INCEPTION_RESNET_V2:
    return InceptionResNetV2(num_classes=num_classes, **kwargs)
  return efficientnet.EfficientNet(variant=name.rsplit("_", 1)[1], num_classes=num_classes, **kwargs)


def display_name(name: str) -> str:
  """Keras' name of backbone `name`: "efficientnet_b3" -> "EfficientNetB3"."""
  if name == INCEPTION_RESNET_V2:
    return "InceptionResNetV2"
  return "EfficientNet" + name.rsplit("_", 1)[1].upper()


def from_model_input(name: str, x):
  """The project's model input (NHWC in [-1, 1]) as backbone `name` takes it: unchanged for
  InceptionResNetV2, pixels in [0, 255] for EfficientNet (whose model rescales and normalises them)."""
  if name == INCEPTION_RESNET_V2:
    return x
  return (x + 1.0) * 127.5


def features(name: str) -> int:
  """Width of backbone `name`'s pooled features (its top convolution's filters)."""
  if name == INCEPTION_RESNET_V2:
    return inception_resnet_v2.FEATURES
  return efficientnet.widths(name.rsplit("_", 1)[1])[1]


def min_image_size(name: str) -> int:
  """The smallest image side backbone `name` takes."""
  return inception_resnet_v2.MIN_IMAGE_SIZE if name == INCEPTION_RESNET_V2 else efficientnet.MIN_IMAGE_SIZE
