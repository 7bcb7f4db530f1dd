"""Class-weighted binary cross-entropy, as the seed's Keras `class_weight`, with optional label smoothing."""
import jax.numpy as jnp
import numpy as np
import optax


def class_weights(targets):
  """(w_neg, w_pos) with w_c = N / (2 N_c): each class carries half the total weight."""
  targets = np.asarray(targets)
  n, n_pos = len(targets), int(targets.sum())
  n_neg = n - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"class weights need both classes; got {n_neg} negative and {n_pos} positive")
  return n / (2.0 * n_neg), n / (2.0 * n_pos)


def weighted_bce_terms(logits, labels, weights, label_smoothing=0.0):
  """Per-example weighted BCE in float32 (logits may be bfloat16); the weight follows the hard label."""
  logits = logits.astype(jnp.float32)
  labels = labels.astype(jnp.float32)
  smoothed = labels * (1.0 - label_smoothing) + 0.5 * label_smoothing
  w_neg, w_pos = weights
  example_weight = jnp.where(labels > 0.5, w_pos, w_neg)
  return example_weight * optax.sigmoid_binary_cross_entropy(logits, smoothed)

