"""Pure train/eval steps, data-parallel with jax.pmap over a named axis.

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

from melanoma_jax.training import losses
from melanoma_jax.training.state import model_variables

AXIS = "batch"


def global_batch_size(config, num_devices=None):
  """config.global_batch_size if set (it must divide over the devices), else per-device size x devices."""
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  num_devices = num_devices or jax.local_device_count()
  requested = int(config.get("global_batch_size", 0) or 0)
  if requested:
    if requested % num_devices:
      raise InputError(f"config.global_batch_size={requested} is not divisible by the {num_devices} "
                       "local devices")
    return requested
  return int(config.per_device_batch_size) * num_devices


def make_train_step(model, class_weights, label_smoothing=0.0, axis_name=AXIS, frozen=()):
  """train_step(state, batch) -> (state, metrics); batch = {'x', 'y', 'mask'}, one device's shard.

  `frozen`: top-level parameter collections (e.g. ('backbone',)) kept exactly as they are, whatever the
  optimizer (weight decay included) would do to them.
  """
  weights = tuple(float(w) for w in class_weights)

  def train_step(state, batch):
    rng, dropout_rng = jax.random.split(state.rng)
    # Different dropout masks on each device, from the one key every device holds.
    dropout_rng = jax.random.fold_in(dropout_rng, lax.axis_index(axis_name))
    mask = batch["mask"].astype(jnp.float32)
    global_count = lax.psum(mask.sum(), axis_name)
    has_stats = bool(state.batch_stats)

    frozen_params = {k: v for k, v in state.params.items() if k in frozen}

    def loss_fn(trainable):
      # Frozen collections enter as constants: no gradient (and no backward pass) is computed for them.
      params = {**trainable, **frozen_params}
      variables = dict(model_variables(state), params=params)
      out = model.apply(variables, batch["x"], train=True, rngs={"dropout": dropout_rng},
                        mutable=["batch_stats"] if has_stats else False)
      logits, updates = out if has_stats else (out, {})
      terms = losses.weighted_bce_terms(logits, batch["y"], weights, label_smoothing)
      return (terms * mask).sum() / jnp.maximum(global_count, 1.0), updates

    trainable = {k: v for k, v in state.params.items() if k not in frozen}
    (loss, updates), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
    grads = lax.psum(grads, axis_name)
    grads = {**grads, **jax.tree.map(jnp.zeros_like, frozen_params)}
    loss = lax.psum(loss, axis_name)
    new_state = state.apply_gradients(grads=grads, rng=rng)
    if frozen:
      new_state = new_state.replace(params={k: (state.params[k] if k in frozen else v)
                                            for k, v in new_state.params.items()})
    if has_stats:
      # Models with a BatchNorm axis name already share statistics; the mean keeps any other model exact too.
      new_state = new_state.replace(batch_stats=lax.pmean(updates["batch_stats"], axis_name))
    metrics = {"loss": loss, "count": global_count,
               "grad_norm": jnp.sqrt(sum(jnp.vdot(g, g) for g in jax.tree.leaves(grads))).real}
    return new_state, metrics

  return train_step


def make_eval_step(model, axis_name=AXIS):
  """eval_step(state, batch) -> logits of the device's shard (float32), inference mode."""
  del axis_name  # Evaluation needs no communication; kept for a symmetric signature.

  def eval_step(state, batch):
    return model.apply(model_variables(state), batch["x"], train=False).astype(jnp.float32)

  return eval_step


def p_train(train_step, axis_name=AXIS, donate=True):
  """pmaps a train step: state unreplicated in and out, batch split over local devices."""
  return jax.pmap(train_step, axis_name=axis_name, in_axes=(None, 0), out_axes=(None, None),
                  donate_argnums=(0,) if donate else ())


def p_eval(eval_step, axis_name=AXIS):
  return jax.pmap(eval_step, axis_name=axis_name, in_axes=(None, 0), out_axes=0)


def replicate(state, axis_name=AXIS):
  """Places a state on every local device as the pmapped step returns it (replicated on its mesh).

  A state from init or a checkpoint lives on one device; feeding it as is would compile the step once for
  that placement and again for the replicated state the step returns.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (axis_name,))
  return jax.device_put(state, jax.NamedSharding(mesh, jax.P()))


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


def predict(p_eval_step, state, x, global_batch):
  """Logits for every row of `x` exactly once: the last partial batch is padded, padding dropped after."""
  outputs = []
  for start in range(0, len(x), global_batch):
    chunk = x[start:start + global_batch]
    batch = shard_batch(pad_batch({"x": chunk}, global_batch))
    outputs.append(np.asarray(p_eval_step(state, batch)).reshape(-1)[:len(chunk)])
  return np.concatenate(outputs) if outputs else np.zeros((0,), np.float32)



def prefetch_to_device(items, size=2, axis_name=AXIS):
  """Yields (batch on the devices, extra) from (sharded numpy batch, extra) items, `size` ahead.

  The host copies the next batches while the devices run the current step.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (axis_name,))
  sharding = jax.NamedSharding(mesh, jax.P(axis_name))
  queue = collections.deque()
  items = iter(items)

  def enqueue(n):
    for batch, extra in itertools.islice(items, n):
      queue.append((jax.tree.map(lambda x: jax.device_put(x, sharding), batch), extra))

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
