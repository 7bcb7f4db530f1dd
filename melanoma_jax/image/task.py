"""Image model training and prediction: tf.data -> pmapped optax steps (the shared fit loop) -> AUC, CSVs.

`train(config, workdir)` trains on one patient-grouped fold, validates every epoch, keeps the latest and the
best checkpoints and resumes from the latest when run again on the same workdir, then predicts with the
best; `predict(config, workdir)` loads the best checkpoint and writes submission.csv, oof.csv and roc.png.

Several processes (`training.distributed`): each trains on its share of every epoch and predicts its share
of the validation and test images; the predictions are gathered into every process, which then compute
the same validation AUC, and process 0 writes the outputs.
"""
import functools
import logging as py_logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pandas as pd
from absl import logging

from melanoma_jax.data import diagnosis
from melanoma_jax.evaluation import clinical, metrics, roc
from melanoma_jax.image import data as data_lib
from melanoma_jax.image import setup
from melanoma_jax.image import trained as trained_lib
from melanoma_jax.training import distributed, identity
from melanoma_jax.training import loop, reporting, steps
from melanoma_jax.training import state as state_lib
from melanoma_jax.utils import files
from melanoma_jax.training.results import write_results
from melanoma_jax.utils.errors import InputError

# Which training images each process read, per epoch, at DEBUG level (off unless a handler enables it).
READS = py_logging.getLogger("melanoma_jax.image.reads")


def initial_state(run, model, tx, rng):
  """Random init, or (`run.init_weights`) converted Keras weights for the backbone + a new head."""
  if not run.init_weights:
    sample = jnp.zeros((1, run.image_size, run.image_size, 3), jnp.float32)
    return state_lib.create_train_state(model, tx, rng, sample)
  from melanoma_jax.models import init_with_pretrained_backbone  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import keras_weights  # pylint: disable=g-import-not-at-top
  source = run.init_weights
  if source == "imagenet":  # The official weights of the run's own backbone.
    source = f"imagenet:{run.model_name}"
  backbone = keras_weights.init_backbone_variables(source, include_top=False)
  found = keras_weights.backbone_name(backbone)
  if found != run.model_name:
    raise InputError(f"{run.init_weights}: holds {found} weights, config.model.name is {run.model_name}")
  variables = init_with_pretrained_backbone(model, jax.random.fold_in(rng, 1), backbone)
  logging.info("backbone initialised from %s", run.init_weights)
  return state_lib.create_train_state(model, tx, rng, None, variables=variables)


def _check_identity(config, data, workdir, checkpointer=None, extra=()):
  """Refuses a workdir that holds a run of another config or data (before anything is restored); returns
  the run's identity. With a `checkpointer` (training), the latest checkpoint's own record of its run is
  compared first and the identity recorded where there is none; without (prediction), it is only checked.
  The data are the 2020 tables and records and the files of the `extra` external sets."""
  run_identity = identity.of_data(config, workdir, data.train_df.attrs["path"], data.test_df.attrs["path"],
                                  data.train_files + data.test_files + [f for e in extra for f in e.files()])
  latest = checkpointer.latest_step() if checkpointer is not None else None
  if latest is not None:  # Before recording: a deleted run.json must not let another config resume.
    identity.check_checkpoint(workdir, checkpointer.read_meta(latest), checkpointer.step_dir(latest),
                              run_identity)
  identity.check_or_record(workdir, run_identity, record=checkpointer is not None)
  return run_identity


def _train_batches(pipeline, epoch, seed, record_files):
  """The epoch's (sharded batch, image names) items; when READS is enabled at DEBUG level (a handler a test
  or a user installs), the names this process trained on are logged once the epoch is read."""
  items = pipeline.device_batches(pipeline.train_dataset(epoch, seed), record_files)
  if not READS.isEnabledFor(py_logging.DEBUG):
    return items

  def logged():
    names = []
    for batch, batch_names in items:
      names.extend(n for n, m in zip(batch_names, batch["mask"].reshape(-1)) if m > 0)
      yield batch, batch_names
    READS.debug("epoch %d process %d read %s", epoch, distributed.process_index(), " ".join(names))

  return logged()


def validation_metrics(targets, probs, class_weights):
  p = np.clip(probs, 1e-7, 1 - 1e-7)
  w = np.where(targets > 0.5, class_weights[1], class_weights[0])
  loss = float(np.mean(-w * (targets * np.log(p) + (1 - targets) * np.log(1 - p))))
  return {"val_loss": loss, "val_auc": metrics.roc_auc(targets, probs)}


