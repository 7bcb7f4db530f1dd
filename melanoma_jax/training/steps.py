"""Pure train/predict steps, data-parallel with jax.pmap over a named axis.

The train state stays unreplicated (`in_axes=None`, `out_axes=None`): every device computes the gradient of
its shard, the gradients are summed across devices (`lax.psum`) and every device applies the same update.
The loss is normalised by the global number of unmasked examples, so the pmapped step equals one step of
the same model on the whole global batch, padded batches included.
"""
import collections
import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from melanoma_jax import models
from melanoma_jax.training import losses
from melanoma_jax.training.state import model_variables
from melanoma_jax.utils.errors import InputError

AXIS = "batch"


def global_batch_size(requested, per_device, num_devices, num_processes=1):
  """`requested` if set (it must divide over the devices), else `per_device` x `num_devices`.

  `num_devices` counts the devices of all `num_processes` processes (`jax.device_count()`); each process
  feeds global batch / `num_processes` rows per step.
  """
  requested, per_device = int(requested or 0), int(per_device)
  if requested < 0:
    raise InputError(f"config.global_batch_size={requested} must be >= 0 (0: per_device_batch_size x devices)")
  if per_device < 1:
    raise InputError(f"config.per_device_batch_size={per_device} must be >= 1")
  if requested:
    if requested % num_devices:
      where = "local devices" if num_processes == 1 else f"devices of {num_processes} processes"
      raise InputError(f"config.global_batch_size={requested} is not divisible by the {num_devices} {where}")
    return requested
  return per_device * num_devices


def make_train_step(model, class_weights, label_smoothing=0.0, frozen_backbone=False):
  """train_step(state, batch) -> (state, metrics); batch = {'x', 'y', 'mask'}, one device's shard.

  A model with one logit per image trains on the binary `y` with `class_weights` (w_benign, w_malignant);
  one with logits [B, K] (a diagnosis target) on the class indices batch['label'], `class_weights` one per
  class.

  `frozen_backbone`: the model runs with `train_backbone=False` (backbone BatchNorm in inference mode) and
  the 'backbone' parameters are constants of the step: no gradient, so no backward pass through the
  backbone, and kept exactly as they are whatever the optimizer (weight decay included) would do.
  """
  weights = tuple(float(w) for w in class_weights)
  frozen = ("backbone",) if frozen_backbone else ()
  call_args = {"train_backbone": False} if frozen_backbone else {}

  def train_step(state, batch):
    rng, dropout_rng = jax.random.split(state.rng)
    # Different dropout masks on each device, from the one key every device holds.
    dropout_rng = jax.random.fold_in(dropout_rng, lax.axis_index(AXIS))
    mask = batch["mask"].astype(jnp.float32)
    global_count = lax.psum(mask.sum(), AXIS)
    has_stats = bool(state.batch_stats)
    frozen_params = {k: v for k, v in state.params.items() if k in frozen}

    def loss_fn(trainable):
      variables = dict(model_variables(state), params={**trainable, **frozen_params})
      out = model.apply(variables, batch["x"], train=True, rngs={"dropout": dropout_rng},
                        mutable=["batch_stats"] if has_stats else False, **call_args)
      logits, updates = out if has_stats else (out, {})
      if logits.ndim == 2:
        terms = losses.weighted_softmax_terms(logits, batch["label"], weights, label_smoothing)
      else:
        terms = losses.weighted_bce_terms(logits, batch["y"], weights, label_smoothing)
      return (terms * mask).sum() / jnp.maximum(global_count, 1.0), updates

    trainable = {k: v for k, v in state.params.items() if k not in frozen}
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = lax.psum(grads, AXIS)
    grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen_params)}
    new_state = state.apply_gradients(grads=grads, rng=rng)
    if frozen:
      new_state = new_state.replace(params={**new_state.params, **frozen_params})
    if has_stats:
      # Models with a BatchNorm axis name already share statistics; the mean keeps any other model exact too.
      new_state = new_state.replace(batch_stats=lax.pmean(updates["batch_stats"], AXIS))
    return new_state, {"loss": lax.psum(loss, AXIS), "count": global_count}

  return train_step


def tta_views(x, count):
  """The `count` TTA views of NHWC images `x`: 1 the images, 2 with the horizontal flip, 3 with the
  vertical flip too, 8 every flip and transpose of the square (the dihedral group: a lesion photo has no
  up, down or handedness). `count` True/False are 3/1, as runs recorded them before views were counted."""
  count = (3 if count else 1) if isinstance(count, bool) else int(count)
  if count == 1:  # Any array: the tabular model's rows too.
    return [x]
  flips = [x, x[:, :, ::-1], x[:, ::-1], x[:, ::-1, ::-1]]
  if count in (2, 3):
    return flips[:count]
  if count == 8:
    if x.shape[1] != x.shape[2]:
      raise ValueError(f"8-view TTA transposes the image, which needs it square; got {x.shape[1:3]}")
    return flips + [jnp.swapaxes(v, 1, 2) for v in flips]
  raise ValueError(f"tta={count!r}: the number of views must be 1, 2, 3 or 8")


