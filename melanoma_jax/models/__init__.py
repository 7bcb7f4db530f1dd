"""Flax models: InceptionResNetV2 (equal to keras.applications') and the melanoma classifier.

Keras weights are converted by `melanoma_jax.models.keras_weights` (imported on its own so that
importing this package never loads TensorFlow or orbax).
"""
from melanoma_jax.models.classifier import Head
from melanoma_jax.models.classifier import init_with_pretrained_backbone
from melanoma_jax.models.classifier import MelanomaClassifier
from melanoma_jax.models.classifier import with_pretrained_backbone
from melanoma_jax.models.inception_resnet_v2 import InceptionResNetV2

__all__ = [
    "Head",
    "InceptionResNetV2",
    "MelanomaClassifier",
    "init_with_pretrained_backbone",
    "with_pretrained_backbone",
]
