"""Image model training and prediction: tf.data -> pmapped optax steps (the shared fit loop) -> AUC, CSVs.

`train(config, workdir)` trains on one patient-grouped fold, validates every epoch, keeps the latest and the
best checkpoints and resumes from the latest when run again on the same workdir, then predicts with the
best; `predict(config, workdir)` loads the best checkpoint and writes submission.csv, oof.csv and roc.png.

Several processes (`training.distributed`): each trains on its share of every epoch and predicts its share
of the validation and test images; the predictions are gathered into every process, which then compute
the same validation AUC, and process 0 writes the outputs.
"""
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from absl import logging

from melanoma_jax.data import pipeline as pipeline_lib
from melanoma_jax.evaluation import clinical, metrics, roc
from melanoma_jax.image import data as data_lib
from melanoma_jax.image import setup
from melanoma_jax.training import checkpoint as checkpoint_lib
from melanoma_jax.training import distributed, identity
from melanoma_jax.training import loop, predict as predict_lib, reporting, steps
from melanoma_jax.training import state as state_lib
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.results import write_results


def initial_state(run, model, tx, rng):
  """Random init, or (`run.init_weights`) converted Keras weights for the backbone + a new head."""
  if not run.init_weights:
    sample = jnp.zeros((1, run.image_size, run.image_size, 3), jnp.float32)
    return state_lib.create_train_state(model, tx, rng, sample)
  from melanoma_jax.models import init_with_pretrained_backbone  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import keras_weights  # pylint: disable=g-import-not-at-top
  backbone = keras_weights.init_backbone_variables(run.init_weights, include_top=False)
  variables = init_with_pretrained_backbone(model, jax.random.fold_in(rng, 1), backbone)
  logging.info("backbone initialised from %s", run.init_weights)
  return state_lib.create_train_state(model, tx, rng, None, variables=variables)


def _check_identity(config, data, workdir, record=True):
  """Refuses a workdir that holds a run of another config or data (before anything is restored)."""
  digest = identity.data_digest(data.train_df.attrs["path"], data.test_df.attrs["path"])
  identity.check_or_record(workdir, identity.of(config, digest), record=record)


def _checkpointer(run, workdir):
  return checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), monitor="val_auc",
                                     max_to_keep=run.checkpoints_to_keep)


# Names of the image files each process trained on, one line per example, when this names a folder.
READ_LOG_ENV = "MELANOMA_JAX_READ_LOG"


def restore_best(run, model, optimizer_config, workdir):
  """(state, meta) of the best checkpoint of the image run in `workdir`; InputError when there is none.

  The one way a trained image run is loaded: its own prediction, the predict/export commands, the ensemble.
  """
  tx, _ = setup.build_optimizer(optimizer_config, 1)  # Only the optimizer state's structure matters here.
  abstract = jax.eval_shape(lambda: state_lib.create_train_state(
      model, tx, jax.random.PRNGKey(0), jnp.zeros((1, run.image_size, run.image_size, 3))))
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):  # Checked first: the checkpointer would create the folder.
    raise InputError(f"{directory}: no best checkpoint to predict with (train first)")
  checkpointer = _checkpointer(run, workdir)
  try:
    restored = checkpointer.restore_best(abstract)
  finally:
    checkpointer.close()
  if restored is None:
    raise InputError(f"{checkpointer.directory}: no best checkpoint to predict with (train first)")
  return restored


def infer(p_predict, state, pipeline, dataset, record_files, table_names, what):
  """(image_names, targets, probabilities) of every image of `table_names` (the validation rows or
  test.csv) exactly once, in the table's order; with several processes, every process's share gathered
  (the same in every process). Refuses records missing from or extra to the table."""
  out = predict_lib.run(p_predict, state, pipeline.device_batches(dataset, record_files), what)
  position = {n: i for i, n in enumerate(table_names)}
  names = out.get("names", [])
  rows = distributed.gather_rows({  # Names travel as positions in the table every process holds.
      "index": np.array([position.get(n, -1) for n in names], np.int32),
      "outputs": out["outputs"].astype(np.float32).reshape((len(names),) + out["outputs"].shape[1:]),
      "targets": np.asarray(out.get("targets", np.zeros(len(names))), np.float32)})
  source = record_files[0] if record_files else ""
  pipeline_lib.count_check(len(rows["index"]), len(table_names), what, source,
                           skip_corrupt=pipeline.skip_corrupt)
  index = rows["index"]
  if len(set(index.tolist())) != len(index):
    raise InputError(f"{source}: {what} records hold duplicate image names")
  if (index < 0).any():
    raise InputError(f"{source}: {what} records hold {int((index < 0).sum())} image(s) its CSV lacks")
  order = np.argsort(index, kind="stable")
  return ([table_names[i] for i in index[order]], rows["targets"][order].astype(np.float64),
          rows["outputs"][order].astype(np.float64))


