"""Flax models: InceptionResNetV2 and EfficientNet B0-B7 (equal to keras.applications', by name through
`backbone`), the melanoma classifier, the tiny smoke-test classifier and the tabular MLP, all built by
`build_model`.

Keras weights are converted by `melanoma_jax.models.keras_weights` (imported on its own so that
importing this package never loads TensorFlow or orbax).
"""
from melanoma_jax.models.backbones import backbone
from melanoma_jax.models.backbones import BACKBONES
from melanoma_jax.models.backbones import min_image_size
from melanoma_jax.models.classifier import Head
from melanoma_jax.models.classifier import init_with_pretrained_backbone
from melanoma_jax.models.classifier import MelanomaClassifier
from melanoma_jax.models.classifier import melanoma_logit
from melanoma_jax.models.classifier import melanoma_probability
from melanoma_jax.models.classifier import with_pretrained_backbone
from melanoma_jax.models.factory import build_model
from melanoma_jax.models.factory import CLASSIFIERS
from melanoma_jax.models.factory import DTYPES
from melanoma_jax.models.factory import MODELS
from melanoma_jax.models.efficientnet import EfficientNet
from melanoma_jax.models.inception_resnet_v2 import InceptionResNetV2
from melanoma_jax.models.inception_resnet_v2 import MIN_IMAGE_SIZE
from melanoma_jax.models.kernels import Kernels
from melanoma_jax.models.kernels import KERNELS

__all__ = [
    "BACKBONES",
    "CLASSIFIERS",
    "DTYPES",
    "EfficientNet",
    "Head",
    "InceptionResNetV2",
    "KERNELS",
    "Kernels",
    "MelanomaClassifier",
    "MIN_IMAGE_SIZE",
    "MODELS",
    "backbone",
    "build_model",
    "init_with_pretrained_backbone",
    "melanoma_logit",
    "melanoma_probability",
    "min_image_size",
    "with_pretrained_backbone",
]