def train(config, workdir, start_time=None):
  """Trains (or resumes) one fold, then predicts with the best checkpoint. Returns the results dict.

  A run that finished earlier is not trained again, and its prediction reuses WORKDIR/scores.npz when it
  holds the best checkpoint's scores: only the outputs are written again.
  """
  start_time = start_time or time.time()
  run = setup.resolve(config)
  os.makedirs(workdir, exist_ok=True)
  identity.check_config(workdir, config)  # Before the data: another config must not regenerate this run's.
  data = data_lib.resolve_data(run, workdir)
  extra = data_lib.external_sets(run)
  checkpointer = trained_lib.checkpointer(run, workdir)
  try:
    run_identity = _check_identity(config, data, workdir, checkpointer, extra)
    split = data_lib.make_split(run, data)
    pipeline = data_lib.make_pipeline(run, data, split, extra)
    finished = loop.finished_meta(checkpointer, run.num_epochs)
    if finished is None:
      meta, steps_run, images_per_sec = _fit(run, config, workdir, pipeline, split, data, checkpointer,
                                             identity.for_checkpoint(run_identity),
                                             data_lib.training_class_counts(run, data, split, extra))
    else:
      meta, steps_run, images_per_sec = finished, checkpointer.latest_step(), float("nan")
      logging.info("fold %d: training already finished in an earlier run (%d epochs%s); not training again",
                   run.fold,
                   meta["epoch"], ", stopped early" if meta.get("stopped_early") else "")
  finally:
    checkpointer.close()

  outputs = predict(config, workdir, prepared=(run, data, split, pipeline), reuse_scores=True)
  history = meta["history"]
  results = {
      "val_auc": history[-1]["val_auc"] if history else None,
      "best_val_auc": meta["best"],
      "epochs": meta["epoch"],
      "steps": int(steps_run),
      "history": history,
      "train_images_per_sec": (images_per_sec if np.isfinite(images_per_sec)
                               else meta["train_images"] / max(meta["train_seconds"], 1e-9)),
      "wall_seconds": time.time() - start_time,
      "global_batch": run.global_batch,
      "compute_dtype": run.compute_dtype,
      "devices": run.num_devices,
      "processes": run.process_count,
      # Training images per source: the fold's 2020 rows and each external set (validation is 2020 only).
      "training_images": {"2020": len(split.train_df), **{e.directory: e.num_images for e in extra}},
      "outputs": outputs,
  }
  path = write_results(workdir, results, config)
  logging.info("results: %s", path)
  return results


def _fit(run, config, workdir, pipeline, split, data, checkpointer, recorded, class_counts=None):
  """The fit loop of the run: (meta of its last checkpoint, steps, training images/s). Every checkpoint's
  meta carries `recorded` (the run's config fields) for `identity.check_checkpoint`; `class_counts` are a
  diagnosis target's training images per class."""
  weights = data_lib.stream_class_weights(run, pipeline, class_counts)
  logging.info("%s %dx%d computing in %s; global batch %d on %d device(s) of %d process(es), %d steps/epoch, "
               "malignant share of the stream %.3f, class weights %s", run.model_name, run.image_size,
               run.image_size, run.compute_dtype, run.global_batch, run.num_devices, run.process_count, pipeline.steps_per_epoch,
               pipeline.positive_share(), " / ".join(f"{w:.3f}" for w in weights))
  # The validation loss is the binary one of p(melanoma); a diagnosis target's weights are per class.
  binary_weights = weights if run.target != "diagnosis" else (1.0, 1.0)
  model = run.build_model()
  tx, schedule = setup.build_optimizer(run.optimizer, pipeline.steps_per_epoch)
  state = initial_state(run, model, tx, jax.random.PRNGKey(run.seed))

  @functools.lru_cache(maxsize=None)
  def compiled_step(frozen):
    return steps.p_train(steps.make_train_step(model, weights, run.label_smoothing, frozen_backbone=frozen))

  p_predict = trained_lib.predict_step(model, tta=False, embeddings=False)

  def evaluate(state):
    scores = trained_lib.score_split(p_predict, state, pipeline, pipeline.val_dataset(), data.train_files,
                                     list(split.val_df["image_name"]), "the validation fold")
    return validation_metrics(scores.targets, scores.probabilities, binary_weights)

  plan = loop.Plan(num_epochs=run.num_epochs, steps_per_epoch=pipeline.steps_per_epoch,
                   global_batch=run.global_batch, log_every_steps=run.log_every_steps, monitor="val_auc")
  summaries = reporting.Summaries(os.path.join(workdir, "tensorboard"))
  try:
    fitted = loop.fit(
        state, plan, checkpointer, summaries,
        train_step=lambda epoch: compiled_step(epoch < run.freeze_backbone_epochs),
        batches=lambda epoch: _train_batches(pipeline, epoch, run.seed, data.train_files),
        evaluate=evaluate, learning_rate=schedule, meta={"run": recorded})
  finally:
    summaries.close()
  return fitted.meta, int(fitted.state.step), fitted.images_per_sec


