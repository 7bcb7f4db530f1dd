"""The random training augmentation in TensorFlow: one fused projective warp (flips, rotation, shear, zoom,
shift) and colour jitter, each a stateless function of a per-example seed, so an epoch's stream is the same
however often it is rebuilt.
"""
import dataclasses
import functools
import math

from melanoma_jax.utils.tf_host import tf


def _affine_matrix(seed, size, aug, flip_lr=None, flip_ud=None):
  """A random output->input projective transform (flips, rotation, shear, zoom, shift) as the 8 TF parameters.

  `flip_lr` / `flip_ud`: boolean scalars; the flips are folded into the same transform, so they cost
  nothing beyond the one resampling pass.
  """
  tf_ = tf()
  u = tf_.random.stateless_uniform([6], seed=seed, minval=-1.0, maxval=1.0)
  deg = math.pi / 180.0
  rotation = u[0] * aug.rotation_deg * deg
  shear = u[1] * aug.shear_deg * deg
  zoom_x = 1.0 + u[2] * aug.zoom
  zoom_y = 1.0 + u[3] * aug.zoom
  shift_x = u[4] * aug.shift * size
  shift_y = u[5] * aug.shift * size
  c, s = tf_.cos(rotation), tf_.sin(rotation)
  one, zero = tf_.ones([]), tf_.zeros([])
  sign = lambda flip: one if flip is None else tf_.where(flip, -one, one)
  # Forward map (input -> output) about the image centre: flip, zoom, shear, rotate; its inverse samples
  # the input.
  flips = tf_.reshape(tf_.stack([sign(flip_lr), zero, zero, zero, sign(flip_ud), zero, zero, zero, one]),
                      [3, 3])
  rot = tf_.reshape(tf_.stack([c, -s, zero, s, c, zero, zero, zero, one]), [3, 3])
  shr = tf_.reshape(tf_.stack([one, tf_.tan(shear), zero, zero, one, zero, zero, zero, one]), [3, 3])
  zm = tf_.reshape(tf_.stack([zoom_x, zero, zero, zero, zoom_y, zero, zero, zero, one]), [3, 3])
  half = (size - 1) / 2.0
  to_centre = tf_.reshape(tf_.stack([one, zero, -half, zero, one, -half, zero, zero, one]), [3, 3])
  back = tf_.reshape(tf_.stack([one, zero, half + shift_x, zero, one, half + shift_y, zero, zero, one]),
                     [3, 3])
  forward = back @ rot @ shr @ zm @ flips @ to_centre
  inverse = tf_.linalg.inv(forward)
  inverse = inverse / inverse[2, 2]
  return tf_.reshape(inverse, [9])[:8]


def _colour_params(seeds, aug):
  """Random brightness shift b (in [0, 255] units), contrast factor c and saturation factor s."""
  tf_ = tf()
  b = (tf_.random.stateless_uniform([], seeds[3], -aug.brightness, aug.brightness) * 255.0
       if aug.brightness else tf_.zeros([]))
  c = (tf_.random.stateless_uniform([], seeds[4], 1.0 - aug.contrast, 1.0 + aug.contrast)
       if aug.contrast else tf_.ones([]))
  s = (tf_.random.stateless_uniform([], seeds[5], 1.0 - aug.saturation, 1.0 + aug.saturation)
       if aug.saturation else tf_.ones([]))
  return tf_.stack([b, c, s])


def _colour_map(image, params, contrast: bool, saturation: bool):
  """Brightness, contrast and saturation jitter as one per-pixel affine colour map, applied in one pass.

  Equal to applying them one after another: brightness adds b; contrast scales about the (shifted)
  per-channel mean by c; saturation scales about the per-pixel grey (channel mean) by s. Composed:
  out = c * s * x + c * (1 - s) * grey(x) + d, with d from the per-channel mean, b, c and s.
  """
  tf_ = tf()
  b, c, s = params[0], params[1], params[2]
  mean = tf_.reduce_mean(image, axis=[0, 1]) if contrast else tf_.zeros([3])
  e = mean * (1.0 - c) + b  # After brightness and contrast: c * x + e.
  d = s * e + (1.0 - s) * tf_.reduce_mean(e)
  out = (c * s) * image + d
  if saturation:
    out = out + (c * (1.0 - s)) * tf_.reduce_mean(image, axis=-1, keepdims=True)
  return out


