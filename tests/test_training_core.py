"""The shared training core: loss, exact AUC, pmapped step == single-device step, padding, checkpoints,
the fit loop (early stopping, resume, NaN stop, TensorBoard) and the frozen-backbone step."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn import metrics as sk_metrics

from melanoma_jax.evaluation import metrics
from melanoma_jax.training import checkpoint, loop, losses, predict, reporting, state as state_lib, steps
from melanoma_jax.utils.errors import InputError, NonFiniteLossError


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


def test_weighted_bce_terms_follow_the_hard_label():
  logits = jnp.array([0.3, -1.0, 2.0])
  labels = jnp.array([1.0, 0.0, 1.0])
  terms = losses.weighted_bce_terms(logits, labels, (1.0, 3.0))
  expected = [3 * np.log1p(np.exp(-0.3)), np.log1p(np.exp(-1.0)), 3 * np.log1p(np.exp(-2.0))]
  np.testing.assert_allclose(terms, expected, rtol=1e-6)
  smoothed = losses.weighted_bce_terms(logits, labels, (1.0, 3.0), label_smoothing=0.2)
  np.testing.assert_allclose(smoothed[1], 0.9 * np.log1p(np.exp(-1.0)) + 0.1 * np.log1p(np.exp(1.0)), rtol=1e-6)


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
  p_logits = steps.p_predict(steps.make_predict_step(model, logits=True))
  got = predict.collect(p_logits, st, predict.array_batches(x, global_batch=8))["outputs"]
  want = model.apply(state_lib.model_variables(st), x, train=False)
  assert got.shape == (21,)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  p_probs = steps.p_predict(steps.make_predict_step(model))
  probs = predict.collect(p_probs, st, predict.array_batches(x, global_batch=8))["outputs"]
  np.testing.assert_allclose(probs, jax.nn.sigmoid(want), rtol=1e-5, atol=1e-6)


def test_non_finite_predictions_are_named():
  model = TinyNet()
  st = _state(model)
  st = st.replace(params=jax.tree.map(lambda p: p * np.nan, st.params))
  p_logits = steps.p_predict(steps.make_predict_step(model, logits=True))
  with pytest.raises(NonFiniteLossError, match="the probe rows: 21 of 21 outputs are NaN or inf"):
    predict.collect(p_logits, st, predict.array_batches(_batch(21)["x"], global_batch=8), "the probe rows")


def test_checkpoint_keeps_latest_and_best(tmp_path):
  model = TinyNet()
  st = _state(model)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", monitor="val_auc", max_to_keep=2)
  assert ckpt.restore_latest(st) is None and ckpt.restore_best(st) is None
  for step, auc in ((1, 0.5), (2, 0.7), (3, 0.6), (4, 0.7), (5, 0.55)):
    st = st.replace(step=step, params=jax.tree.map(lambda p, s=step: p + s, st.params))
    ckpt.save(step, st, {"epoch": step}, metric=auc)
  latest, meta = ckpt.restore_latest(_state(model))
  best, best_meta = ckpt.restore_best(_state(model))
  # The newest two and the best; a later tie (step 4) does not replace the best.
  assert meta["epoch"] == 5 and int(latest.step) == 5 and best_meta["epoch"] == 2 and int(best.step) == 2
  assert ckpt.read_meta(4) == {"epoch": 4}
  for a, b in zip(jax.tree.leaves(latest.params), jax.tree.leaves(st.params)):
    np.testing.assert_array_equal(a, b)
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [2, 4, 5]
  ckpt.close()


def test_a_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
  """A checkpoint saved without the run in its meta (older runs) and restored into another tree: one
  InputError naming the step folder, for the whole state and for the variables alone."""
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", monitor="val_auc", max_to_keep=1)
  ckpt.save(1, {"params": {"dense": {"kernel": np.ones((3, 2), np.float32)}}}, {"epoch": 1}, metric=0.5)
  other = {"params": {"dense": {"kernel": np.ones((5, 2), np.float32)}}}
  renamed = {"params": {"conv": {"kernel": np.ones((3, 2), np.float32)}}}
  for restore, tree in ((ckpt.restore, other), (ckpt.restore_part, other), (ckpt.restore, renamed)):
    with pytest.raises(InputError) as e:
      restore(1, tree)
    message = str(e.value)
    assert message.startswith(f"{tmp_path / 'ckpt' / '1'}: does not hold the variables of the model") and (
        "\n" not in message), message
  ckpt.close()


# ------------------------------------------------------------------------------------------- the fit loop
def _fit(tmp_path, aucs, plan, state=None, step=None):
  """Runs loop.fit on TinyNet with a scripted validation AUC per epoch; returns (fitted, checkpointer)."""
  model = TinyNet(axis_name=steps.AXIS)
  state = state or _state(model)
  p_step = step or steps.p_train(steps.make_train_step(model, (1.0, 1.0)))
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", monitor="val_auc", max_to_keep=1)
  summaries = reporting.Summaries(str(tmp_path / "tb"))
  epochs = iter(range(100))
  try:
    fitted = loop.fit(state, plan, ckpt, summaries, train_step=lambda epoch: p_step,
                      batches=lambda epoch: ((steps.shard_batch(_batch(16, seed=epoch * 10 + i)), None)
                                             for i in range(plan.steps_per_epoch)),
                      evaluate=lambda s: {"val_auc": aucs[next(epochs)]})
  finally:
    summaries.close()
  return fitted, ckpt


def test_fit_stops_early_keeps_the_best_and_logs_to_tensorboard(tmp_path):
  plan = loop.Plan(num_epochs=10, steps_per_epoch=2, global_batch=16, patience=2, first_candidate_epoch=2)
  # Epoch 1 (0.9) is before the first candidate; epoch 3 is the best; epochs 4 and 5 spend the patience.
  fitted, ckpt = _fit(tmp_path, [0.9, 0.6, 0.8, 0.7, 0.8, 0.99], plan)
  meta = fitted.meta
  assert meta["epoch"] == 5 and meta["stopped_early"] and meta["best_epoch"] == 3 and meta["best"] == 0.8
  assert [h["train_rows"] for h in meta["history"]] == [32] * 5
  assert int(fitted.state.step) == 10
  _, best_meta = ckpt.restore_best(_state(TinyNet()))
  assert best_meta["epoch"] == 3
  ckpt.close()
  assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_fit_resumes_and_does_not_train_a_finished_model_again(tmp_path):
  plan = loop.Plan(num_epochs=2, steps_per_epoch=1, global_batch=16)
  first, ckpt = _fit(tmp_path, [0.6, 0.7], plan)
  ckpt.close()
  again, ckpt = _fit(tmp_path, [], plan)  # No evaluation may run: the scripted AUCs are empty.
  ckpt.close()
  assert again.meta["history"] == first.meta["history"] and int(again.state.step) == 2
  longer, ckpt = _fit(tmp_path, [0.65], loop.Plan(num_epochs=3, steps_per_epoch=1, global_batch=16))
  ckpt.close()
  assert [h["epoch"] for h in longer.meta["history"]] == [1, 2, 3] and int(longer.state.step) == 3


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # The 1e39 weights, on purpose.
def test_fit_stops_on_a_non_finite_loss_and_keeps_the_last_good_checkpoint(tmp_path):
  plan = loop.Plan(num_epochs=1, steps_per_epoch=1, global_batch=16)
  _, ckpt = _fit(tmp_path, [0.6], plan)
  ckpt.close()
  model = TinyNet(axis_name=steps.AXIS)
  overflow = steps.p_train(steps.make_train_step(model, (1e39, 1e39)))  # inf weights: an inf/NaN loss.
  with pytest.raises(NonFiniteLossError, match=r"epoch 2: loss became (nan|inf) at step 2; stopped. The last "
                     r"good checkpoint \(step 1\)"):
    _fit(tmp_path, [0.6], loop.Plan(num_epochs=2, steps_per_epoch=1, global_batch=16, label="fold 0"),
         step=overflow)
  assert sorted(int(p.name) for p in (tmp_path / "ckpt").iterdir() if p.name.isdigit()) == [1]


class _Features(nn.Module):
  @nn.compact
  def __call__(self, x, train):
    h = nn.Dense(8)(x)
    return nn.relu(nn.BatchNorm(use_running_average=not train, axis_name=steps.AXIS if train else None)(h))


class FrozenNet(nn.Module):
  """A 'backbone' (Dense + BatchNorm) and a 'head', with the classifiers' `train_backbone` switch."""

  @nn.compact
  def __call__(self, x, train, train_backbone=True):
    h = _Features(name="backbone")(x, train and train_backbone)
    if not train_backbone:
      h = jax.lax.stop_gradient(h)
    return nn.Dense(1, name="head")(h)[..., 0]