def _scores(run, data, split, pipeline, workdir, reuse):
  """The best checkpoint's RunScores: WORKDIR/scores.npz when `reuse` and every process finds it holds them,
  else scored once now (probabilities and embeddings in one pass) and kept there."""
  trained = trained_lib.load_best(workdir, run=run)
  val_table, test_table = list(split.val_df["image_name"]), list(data.test_df["image_name"])
  cached = trained_lib.load_scores(workdir, trained.checkpoint_step, run.tta)
  usable = reuse and cached is not None and set(cached.val.names) == set(val_table) and (
      set(cached.test.names) == set(test_table))
  if distributed.all_true(usable):  # Every process decides alike: scoring is collective.
    logging.info("fold %d: reusing %s (best checkpoint step %d)", run.fold,
                 os.path.join(workdir, trained_lib.SCORES), trained.checkpoint_step)
    return cached, trained.epoch
  val = trained.score_split(pipeline, pipeline.val_dataset(), data.train_files, val_table, "the validation fold",
                            embeddings=True)
  test = trained.score_split(pipeline, pipeline.test_dataset(len(test_table), test_table), data.test_files,
                             test_table, "test.csv", embeddings=True)
  scores = trained_lib.RunScores(trained.checkpoint_step, run.tta, val, test)
  scores.save(workdir)
  distributed.barrier("scores.npz")  # Readable by every process from here on.
  return scores, trained.epoch


def predict(config, workdir, prepared=None, reuse_scores=False):
  """Predicts with the best checkpoint: writes oof.csv, roc.png, report.html/.json (validation fold),
  submission.csv and scores.npz (probabilities and embeddings of both, for the ensemble).

  `--mode=predict` scores the images again (they may have changed); a rerun of a finished training
  (`reuse_scores`, as `train` passes) reuses scores.npz when it holds the best checkpoint's scores.
  """
  if prepared is None:
    run = setup.resolve(config)
    identity.check_config(workdir, config)
    data = data_lib.resolve_data(run, workdir)
    _check_identity(config, data, workdir, extra=data_lib.external_sets(run))
    split = data_lib.make_split(run, data)
    prepared = (run, data, split, data_lib.make_pipeline(run, data, split))  # Scores 2020 images only.
  run, data, split, pipeline = prepared
  # Every prediction first, then every file: a run killed half-way leaves the previous outputs whole.
  scores, epoch = _scores(run, data, split, pipeline, workdir, reuse_scores)
  names, targets, probs = scores.val.names, scores.val.targets, scores.val.probabilities
  test_names, test_probs = scores.test.names, scores.test.probabilities
  by_name = split.val_df.set_index("image_name")
  oof = pd.DataFrame({"image_name": names, "patient_id": by_name.loc[names, "patient_id"].to_numpy(),
                      "target": targets.astype(int), "prediction": probs, "fold": run.fold})
  if scores.val.classes is not None:  # A diagnosis target: each class's probability; prediction is p_MEL.
    for column, values in zip(diagnosis.class_columns(), scores.val.classes.T):
      oof[column] = values
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
  title = f"Image model, validation fold {run.fold} (epoch {epoch})"
  if distributed.is_primary():  # Every process holds every prediction; one writes them.
    files.write_csv(oof, oof_path)
    files.write_csv(submission, submission_path)
    roc.save_roc(oof["target"], oof["prediction"], roc_path, title=title)
    clinical.write_report(workdir, clinical.with_context(oof, split.val_df), {"image": "prediction"}, title)
  report_path = os.path.join(workdir, "report.html")
  logging.info("best checkpoint (epoch %d): validation AUC %.4f%s; wrote %s, %s, %s", epoch, auc,
               f" with TTA over {run.tta} views" if run.tta > 1 else "", submission_path, oof_path, roc_path)
  return {"submission": submission_path, "oof": oof_path, "roc": roc_path, "report": report_path,
          "scores": os.path.join(workdir, trained_lib.SCORES), "predict_val_auc": auc, "tta": run.tta,
          "checkpoint": {"step": scores.checkpoint_step, "epoch": int(epoch), "fold": run.fold}}


def train_table(config, workdir):
  """The training table of the run's data source (for `--mode=data`)."""
  return data_lib.resolve_data(setup.resolve(config), workdir).train_df
