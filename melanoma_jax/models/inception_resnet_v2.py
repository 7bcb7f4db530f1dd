"""InceptionResNetV2 in Flax linen, layer for layer equal to keras.applications.InceptionResNetV2.

The network is described by the spec tables below; both the module and the Keras weight converter
(`inception_resnet_v2_keras.py`) read them, so the converter's layer order cannot drift from the module.

Variables tree (`num_classes=None` drops `predictions`):
  params:      conv_1a ... conv_4a, mixed_5b, block35_1..10, mixed_6a, block17_1..20, mixed_7a,
               block8_1..10, conv_7b, predictions
  batch_stats: the same paths for every conv + BatchNorm unit.
A conv + BatchNorm unit is `{'conv': {'kernel'}, 'bn': {'bias'}}` in params and `{'bn': {'mean',
'var'}}` in batch_stats; a residual block's 1x1 "up" convolution is `up: {'kernel', 'bias'}`.
"""
import dataclasses
from typing import Iterator, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from melanoma_jax.models.backbone_io import check_nhwc, feature_map_hooks
from melanoma_jax.models.conv import KERNEL_INIT, PointwiseConv, SpatialConv, activation_dtype
from melanoma_jax.models.kernels import Kernels, resolve
from melanoma_jax.models.pooling import max_pool

MIN_IMAGE_SIZE = 75  # The smallest input whose feature maps stay non-empty through the stem and reductions.
FEATURES = 1536
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


@dataclasses.dataclass(frozen=True)
class Conv:
  """One conv + BatchNorm + ReLU unit (Keras `conv2d_bn` without a name)."""
  features: int
  kernel: Tuple[int, int]
  strides: int = 1
  padding: str = "SAME"


def _c(features: int, kernel, strides: int = 1, padding: str = "SAME") -> Conv:
  kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
  return Conv(features, kernel, strides, padding)


@dataclasses.dataclass(frozen=True)
class Mixed:
  """Parallel branches concatenated on channels, in Keras order.

  `pool` is None, "avg" (3x3 stride 1 'same', padding excluded, then `pool_convs`) or "max"
  (3x3 stride 2 'valid'); the pool branch comes last.
  """
  branches: Tuple[Tuple[Conv, ...], ...]
  pool: Optional[str] = None
  pool_convs: Tuple[Conv, ...] = ()


STEM: Tuple[Tuple[str, Conv], ...] = (
    ("conv_1a", _c(32, 3, 2, "VALID")),
    ("conv_2a", _c(32, 3, 1, "VALID")),
    ("conv_2b", _c(64, 3)),
    # max pool 3x3 / 2
    ("conv_3b", _c(80, 1, 1, "VALID")),
    ("conv_4a", _c(192, 3, 1, "VALID")),
    # max pool 3x3 / 2
)
MIXED_5B = Mixed(
    branches=((_c(96, 1),), (_c(48, 1), _c(64, 5)), (_c(64, 1), _c(96, 3), _c(96, 3))),
    pool="avg", pool_convs=(_c(64, 1),))
MIXED_6A = Mixed(
    branches=((_c(384, 3, 2, "VALID"),), (_c(256, 1), _c(256, 3), _c(384, 3, 2, "VALID"))),
    pool="max")
MIXED_7A = Mixed(
    branches=((_c(256, 1), _c(384, 3, 2, "VALID")), (_c(256, 1), _c(288, 3, 2, "VALID")),
              (_c(256, 1), _c(288, 3), _c(320, 3, 2, "VALID"))),
    pool="max")
BLOCK35 = Mixed(branches=((_c(32, 1),), (_c(32, 1), _c(32, 3)),
                          (_c(32, 1), _c(48, 3), _c(64, 3))))
BLOCK17 = Mixed(branches=((_c(192, 1),), (_c(128, 1), _c(160, (1, 7)), _c(192, (7, 1)))))
BLOCK8 = Mixed(branches=((_c(192, 1),), (_c(192, 1), _c(224, (1, 3)), _c(256, (3, 1)))))