def test_frozen_backbone_step_trains_only_the_head_and_skips_the_backbone_backward():
  model = FrozenNet()
  st = _state(model)
  batch = steps.shard_batch(_batch(16))
  frozen = steps.make_train_step(model, (1.0, 2.0), frozen_backbone=True)
  new, _ = steps.p_train(frozen, donate=False)(st, batch)
  for a, b in zip(jax.tree.leaves((st.params["backbone"], st.batch_stats)),
                  jax.tree.leaves((new.params["backbone"], new.batch_stats))):
    np.testing.assert_array_equal(a, b)  # Backbone parameters and BatchNorm statistics untouched.
  assert not np.allclose(st.params["head"]["kernel"], new.params["head"]["kernel"])
  full = steps.make_train_step(model, (1.0, 2.0))
  trained, _ = steps.p_train(full, donate=False)(st, batch)
  assert not np.allclose(st.params["backbone"]["Dense_0"]["kernel"], trained.params["backbone"]["Dense_0"]["kernel"])
  # No backward pass through the backbone: the frozen step has fewer matrix products than the full one.
  count = lambda step: str(jax.make_jaxpr(jax.pmap(step, axis_name=steps.AXIS, in_axes=(None, 0)))(
      st, batch)).count("dot_general")
  assert count(frozen) < count(full)
