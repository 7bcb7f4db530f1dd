"""Parts of the SIIM-ISIC winners' recipe: the warm-up + cosine learning-rate schedule and 8-view TTA (the
flips and transposes of the square), with the config checks that guard them."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from melanoma_jax.image import setup, trained
from melanoma_jax.training import predict, state as state_lib, steps
from melanoma_jax.utils.errors import InputError


class PixelNet(nn.Module):
  """A logit that depends on where each pixel is (so every flip and transpose scores differently)."""

  @nn.compact
  def __call__(self, x, train):
    del train
    return nn.Dense(1)(x.reshape(x.shape[0], -1))[..., 0]


def _hand_views(image):
  """The 8 symmetries of a square image [H, W, C], by numpy rotations (another route than tta_views')."""
  views = []
  for mirrored in (image, image[:, ::-1]):
    views += [np.rot90(mirrored, k, axes=(0, 1)) for k in range(4)]
  return views


def test_eight_view_tta_is_the_mean_over_the_eight_symmetries_computed_by_hand():
  model = PixelNet()
  x = np.random.default_rng(0).normal(size=(11, 6, 6, 3)).astype(np.float32)
  state = state_lib.create_train_state(model, optax.sgd(0.1), jax.random.PRNGKey(1), x[:2])
  variables = state_lib.model_variables(state)
  p_tta = steps.p_predict(steps.make_predict_step(model, tta=8))
  got = predict.collect(p_tta, state, predict.array_batches(x, global_batch=8))["outputs"]
  want = [np.mean([jax.nn.sigmoid(model.apply(variables, v[None], train=False))[0] for v in _hand_views(img)])
          for img in x]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # The 8 views are distinct for a generic image, and 1, 2, 3 views are the first of the flips.
  views = steps.tta_views(jnp.asarray(x[:1]), 8)
  assert len({np.asarray(v).tobytes() for v in views}) == 8
  assert [len(steps.tta_views(x, n)) for n in (1, 2, 3, True, False)] == [1, 2, 3, 3, 1]
  with pytest.raises(ValueError, match="needs it square"):
    steps.tta_views(x[:, :, :5], 8)


def _optimizer(schedule, warmup=1.0, num_epochs=4):
  return setup.Optimizer(name="adam", schedule=schedule, num_epochs=num_epochs, lr_start=1e-5, lr_max=1e-3,
                         lr_min=1e-6, warmup_epochs=warmup, decay=0.5, weight_decay=0.0, grad_clip_norm=0.0)


def test_warmup_cosine_schedule_values_at_known_steps():
  schedule = setup.learning_rate_schedule(_optimizer("warmup_cosine"), steps_per_epoch=10)
  at = lambda step: float(schedule(step))
  close = lambda value: pytest.approx(value, rel=1e-5)  # The schedule computes in float32.
  assert at(0) == close(1e-5)
  assert at(5) == close(1e-5 + (1e-3 - 1e-5) / 2)  # Half-way up the linear ramp.
  assert at(10) == close(1e-3)  # The peak ends the warm-up epoch.
  assert at(25) == close(1e-3 / 2)  # Half-way through the 30 cosine steps.
  assert at(40) == pytest.approx(0.0, abs=1e-12)  # Zero at the end of the run.
  seed = setup.learning_rate_schedule(_optimizer("seed"), steps_per_epoch=10)
  # The seed's: the same ramp, then the peak halved per epoch (decay 0.5) towards lr_min.
  assert float(seed(10)) == close(1e-3) and float(seed(25)) == close(1e-6 + (1e-3 - 1e-6) / 2)


@pytest.mark.parametrize("override, message", [
    ({"tta": 5}, "config.tta=5 must be True, False or a number of views in 1, 2, 3, 8"),
    ({"optimizer.schedule": "linear"}, "config.optimizer.schedule='linear' must be one of seed, warmup_cosine"),
    ({"optimizer.schedule": "warmup_cosine", "optimizer.warmup_epochs": 3},
     "config.optimizer.warmup_epochs=3 must be in [0, config.num_epochs=3) for the warmup_cosine schedule"),
])
def test_bad_recipe_configs_are_refused(override, message):
  config = demo.get_config()
  for key, value in override.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  with pytest.raises(InputError) as error:
    setup.resolve(config, num_devices=8, processes=(0, 1))
  assert str(error.value) == message


def test_scores_saved_before_views_were_counted_still_match(tmp_path):
  """A scores.npz written with tta as a bool (runs before views were counted) reads as 3 or 1 views."""
  names = np.asarray(["a"])
  arrays = {"checkpoint_step": np.int64(7), "tta": np.bool_(True)}
  for split in ("val", "test"):
    arrays.update({f"{split}_names": names, f"{split}_targets": np.zeros(1), f"{split}_probabilities": np.ones(1),
                   f"{split}_embeddings": np.zeros((1, 0), np.float32)})
  np.savez(tmp_path / trained.SCORES, **arrays)
  assert trained.load_scores(str(tmp_path), 7, 3).tta == 3
  assert trained.load_scores(str(tmp_path), 7, True) is not None
  assert trained.load_scores(str(tmp_path), 7, 8) is None


def test_2020_diagnoses_map_onto_the_2019_classes_and_the_target_decides_melanoma():
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from melanoma_jax.data import diagnosis  # pylint: disable=g-import-not-at-top
  table = pd.DataFrame({
      "diagnosis": ["melanoma", "nevus", "seborrheic keratosis", "lichenoid keratosis", "solar lentigo",
                    "lentigo NOS", "cafe-au-lait macule", "atypical melanocytic proliferation", "unknown", None,
                    "unknown", "melanoma"],
      "target": [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]})
  got = [diagnosis.CLASSES[i] for i in diagnosis.labels_2020(table)]
  assert got == ["MEL", "NV", "BKL", "BKL", "BKL", "BKL", "UNK", "UNK", "UNK", "UNK", "MEL", "UNK"]
  with pytest.raises(InputError, match="x.csv: config.target=diagnosis needs a 'diagnosis' column"):
    diagnosis.labels_2020(table.drop(columns="diagnosis"), "x.csv")


def test_softmax_loss_weights_and_the_melanoma_log_odds():
  from melanoma_jax import models  # pylint: disable=g-import-not-at-top
  from melanoma_jax.training import losses  # pylint: disable=g-import-not-at-top
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 4)), jnp.float32)
  labels = jnp.asarray([0, 1, 2, 3, 0])
  weights = (2.0, 1.0, 0.5, 3.0)
  want = [-weights[c] * float(jax.nn.log_softmax(logits[i])[c]) for i, c in enumerate(labels.tolist())]
  np.testing.assert_allclose(losses.weighted_softmax_terms(logits, labels, weights), want, rtol=1e-5)
  p = jax.nn.softmax(logits)[:, 0]
  np.testing.assert_allclose(models.melanoma_probability(logits), p, rtol=1e-6)
  np.testing.assert_allclose(models.melanoma_logit(logits), np.log(p / (1 - p)), rtol=1e-4)
  one = logits[:, 0]
  np.testing.assert_allclose(models.melanoma_probability(one), jax.nn.sigmoid(one), rtol=1e-6)
  # Stream weights: each present class carries 1/K of the weight; an absent class gets 1.
  shares = np.array([0.25, 0.5, 0.0, 0.25])
  w = losses.stream_class_weights(shares)
  assert w[2] == 1.0 and np.allclose(np.array(w)[[0, 1, 3]] * shares[[0, 1, 3]], 1 / 3)


def test_the_winners_config_resolves_to_its_recipe():
  from configs import winners  # pylint: disable=g-import-not-at-top
  run = setup.resolve(winners.get_config(), num_devices=8, processes=(0, 1))
  assert (run.model_name, run.image_size, run.target, run.tta) == ("efficientnet_b3", 512, "diagnosis", 8)
  assert run.model_kwargs["num_classes"] == 9 and run.optimizer.schedule == "warmup_cosine"