# (name, spec, residual scale or None for a reduction block, ReLU after the residual sum).
BODY: Tuple[Tuple[str, Mixed, Optional[float], bool], ...] = (
    (("mixed_5b", MIXED_5B, None, True),)
    + tuple((f"block35_{i}", BLOCK35, 0.17, True) for i in range(1, 11))
    + (("mixed_6a", MIXED_6A, None, True),)
    + tuple((f"block17_{i}", BLOCK17, 0.1, True) for i in range(1, 21))
    + (("mixed_7a", MIXED_7A, None, True),)
    + tuple((f"block8_{i}", BLOCK8, 0.2, True) for i in range(1, 10))
    + (("block8_10", BLOCK8, 1.0, False),))
TOP_CONV = ("conv_7b", _c(FEATURES, 1))


def _branch_name(branch: int, index: int) -> str:
  return f"branch_{branch}_{index}"


def _branch_convs(spec: Mixed) -> Iterator[Tuple[str, Conv]]:
  """(name, conv) of a Mixed block's units in Keras creation order (the pool branch last)."""
  for b, branch in enumerate(spec.branches):
    for j, conv in enumerate(branch):
      yield _branch_name(b, j), conv
  for j, conv in enumerate(spec.pool_convs):
    yield _branch_name(len(spec.branches), j), conv


def conv_bn_paths() -> Tuple[Tuple[str, ...], ...]:
  """Paths of the unnamed Keras `conv2d_bn` units, in Keras creation order (203 of them)."""
  paths = [(name,) for name, _ in STEM]
  for block, spec, _, _ in BODY:
    paths.extend((block, name) for name, _ in _branch_convs(spec))
  return tuple(paths)


def residual_block_names() -> Tuple[str, ...]:
  """Names of the residual blocks; Keras names their up convolutions `<name>_conv`."""
  return tuple(name for name, _, scale, _ in BODY if scale is not None)


def _conv(spec: Conv, dtype, kernels: Kernels, name: str) -> nn.Module:
  """The convolution of a conv + BatchNorm unit (no bias) (models/conv.py): 1x1 stride 1 a
  `PointwiseConv`, the others a `SpatialConv`; how each runs is up to `kernels` ("auto" turns them all off
  on accelerators: XLA's own convolutions and gradients, cuDNN's on a GPU, which need no im2col buffer).
  """
  out = activation_dtype(dtype, kernels)
  if spec.kernel == (1, 1) and spec.strides == 1:  # 'SAME' and 'VALID' agree for 1x1.
    return PointwiseConv(spec.features, kernels=kernels, dtype=dtype, output_dtype=out, name=name)
  return SpatialConv(spec.features, spec.kernel, strides=(spec.strides, spec.strides),
                     padding=spec.padding, kernels=kernels, dtype=dtype, output_dtype=out, name=name)


class ConvBN(nn.Module):
  """Conv (no bias) + BatchNorm (no scale) + optional ReLU, as Keras `conv2d_bn`."""
  spec: Conv
  relu: bool = True
  dtype: jnp.dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  kernels: Union[str, Kernels] = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    s, kernels = self.spec, resolve(self.kernels)
    x = _conv(s, self.dtype, kernels, "conv")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                     use_scale=False, use_bias=True, use_fast_variance=False,
                     axis_name=self.bn_axis_name, dtype=activation_dtype(self.dtype, kernels),
                     param_dtype=jnp.float32,
                     name="bn")(x)
    return nn.relu(x) if self.relu else x


class Block(nn.Module):
  """A Mixed block: concatenated branches, plus `x + scale * up(branches)` when residual."""
  spec: Mixed
  scale: Optional[float] = None  # None: not residual.
  dtype: jnp.dtype = jnp.float32
  bn_axis_name: Optional[str] = None
  kernels: Union[str, Kernels] = "auto"
  relu: bool = True  # After the residual sum.

  @nn.compact
  def __call__(self, x, train: bool):
    kernels = resolve(self.kernels)

    def chain(y, branch, convs):
      for j, conv in enumerate(convs):
        y = ConvBN(conv, dtype=self.dtype, bn_axis_name=self.bn_axis_name, kernels=kernels,
                   name=_branch_name(branch, j))(y, train)
      return y

    outputs = [chain(x, b, convs) for b, convs in enumerate(self.spec.branches)]
    if self.spec.pool == "avg":
      y = nn.avg_pool(x, (3, 3), strides=(1, 1), padding="SAME", count_include_pad=False)
      outputs.append(chain(y, len(self.spec.branches), self.spec.pool_convs))
    elif self.spec.pool == "max":
      outputs.append(max_pool(x, (3, 3), (2, 2), kernels))
    mixed = jnp.concatenate(outputs, axis=-1)
    if self.scale is None:
      return mixed
    up = PointwiseConv(x.shape[-1], use_bias=True, kernels=kernels, dtype=self.dtype,
                       output_dtype=activation_dtype(self.dtype, kernels), name="up")(mixed)
    x = x + up * self.scale
    x = nn.relu(x) if self.relu else x
    return materialise(x) if kernels.materialise else x