def make_predict_step(model, tta=False, logits=False, embeddings=False):
  """predict_step(state, batch) -> float32 [per_device] of one device's shard, inference mode.

  Probabilities of melanoma (`models.melanoma_probability`: sigmoid of one logit, or the MEL column of a
  diagnosis softmax; the mean over the `tta_views(x, tta)` views), or raw logits (`logits`, one view only).
  `embeddings`: [per_device, 1 + K + F] instead, the probability, then a diagnosis model's K class
  probabilities (none for a one-logit model), then the model's pooled backbone features (its sown
  intermediates/embedding), all averaged over the TTA views.
  """
  if logits and tta not in (False, 1):
    raise ValueError("logits are not averaged over TTA views")

  def apply(variables, x):
    if not embeddings:
      return model.apply(variables, x, train=False).astype(jnp.float32), None
    out, inter = model.apply(variables, x, train=False, mutable=["intermediates"])
    return out.astype(jnp.float32), inter["intermediates"]["embedding"][0].astype(jnp.float32)

  def predict_step(state, batch):
    x = batch["x"]
    variables = model_variables(state)
    outs = [apply(variables, v) for v in tta_views(x, tta)]
    mean = lambda values: sum(values) / len(outs)
    if logits:
      return outs[0][0]
    first = mean([models.melanoma_probability(o) for o, _ in outs])
    if not embeddings:
      return first
    classes = [mean([jax.nn.softmax(o, axis=-1) for o, _ in outs])] if outs[0][0].ndim == 2 else []
    return jnp.concatenate([first[:, None], *classes, mean([e for _, e in outs])], axis=1)

  return predict_step


def p_train(train_step, donate=True, devices=None):
  """pmaps a train step: state unreplicated in and out, batch split over local devices.

  `devices` None: the step spans every device of every process (each feeds its local shard); a list of
  this process's devices (`jax.local_devices()`) keeps it inside the process, for a model every process
  trains alike on the same rows (the tabular folds).
  """
  return jax.pmap(train_step, axis_name=AXIS, in_axes=(None, 0), out_axes=(None, None),
                  donate_argnums=(0,) if donate else (), devices=devices)


def p_predict(predict_step, devices=None):
  """pmaps a predict step: outputs [local devices, per_device, ...]; `devices` as for `p_train`."""
  return jax.pmap(predict_step, axis_name=AXIS, in_axes=(None, 0), out_axes=0, devices=devices)


def _local_mesh():
  return jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))


def replicate(state):
  """Places a state on every local device as the pmapped step returns it (replicated on its mesh).

  A state from init or a checkpoint lives on one device; feeding it as is would compile the step once for
  that placement and again for the replicated state the step returns.
  """
  return jax.device_put(state, jax.NamedSharding(_local_mesh(), jax.P()))


def shard_batch(batch, num_devices=None):
  """Reshapes every array's leading global-batch dim to [devices, per_device]."""
  num_devices = num_devices or jax.local_device_count()

  def _shard(x):
    x = np.asarray(x)
    if x.shape[0] % num_devices:
      raise ValueError(f"global batch {x.shape[0]} is not divisible by {num_devices} devices")
    return x.reshape((num_devices, x.shape[0] // num_devices) + x.shape[1:])

  return jax.tree.map(_shard, batch)


def pad_batch(batch, global_batch):
  """Pads every array to `global_batch` rows (zeros) and adds/extends `mask` (0 on padding)."""
  n = len(next(iter(batch.values())))
  if n > global_batch:
    raise ValueError(f"batch of {n} rows exceeds the global batch {global_batch}")
  mask = np.asarray(batch.get("mask", np.ones(n, np.float32)), np.float32)
  padded = {k: np.concatenate([np.asarray(v), np.zeros((global_batch - n,) + np.shape(v)[1:],
                                                        np.asarray(v).dtype)])
            for k, v in batch.items() if k != "mask"}
  padded["mask"] = np.concatenate([mask, np.zeros(global_batch - n, np.float32)])
  return padded


def prefetch_to_device(items, size=2):
  """Yields (batch on the devices, extra) from (sharded numpy batch, extra) items, `size` ahead.

  The host copies the next batches while the devices run the current step.
  """
  sharding = jax.NamedSharding(_local_mesh(), jax.P(AXIS))
  queue = collections.deque()
  items = iter(items)

  def enqueue(n):
    for batch, extra in itertools.islice(items, n):
      queue.append((jax.tree.map(lambda x: jax.device_put(x, sharding), batch), extra))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
