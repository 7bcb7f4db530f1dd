"""EfficientNet B0-B7 in Flax linen, layer for layer equal to keras.applications.EfficientNetB0..B7.

The network is described by two tables, Keras' own: VARIANTS (width, depth, default resolution, top
dropout) and BLOCKS_ARGS (the B0 stages that width and depth scale). `blocks(variant)` expands them the
way Keras does, and both the module and the Keras weight converter (`efficientnet_keras.py`) read it, so
the converter's layers cannot drift from the module.

Inputs are NHWC pixels in [0, 255], as Keras' EfficientNet takes them: the model itself rescales by
1/255 and normalises with its `normalization` statistics ((x - mean) / sqrt(var), Keras'
`Normalization`), which the converter takes from the Keras model (and into whose variance it folds the
extra 1/sqrt(stddev) `Rescaling` that Keras adds for its ImageNet weights). A fresh `init` sets them to
the ImageNet mean and variance.

Variables tree (Keras layer `block2a_expand_conv` is `block2a/expand_conv`; `num_classes=None` drops
`predictions`):
  params:      stem_conv, stem_bn, block1a ... (expand_conv, expand_bn: only when expand_ratio != 1;
               dwconv, bn, se_reduce, se_expand, project_conv, project_bn), top_conv, top_bn, predictions
  batch_stats: normalization {mean, var} (never updated), and {mean, var} of every BatchNorm.
A depthwise kernel is Flax's [k, k, 1, channels] (Keras': [k, k, channels, 1]).
"""
import dataclasses
import math
from typing import Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from melanoma_jax.models.conv import PointwiseConv, SpatialConv
from melanoma_jax.models.depthwise import DepthwiseConv
from melanoma_jax.models.backbone_io import check_nhwc, feature_map_hooks
from melanoma_jax.models.kernels import Kernels, resolve
from melanoma_jax.utils.errors import InputError

MIN_IMAGE_SIZE = 32  # Keras' `min_size` for EfficientNet.
BN_EPSILON = 1e-3  # Keras BatchNormalization's defaults.
BN_MOMENTUM = 0.99
NORM_EPSILON = 1e-7  # keras.backend.epsilon(): Normalization divides by max(sqrt(var), epsilon).
DEPTH_DIVISOR = 8
DROP_CONNECT_RATE = 0.2  # Keras' default; the rate grows linearly to it over the blocks.
IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STDDEV_RGB = (0.229, 0.224, 0.225)

# name: (width coefficient, depth coefficient, default resolution, top dropout rate), as Keras' B0-B7.
VARIANTS = {
    "b0": (1.0, 1.0, 224, 0.2),
    "b1": (1.0, 1.1, 240, 0.2),
    "b2": (1.1, 1.2, 260, 0.3),
    "b3": (1.2, 1.4, 300, 0.3),
    "b4": (1.4, 1.8, 380, 0.4),
    "b5": (1.6, 2.2, 456, 0.4),
    "b6": (1.8, 2.6, 528, 0.5),
    "b7": (2.0, 3.1, 600, 0.5),
}

# Keras' DEFAULT_BLOCKS_ARGS (every stage has id_skip=True):
# (kernel_size, repeats, filters_in, filters_out, expand_ratio, strides, se_ratio).
BLOCKS_ARGS = (
    (3, 1, 32, 16, 1, 1, 0.25),
    (3, 2, 16, 24, 6, 2, 0.25),
    (5, 2, 24, 40, 6, 2, 0.25),
    (3, 3, 40, 80, 6, 2, 0.25),
    (5, 3, 80, 112, 6, 1, 0.25),
    (5, 4, 112, 192, 6, 2, 0.25),
    (3, 1, 192, 320, 6, 1, 0.25),
)
STEM_FILTERS = 32
TOP_FILTERS = 1280
CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_out", "truncated_normal")  # Keras' for EfficientNet.
DENSE_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")