def _train_batches(pipeline, epoch, seed, record_files):
  """The epoch's (sharded batch, image names) items; with READ_LOG_ENV set, the names are also written to
  DIR/reads.epoch<E>.process<P>.txt (a check that each process reads its own share)."""
  items = pipeline.device_batches(pipeline.train_dataset(epoch, seed), record_files)
  folder = os.environ.get(READ_LOG_ENV)
  if not folder:
    return items

  def logged():
    names = []
    for batch, batch_names in items:
      names.extend(n for n, m in zip(batch_names, batch["mask"].reshape(-1)) if m > 0)
      yield batch, batch_names
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"reads.epoch{epoch}.process{distributed.process_index()}.txt"), "w") as f:
      f.write("".join(n + "\n" for n in names))

  return logged()


def validation_metrics(targets, probs, class_weights):
  p = np.clip(probs, 1e-7, 1 - 1e-7)
  w = np.where(targets > 0.5, class_weights[1], class_weights[0])
  loss = float(np.mean(-w * (targets * np.log(p) + (1 - targets) * np.log(1 - p))))
  return {"val_loss": loss, "val_auc": metrics.roc_auc(targets, probs)}


def train(config, workdir, start_time=None):
  """Trains (or resumes) one fold, then predicts with the best checkpoint. Returns the results dict."""
  start_time = start_time or time.time()
  run = setup.resolve(config)
  os.makedirs(workdir, exist_ok=True)
  data = data_lib.resolve_data(run, workdir)
  _check_identity(config, data, workdir)
  split = data_lib.make_split(run, data)
  pipeline = data_lib.make_pipeline(run, data, split)
  weights = data_lib.stream_class_weights(run, pipeline)
  logging.info("global batch %d on %d device(s) of %d process(es), %d steps/epoch, malignant share of the stream %.3f, "
               "class weights %.3f / %.3f", run.global_batch, run.num_devices, run.process_count,
               pipeline.steps_per_epoch,
               pipeline.positive_share(), *weights)
  model = run.build_model()
  tx, schedule = setup.build_optimizer(config.optimizer, pipeline.steps_per_epoch)
  state = initial_state(run, model, tx, jax.random.PRNGKey(run.seed))

  @functools.lru_cache(maxsize=None)
  def compiled_step(frozen):
    return steps.p_train(steps.make_train_step(model, weights, run.label_smoothing, frozen_backbone=frozen))

  p_predict = steps.p_predict(steps.make_predict_step(model))

  def evaluate(state):
    _, targets, probs = infer(p_predict, state, pipeline, pipeline.val_dataset(), data.train_files,
                              list(split.val_df["image_name"]), "the validation fold")
    return validation_metrics(targets, probs, weights)

  plan = loop.Plan(num_epochs=run.num_epochs, steps_per_epoch=pipeline.steps_per_epoch,
                   global_batch=run.global_batch, log_every_steps=run.log_every_steps, monitor="val_auc")
  checkpointer = _checkpointer(run, workdir)
  summaries = reporting.Summaries(os.path.join(workdir, "tensorboard"))
  try:
    fitted = loop.fit(
        state, plan, checkpointer, summaries,
        train_step=lambda epoch: compiled_step(epoch < run.freeze_backbone_epochs),
        batches=lambda epoch: _train_batches(pipeline, epoch, run.seed, data.train_files),
        evaluate=evaluate, learning_rate=schedule)
  finally:
    summaries.close()
    checkpointer.close()

  outputs = predict(config, workdir, prepared=(run, data, split, pipeline, model),
                    p_predict=None if run.tta else p_predict)
  meta, history = fitted.meta, fitted.meta["history"]
  results = {
      "val_auc": history[-1]["val_auc"] if history else None,
      "best_val_auc": meta["best"],
      "epochs": meta["epoch"],
      "steps": int(fitted.state.step),
      "history": history,
      "train_images_per_sec": (fitted.images_per_sec if np.isfinite(fitted.images_per_sec)
                               else meta["train_images"] / max(meta["train_seconds"], 1e-9)),
      "wall_seconds": time.time() - start_time,
      "global_batch": run.global_batch,
      "devices": run.num_devices,
      "processes": run.process_count,
      "outputs": outputs,
  }
  path = write_results(workdir, results, config)
  logging.info("results: %s", path)
  return results