def _reflect(coord, length):
  """Maps sample coordinates into [0, length - 1] by mirroring about the outer pixel edges
  (... c b a | a b c ... | ... c b a), ImageProjectiveTransformV3's 'REFLECT'."""
  tf_ = tf()
  period = 2.0 * length
  m = tf_.math.floormod(coord + 0.5, period)
  m = tf_.where(m < length, m, period - m) - 0.5
  return tf_.clip_by_value(m, 0.0, length - 1.0)


def projective_warp(image, transform):
  """Bilinear resampling of [H, W, C] `image` at the input points of TF's 8-parameter output->input
  `transform`, reflect fill: ImageProjectiveTransformV3(..., 'BILINEAR', 'REFLECT') as gathers that XLA
  compiles into one pass (4 to 7 times faster on the CPU than that kernel)."""
  tf_ = tf()
  shape = tf_.shape(image)
  h, w, channels = shape[0], shape[1], shape[2]
  t = transform
  ys, xs = tf_.meshgrid(tf_.range(h, dtype=tf_.float32), tf_.range(w, dtype=tf_.float32), indexing="ij")
  k = t[6] * xs + t[7] * ys + 1.0
  x = _reflect((t[0] * xs + t[1] * ys + t[2]) / k, tf_.cast(w, tf_.float32))
  y = _reflect((t[3] * xs + t[4] * ys + t[5]) / k, tf_.cast(h, tf_.float32))
  x0, y0 = tf_.floor(x), tf_.floor(y)
  wx, wy = (x - x0)[..., None], (y - y0)[..., None]
  x0, y0 = tf_.cast(x0, tf_.int32), tf_.cast(y0, tf_.int32)
  x1, y1 = tf_.minimum(x0 + 1, w - 1), tf_.minimum(y0 + 1, h - 1)
  flat = tf_.reshape(image, tf_.stack([h * w, channels]))
  at = lambda yy, xx: tf_.gather(flat, yy * w + xx)
  top = at(y0, x0) * (1.0 - wx) + at(y0, x1) * wx
  bottom = at(y1, x0) * (1.0 - wx) + at(y1, x1) * wx
  return top * (1.0 - wy) + bottom * wy


@functools.lru_cache(maxsize=None)  # One traced function per static choice, shared by every pipeline.
def _compiled_augment(geometric: bool, contrast: bool, saturation: bool, colour: bool):
  """One XLA-compiled function doing warp, colour map and clip in a single program."""
  tf_ = tf()

  def fused(image, transform, colour_params):
    image = tf_.cast(image, tf_.float32)
    if geometric:
      image = projective_warp(image, transform)
    if colour:
      image = _colour_map(image, colour_params, contrast, saturation)
    return tf_.clip_by_value(image, 0.0, 255.0)

  return tf_.function(fused, jit_compile=True, reduce_retracing=False)


def augment(image, seed, aug):
  """One fused random affine with flips (reflect fill, bilinear), then one fused colour jitter; [0, 255].

  The random parameters are drawn with TF's stateless ops; the pixel work is one XLA-compiled program
  (`projective_warp` + `_colour_map` + clip), because TF's own resampling kernel was the pipeline's
  bottleneck on a CPU (benchmarks/input_pipeline.py measures it; docs/performance.md has the figures).
  """
  tf_ = tf()
  size = tf_.shape(image)[0]
  seeds = tf_.random.experimental.stateless_split(seed, 6)
  geometric = bool(aug.rotation_deg or aug.shear_deg or aug.zoom or aug.shift or aug.flip)
  colour = bool(aug.brightness or aug.contrast or aug.saturation)
  transform = tf_.zeros([8])
  if geometric:
    flip_lr = flip_ud = None
    if aug.flip:
      flip_lr = tf_.random.stateless_uniform([], seeds[1]) < 0.5
      flip_ud = tf_.random.stateless_uniform([], seeds[2]) < 0.5
    transform = _affine_matrix(seeds[0], tf_.cast(size, tf_.float32), aug, flip_lr, flip_ud)
  params = _colour_params(seeds, aug) if colour else tf_.zeros([3])
  fused = _compiled_augment(geometric, bool(aug.contrast), bool(aug.saturation), colour)
  return fused(image, transform, params)


@dataclasses.dataclass(frozen=True)
class Augment:
  """Ranges of the random training augmentation (0 or False turns a part off)."""
  rotation_deg: float = 180.0
  shear_deg: float = 10.0
  zoom: float = 0.1
  shift: float = 0.1
  flip: bool = True
  brightness: float = 0.1
  contrast: float = 0.1
  saturation: float = 0.1
