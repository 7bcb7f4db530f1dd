"""Class-weighted cross-entropy, as the seed's Keras `class_weight`, with optional label smoothing: binary
(one malignant logit) or softmax (a diagnosis target's classes)."""
import jax
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



def weighted_softmax_terms(logits, labels, weights, label_smoothing=0.0):
  """Per-example weighted softmax cross-entropy in float32 of logits [B, K] and class indices `labels` [B];
  the weight is that of the example's class (`weights` [K]); smoothing spreads `label_smoothing` evenly."""
  logits = logits.astype(jnp.float32)
  num_classes = logits.shape[-1]
  one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  smoothed = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
  example_weight = jnp.asarray(weights, jnp.float32)[labels.astype(jnp.int32)]
  return example_weight * optax.softmax_cross_entropy(logits, smoothed)


def stream_class_weights(shares):
  """Per-class weights 1 / (K n_c) of class shares `shares` of the training stream (K: the classes
  present), so each present class carries 1 / K of the total weight; an absent class gets 1 (never used)."""
  shares = np.asarray(shares, np.float64)
  present = shares > 0
  weights = np.ones_like(shares)
  weights[present] = 1.0 / (present.sum() * shares[present])
  return tuple(float(w) for w in weights)