def round_filters(filters: int, width: float) -> int:
  """Keras' `round_filters`: `filters * width` to a multiple of DEPTH_DIVISOR, never 10% below it."""
  filters *= width
  new_filters = max(DEPTH_DIVISOR, int(filters + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
  if new_filters < 0.9 * filters:
    new_filters += DEPTH_DIVISOR
  return int(new_filters)


def round_repeats(repeats: int, depth: float) -> int:
  return int(math.ceil(depth * repeats))


@dataclasses.dataclass(frozen=True)
class BlockSpec:
  """One inverted residual (MBConv) block, as Keras' `block(...)` arguments."""
  name: str  # Keras' prefix without the trailing '_': block1a, block2a, block2b, ...
  filters_in: int
  filters_out: int
  kernel: int
  strides: int
  expand_ratio: int
  se_ratio: float
  drop_rate: float  # Stochastic depth rate of the residual branch.

  @property
  def filters(self) -> int:
    return self.filters_in * self.expand_ratio

  @property
  def filters_se(self) -> int:
    return max(1, int(self.filters_in * self.se_ratio))

  @property
  def residual(self) -> bool:
    return self.strides == 1 and self.filters_in == self.filters_out


def widths(variant: str) -> Tuple[int, int]:
  """(stem filters, top conv filters) of `variant`."""
  width = VARIANTS[variant][0]
  return round_filters(STEM_FILTERS, width), round_filters(TOP_FILTERS, width)


def blocks(variant: str, drop_connect_rate: float = DROP_CONNECT_RATE) -> Tuple[BlockSpec, ...]:
  """The blocks of `variant` in network order, expanded from BLOCKS_ARGS exactly as Keras does."""
  width, depth, _, _ = VARIANTS[variant]
  total = float(sum(round_repeats(args[1], depth) for args in BLOCKS_ARGS))
  specs = []
  for i, (kernel, repeats, filters_in, filters_out, expand, strides, se_ratio) in enumerate(BLOCKS_ARGS):
    filters_in, filters_out = round_filters(filters_in, width), round_filters(filters_out, width)
    for j in range(round_repeats(repeats, depth)):
      if j > 0:  # Only a stage's first block changes stride and width.
        strides, filters_in = 1, filters_out
      specs.append(BlockSpec(f"block{i + 1}{chr(j + 97)}", filters_in, filters_out, kernel, strides,
                             expand, se_ratio, drop_connect_rate * len(specs) / total))
  return tuple(specs)


def correct_pad(size: Sequence[int], kernel: int) -> Tuple[Tuple[int, int], Tuple[int, int]]:
  """Keras' `imagenet_utils.correct_pad` for a known input size: the zero padding before a stride-2
  'valid' convolution (one pixel less before than after on an even side)."""
  return tuple((kernel // 2 - (1 - s % 2), kernel // 2) for s in size[:2])


def check_input_shape(shape: Sequence[int]) -> None:
  """Raises InputError unless `shape` is NHWC with 3 channels and H, W >= MIN_IMAGE_SIZE."""
  check_nhwc(shape, "EfficientNet", MIN_IMAGE_SIZE)


def _batch_norm(module, train: bool, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                      use_fast_variance=False, axis_name=module.bn_axis_name, dtype=module.dtype,
                      param_dtype=jnp.float32, name=name)


class Normalization(nn.Module):
  """Keras' `Normalization`: (x - mean) / max(sqrt(var), NORM_EPSILON) per channel, in float32. Its
  statistics are batch_stats that nothing updates; a fresh init gives ImageNet's mean and variance."""

  @nn.compact
  def __call__(self, x):
    mean = self.variable("batch_stats", "mean", lambda: jnp.array(IMAGENET_MEAN_RGB, jnp.float32))
    var = self.variable("batch_stats", "var",
                        lambda: jnp.square(jnp.array(IMAGENET_STDDEV_RGB, jnp.float32)))
    return (x - mean.value) / jnp.maximum(jnp.sqrt(var.value), NORM_EPSILON)


class MBConv(nn.Module):
  """Keras' EfficientNet `block`: expand 1x1, depthwise, squeeze-and-excitation, project 1x1, and the
  identity skip (with drop-connect in training) when the shape is kept."""
  spec: BlockSpec
  dtype: jnp.dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  kernels: Union[str, Kernels] = "auto"

  @nn.compact
  def __call__(self, inputs, train: bool):
    s, kernels = self.spec, resolve(self.kernels)
    x = inputs
    if s.expand_ratio != 1:
      x = PointwiseConv(s.filters, kernels=kernels, dtype=self.dtype, name="expand_conv")(x)
      x = nn.swish(_batch_norm(self, train, "expand_bn")(x))
    if s.strides == 2:
      x = jnp.pad(x, ((0, 0),) + correct_pad(x.shape[1:3], s.kernel) + ((0, 0),))
    x = DepthwiseConv((s.kernel, s.kernel), strides=s.strides, padding="VALID" if s.strides == 2 else "SAME",
                      kernels=kernels, kernel_init=CONV_INIT, dtype=self.dtype, name="dwconv")(x)
    x = nn.swish(_batch_norm(self, train, "bn")(x))
    if 0 < s.se_ratio <= 1:
      se = jnp.mean(x, axis=(1, 2), keepdims=True)
      se = nn.swish(PointwiseConv(s.filters_se, use_bias=True, kernels=kernels, dtype=self.dtype,
                                  name="se_reduce")(se))
      se = nn.sigmoid(PointwiseConv(s.filters, use_bias=True, kernels=kernels, dtype=self.dtype,
                                    name="se_expand")(se))
      x = x * se
    x = PointwiseConv(s.filters_out, kernels=kernels, dtype=self.dtype, name="project_conv")(x)
    x = _batch_norm(self, train, "project_bn")(x)
    if not s.residual:
      return x
    if s.drop_rate > 0:  # Keras' Dropout(noise_shape=(None, 1, 1, 1)): whole samples of the branch.
      x = nn.Dropout(s.drop_rate, broadcast_dims=(1, 2, 3), deterministic=not train, name="drop")(x)
    return x + inputs



class EfficientNet(nn.Module):
  """keras.applications.EfficientNet<variant> in Flax (Keras' `drop_connect_rate` included).

  `apply(variables, x, train=False)` on pixels in [0, 255] equals the Keras model called on the same
  tensor when the Keras model is built for x's height and width (Keras' `correct_pad` depends on them;
  an unsized Keras input pads odd sides as if they were even).

  Attributes:
    variant: "b0" ... "b7" (VARIANTS).
    num_classes: size of the top Dense layer (logits, no softmax; top dropout before it); None returns
      the globally average-pooled features of `widths(variant)[1]` channels.
    dtype: compute dtype; parameters and batch statistics stay float32.
    remat: recompute each block in the backward pass (nn.remat) to save memory.
    bn_axis_name: pmap axis name across which BatchNorm averages batch statistics in training.
    drop_connect_rate: stochastic depth of the last block (block b drops its residual branch at
      rate drop_connect_rate * b / blocks), in training only, from the 'dropout' rng collection.
    dropout_rate: top dropout before the Dense layer; None is the variant's (VARIANTS).
    kernels: the XLA:CPU workarounds for the 1x1 and stem convolutions (models/kernels.py).
  """
  variant: str = "b0"
  num_classes: Optional[int] = 1000
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  bn_axis_name: Optional[str] = None
  drop_connect_rate: float = DROP_CONNECT_RATE
  dropout_rate: Optional[float] = None
  kernels: Union[str, Kernels] = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    """Maps NHWC pixels in [0, 255] to logits [B, num_classes] or features [B, top filters]."""
    if self.variant not in VARIANTS:
      raise InputError(f"EfficientNet variant={self.variant!r} must be one of {', '.join(VARIANTS)}")
    check_input_shape(x.shape)
    kernels = resolve(self.kernels)
    stem, top = widths(self.variant)
    x = jnp.asarray(x, jnp.float32) * jnp.float32(1.0 / 255.0)  # Keras' Rescaling: x * scale.
    x = Normalization(name="normalization")(x).astype(self.dtype)
    x = jnp.pad(x, ((0, 0),) + correct_pad(x.shape[1:3], 3) + ((0, 0),))
    x = SpatialConv(stem, (3, 3), strides=(2, 2), padding="VALID", kernels=kernels,
                    kernel_init=CONV_INIT, dtype=self.dtype, name="stem_conv")(x)
    x = nn.swish(_batch_norm(self, train, "stem_bn")(x))
    block = nn.remat(MBConv, static_argnums=(2,)) if self.remat else MBConv
    for spec in blocks(self.variant, self.drop_connect_rate):
      x = block(spec, dtype=self.dtype, bn_axis_name=self.bn_axis_name, kernels=kernels,
                name=spec.name)(x, train)
    x = PointwiseConv(top, kernels=kernels, dtype=self.dtype, name="top_conv")(x)
    x = nn.swish(_batch_norm(self, train, "top_bn")(x))
    x = feature_map_hooks(self, x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes is None:
      return x
    rate = VARIANTS[self.variant][3] if self.dropout_rate is None else self.dropout_rate
    x = nn.Dropout(rate, deterministic=not train, name="top_dropout")(x)
    return nn.Dense(self.num_classes, kernel_init=DENSE_INIT, dtype=jnp.float32,
                    param_dtype=jnp.float32, name="predictions")(x)
