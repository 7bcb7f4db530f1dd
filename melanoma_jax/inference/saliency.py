"""Where the model looks: Grad-CAM of the last convolutional feature map and SmoothGrad over input pixels.

Both run through the Flax model itself (inference mode), with JAX's gradients:
* Grad-CAM (Selvaraju et al. 2017): the model's last feature map A (sown as intermediates/.../feature_map by
  `backbone_io.feature_map_hooks`) and d logit / d A, read as the gradient of the zero perturbation
  the same hook adds (Flax's `perturb`); channel weights are the spatial means of that gradient, the map is
  relu(sum_c w_c A_c), bilinearly upsampled to the image. Its resolution is the feature map's: 1x1 for
  InceptionResNetV2 at 75x75, 8x8 at 299x299, so saliency needs images of about 299 pixels or more.
* SmoothGrad (Smilkov et al. 2017): d logit / d pixels averaged over `samples` copies of the image with
  Gaussian noise of `noise` x the input range (2 for [-1, 1] inputs), shown as |gradient| summed over colour
  channels. It costs `samples` backward passes per image.
Both explain the logit of the malignant class of the unflipped image (no TTA views).
"""
import functools

import flax
import jax
import jax.numpy as jnp
import numpy as np

from melanoma_jax import models
from melanoma_jax.utils import files

FEATURE_MAP = "feature_map"
SMOOTHGRAD_SAMPLES = 25
SMOOTHGRAD_NOISE = 0.15  # Of the input range; Smilkov et al. found 10-20% best.


def _feature_map_path(model, variables, x):
  """The variable path of the sown feature map, e.g. ('backbone', 'feature_map'), and its shape."""
  _, inter = jax.eval_shape(lambda v, x: model.apply(v, x, train=False, mutable=["intermediates"]),
                            variables, x)
  paths = [p for p in flax.traverse_util.flatten_dict(inter["intermediates"]) if p[-1] == FEATURE_MAP]
  if len(paths) != 1:
    raise ValueError(f"the model sows {len(paths)} '{FEATURE_MAP}' intermediates; Grad-CAM needs exactly one")
  return paths[0], flax.traverse_util.flatten_dict(inter["intermediates"])[paths[0]][0].shape


@functools.partial(jax.jit, static_argnums=(0,))
def grad_cam(model, variables, x):
  """[B, S, S] Grad-CAM heat maps in [0, 1] (each image's maximum at 1; all zero where nothing is positive)
  of images `x` [B, S, S, 3]."""
  path, shape = _feature_map_path(model, variables, x)
  zeros = flax.traverse_util.unflatten_dict({path: jnp.zeros(shape, jnp.float32)})

  def logit(perturbations):
    out, inter = model.apply({**variables, "perturbations": perturbations}, x, train=False,
                             mutable=["intermediates"])
    return models.melanoma_logit(out).sum(), flax.traverse_util.flatten_dict(inter["intermediates"])[path][0]

  grads, feature_map = jax.grad(logit, has_aux=True)(zeros)
  weights = flax.traverse_util.flatten_dict(grads)[path].mean(axis=(1, 2))  # [B, C]
  cam = jax.nn.relu(jnp.einsum("bhwc,bc->bhw", feature_map.astype(jnp.float32), weights))
  cam = jax.image.resize(cam, (x.shape[0],) + x.shape[1:3], "bilinear")
  return _unit_max(jnp.maximum(cam, 0.0))


@functools.partial(jax.jit, static_argnums=(0, 3))
def smoothgrad(model, variables, x, samples=SMOOTHGRAD_SAMPLES, noise=SMOOTHGRAD_NOISE, seed=0):
  """[B, S, S] SmoothGrad maps in [0, 1] (clipped at each image's 99th percentile) of images `x` in [-1, 1]."""
  sigma = noise * 2.0  # The [-1, 1] input range.
  grad = jax.grad(lambda v: models.melanoma_logit(model.apply(variables, v, train=False)).sum())

  def add(i, total):
    eps = sigma * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), x.shape, x.dtype)
    return total + grad(x + eps)

  mean = jax.lax.fori_loop(0, samples, add, jnp.zeros_like(x)) / samples
  magnitude = jnp.abs(mean).sum(axis=-1)
  top = jnp.percentile(magnitude.reshape(len(x), -1), 99, axis=1)[:, None, None]
  return jnp.clip(magnitude / jnp.maximum(top, 1e-12), 0.0, 1.0)


def _unit_max(maps):
  top = maps.reshape(len(maps), -1).max(axis=1)[:, None, None]
  return jnp.where(top > 0, maps / jnp.where(top > 0, top, 1.0), 0.0)


def save_figure(path, image, cam, smooth, title):
  """A PNG: the image, the image with the Grad-CAM heat map over it, the SmoothGrad map; `title` above.

  `image`: [S, S, 3] model input in [-1, 1]; `cam`, `smooth`: [S, S] in [0, 1]. Written atomically.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  rgb = np.clip((np.asarray(image) + 1.0) / 2.0, 0.0, 1.0)
  fig, axes = plt.subplots(1, 3, figsize=(9.6, 3.6))
  axes[0].imshow(rgb)
  axes[0].set_title("image")
  axes[1].imshow(rgb)
  axes[1].imshow(np.asarray(cam), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
  axes[1].set_title("Grad-CAM (last conv block)")
  axes[2].imshow(np.asarray(smooth), cmap="magma", vmin=0.0, vmax=1.0)
  axes[2].set_title(f"SmoothGrad ({SMOOTHGRAD_SAMPLES} samples)")
  for ax in axes:
    ax.axis("off")
  fig.suptitle(title.replace("$", r"\$"))  # A file name is text: a "$" must not start matplotlib's math mode.
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=100)
  plt.close(fig)
  return path