def predict(config, workdir, prepared=None, p_predict=None):
  """Loads the best checkpoint; writes oof.csv, roc.png, report.html/.json (validation fold), submission.csv."""
  if prepared is None:
    run = setup.resolve(config)
    data = data_lib.resolve_data(run, workdir)
    _check_identity(config, data, workdir, record=False)
    split = data_lib.make_split(run, data)
    prepared = (run, data, split, data_lib.make_pipeline(run, data, split), run.build_model())
  run, data, split, pipeline, model = prepared
  state, meta = restore_best(run, model, config.optimizer, workdir)
  state = steps.replicate(state)
  p_predict = p_predict or steps.p_predict(steps.make_predict_step(model, tta=run.tta))

  # Every prediction first, then every file: a run killed half-way leaves the previous outputs whole.
  names, targets, probs = infer(p_predict, state, pipeline, pipeline.val_dataset(), data.train_files,
                                list(split.val_df["image_name"]), "the validation fold")
  test_table = list(data.test_df["image_name"])
  test_names, _, test_probs = infer(p_predict, state, pipeline, pipeline.test_dataset(len(test_table),
                                                                                       test_table),
                                    data.test_files, test_table, "test.csv")
  by_name = split.val_df.set_index("image_name")
  oof = pd.DataFrame({"image_name": names, "patient_id": by_name.loc[names, "patient_id"].to_numpy(),
                      "target": targets.astype(int), "prediction": probs, "fold": run.fold})
  submission = pd.DataFrame({"image_name": test_names, "target": test_probs})
  submission = submission.set_index("image_name").reindex(data.test_df["image_name"])
  skipped = submission["target"].isna()
  if skipped.any():  # Only with config.skip_corrupt: Kaggle needs a row for every test image.
    logging.warning("%d corrupt test image(s) get the median prediction", int(skipped.sum()))
    submission.loc[skipped, "target"] = float(np.median(test_probs))
  submission = submission.reset_index()

  oof_path, submission_path, roc_path = (os.path.join(workdir, n) for n in ("oof.csv", "submission.csv",
                                                                            "roc.png"))
  auc = metrics.roc_auc(oof["target"], oof["prediction"])  # The same in every process.
  if distributed.is_primary():  # Every process holds every prediction; one writes them.
    files.write_csv(oof, oof_path)
    files.write_csv(submission, submission_path)
    roc.save_roc(oof["target"], oof["prediction"], roc_path,
                 title=f"Validation fold {run.fold} (epoch {meta['epoch']})")
    clinical.write_report(workdir, clinical.with_context(oof, split.val_df), {"image": "prediction"},
                          f"Image model, validation fold {run.fold} (epoch {meta['epoch']})")
  report_path = os.path.join(workdir, "report.html")
  logging.info("best checkpoint (epoch %d): validation AUC %.4f%s; wrote %s, %s, %s", meta["epoch"], auc,
               " with flip TTA" if run.tta else "", submission_path, oof_path, roc_path)
  return {"submission": submission_path, "oof": oof_path, "roc": roc_path, "report": report_path,
          "predict_val_auc": auc, "tta": run.tta,
          "checkpoint": {"step": int(state.step), "epoch": int(meta["epoch"]), "fold": run.fold}}


def train_table(config, workdir):
  """The training table of the run's data source (for `--mode=data`)."""
  return data_lib.resolve_data(setup.resolve(config), workdir).train_df
