"""The train state: flax TrainState plus BatchNorm statistics and the dropout key, so a resume is exact."""
from typing import Any

import jax
import jax.numpy as jnp
from flax.training import train_state


class TrainState(train_state.TrainState):
  batch_stats: Any
  rng: jax.Array


def create_train_state(model, tx, rng, sample_x, variables=None):
  """Initialises the model on `sample_x` (unless `variables` are given) and wraps it with `tx`."""
  init_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
  if variables is None:
    variables = jax.jit(lambda r, x: model.init({"params": r, "dropout": dropout_rng}, x, train=False))(
        init_rng, jnp.asarray(sample_x))
  return TrainState.create(apply_fn=model.apply, params=variables["params"],
                           batch_stats=variables.get("batch_stats", {}), tx=tx, rng=state_rng)


def model_variables(state):
  variables = {"params": state.params}
  if state.batch_stats:
    variables["batch_stats"] = state.batch_stats
  return variables
