"""The shared training core: loss, exact AUC, pmapped step == single-device step, padding, checkpoints."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as sk_metrics

from melanoma_jax.training import checkpoint, losses, metrics, state as state_lib, steps


class TinyNet(nn.Module):
  """A dense layer, BatchNorm shared across the pmap axis, dropout, one logit."""
  axis_name: str = None

  @nn.compact
  def __call__(self, x, train):
    x = nn.Dense(8)(x)
    x = nn.BatchNorm(use_running_average=not train, axis_name=self.axis_name if train else None,
                     momentum=0.9)(x)
    x = nn.relu(x)
    x = nn.Dropout(0.0, deterministic=not train)(x)
    return nn.Dense(1)(x)[..., 0]


def _state(model, seed=0):
  tx = optax.sgd(0.1)
  return state_lib.create_train_state(model, tx, jax.random.PRNGKey(seed), np.zeros((2, 5), np.float32))


def _batch(n, seed=0):
  rng = np.random.default_rng(seed)
  return {"x": rng.normal(size=(n, 5)).astype(np.float32),
          "y": (rng.random(n) < 0.3).astype(np.float32), "mask": np.ones(n, np.float32)}


def test_class_weights_match_seed_formula():
  w_neg, w_pos = losses.class_weights(np.array([0] * 90 + [1] * 10))
  assert w_neg == pytest.approx(100 / 180) and w_pos == pytest.approx(100 / 20)
  with pytest.raises(ValueError):
    losses.class_weights(np.zeros(5))


def test_weighted_bce_ignores_masked_rows():
  logits = jnp.array([0.3, -1.0, 2.0])
  labels = jnp.array([1.0, 0.0, 1.0])
  full = losses.weighted_bce(logits[:2], labels[:2], (1.0, 3.0))
  masked = losses.weighted_bce(logits, labels, (1.0, 3.0), mask=jnp.array([1.0, 1.0, 0.0]))
  assert float(full) == pytest.approx(float(masked))
  expected = (3 * np.log1p(np.exp(-0.3)) + np.log1p(np.exp(-1.0))) / 2
  assert float(full) == pytest.approx(expected, rel=1e-6)


def test_roc_auc_equals_sklearn_with_ties():
  rng = np.random.default_rng(0)
  y = rng.random(500) < 0.1
  s = np.round(rng.random(500) + y * 0.3, 1)  # many ties
  assert metrics.roc_auc(y, s) == pytest.approx(sk_metrics.roc_auc_score(y, s), abs=1e-12)
  with pytest.raises(ValueError):
    metrics.roc_auc(np.zeros(4), np.arange(4))


def test_pmapped_step_equals_single_device_step():
  assert jax.local_device_count() == 8
  batch = _batch(16)
  batch["mask"][-3:] = 0.0  # padded tail must not count on either path
  weights = (0.7, 1.8)
  p_step = steps.p_train(steps.make_train_step(TinyNet(axis_name=steps.AXIS), weights), donate=False)
  p_state, p_metrics = p_step(_state(TinyNet(axis_name=steps.AXIS)), steps.shard_batch(batch))
  # The same update computed on one device with the whole global batch.
  single = jax.pmap(steps.make_train_step(TinyNet(axis_name=steps.AXIS), weights), axis_name=steps.AXIS,
                    in_axes=(None, 0), out_axes=(None, None), devices=jax.local_devices()[:1])
  s_state, s_metrics = single(_state(TinyNet(axis_name=steps.AXIS)), steps.shard_batch(batch, 1))
  assert float(p_metrics["count"]) == 13.0
  np.testing.assert_allclose(p_metrics["loss"], s_metrics["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves((p_state.params, p_state.batch_stats)),
                  jax.tree.leaves((s_state.params, s_state.batch_stats))):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)


def test_predict_sees_every_row_once():
  model = TinyNet()
  st = _state(model)
  x = _batch(21)["x"]  # not a multiple of the global batch of 8
  p_eval = steps.p_eval(steps.make_eval_step(model))
  got = steps.predict(p_eval, st, x, global_batch=8)
  want = model.apply(state_lib.model_variables(st), x, train=False)
  assert got.shape == (21,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_checkpoint_keeps_latest_and_best(tmp_path):
  model = TinyNet()
  st = _state(model)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=2)
  assert ckpt.restore_latest(st) is None
  for step in (1, 2, 3):
    st = st.replace(step=step, params=jax.tree.map(lambda p, s=step: p + s, st.params))
    ckpt.save(step, st, {"epoch": step, "val_auc": 0.5 + 0.1 * (step == 2)}, is_best=step == 2)
  latest, meta = ckpt.restore_latest(_state(model))
  best, best_meta = ckpt.restore_best(_state(model))
  assert meta["epoch"] == 3 and int(latest.step) == 3 and best_meta["epoch"] == 2
  for a, b in zip(jax.tree.leaves(latest.params), jax.tree.leaves(st.params)):
    np.testing.assert_array_equal(a, b)
  assert sorted(p.name for p in (tmp_path / "ckpt" / "latest").iterdir() if p.name.isdigit()) == ["2", "3"]
  ckpt.close()