@jax.custom_vjp
def materialise(x):
  """`x`, computed once: XLA may not fold it into its consumers.

  Without it, XLA fuses the chain of residual sums x_i = relu(x_{i-1} + scale * up_i) into every consumer
  of x_i (the next block, the ReLU masks of the backward pass) and recomputes all earlier blocks there:
  69 fusions recomputed 642 blocks in a 299x299 training step. `lax.optimization_barrier` does not stop
  it, since XLA:CPU removes barriers before fusion. A division is an "expensive" op that XLA's fusion will
  not duplicate, and dividing by 1 + 0 * x is exact for every finite x (an infinite x becomes NaN).
  The gradient is the identity. The largest of the CPU workarounds: benchmarks/cpu_kernels.py measures it.
  """
  return _divided_by_one(x)


def _divided_by_one(x):
  return x / (1 + 0 * x)


materialise.defvjp(lambda x: (_divided_by_one(x), None), lambda _, g: (g,))


def check_input_shape(shape: Sequence[int]) -> None:
  """Raises InputError unless `shape` is NHWC with 3 channels and H, W >= MIN_IMAGE_SIZE."""
  check_nhwc(shape, "InceptionResNetV2", MIN_IMAGE_SIZE)


class InceptionResNetV2(nn.Module):
  """keras.applications.InceptionResNetV2 in Flax.

  Attributes:
    num_classes: size of the top Dense layer (logits, no softmax); None returns the 1536-d
      globally average-pooled features.
    dtype: compute dtype; parameters and batch statistics stay float32.
    remat: recompute each residual block in the backward pass (nn.remat) to save memory.
    bn_axis_name: pmap axis name across which BatchNorm averages batch statistics in training.
    kernels: the XLA:CPU workarounds (models/kernels.py): "cpu" (all on), "xla" (all off: the plain ops,
      cuDNN's on a GPU), "auto" ("cpu" on the CPU backend, else "xla"), or a `Kernels`. The same
      variables and, up to float rounding, the same values either way.
  """
  num_classes: Optional[int] = 1000
  dtype: jnp.dtype = jnp.float32
  remat: bool = False
  bn_axis_name: Optional[str] = None
  kernels: Union[str, Kernels] = "auto"

  @nn.compact
  def __call__(self, x, train: bool):
    """Maps NHWC images scaled to [-1, 1] to logits [B, num_classes] or features [B, 1536]."""
    check_input_shape(x.shape)
    kernels = resolve(self.kernels)
    x = jnp.asarray(x, activation_dtype(self.dtype, kernels))  # float32 with bf16_dots: see activation_dtype.
    common = dict(dtype=self.dtype, bn_axis_name=self.bn_axis_name, kernels=kernels)
    for name, conv in STEM:
      x = ConvBN(conv, name=name, **common)(x, train)
      if name in ("conv_2b", "conv_4a"):
        x = max_pool(x, (3, 3), (2, 2), kernels)
    residual = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
    for name, spec, scale, relu in BODY:
      block = Block if scale is None else residual
      x = block(spec, scale=scale, relu=relu, name=name, **common)(x, train)
    name, conv = TOP_CONV
    x = ConvBN(conv, name=name, **common)(x, train)
    x = feature_map_hooks(self, x)
    x = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    if self.num_classes is None:
      return x
    return nn.Dense(self.num_classes, kernel_init=KERNEL_INIT, dtype=jnp.float32,
                    param_dtype=jnp.float32, name="predictions")(x)
