"""Image model training and prediction: tf.data -> pmapped optax steps -> orbax checkpoints -> AUC.

`train_and_evaluate(config, workdir)` trains on one patient-grouped fold, validates every epoch, keeps the
latest and the best checkpoints and resumes from the latest when run again on the same workdir;
`predict(config, workdir)` loads the best checkpoint and writes submission.csv, oof.csv and roc.png.
"""
import dataclasses
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pandas as pd
from absl import logging

from melanoma_jax.data import folds as folds_lib
from melanoma_jax.data import pipeline as pipeline_lib
from melanoma_jax.data import sources
from melanoma_jax.models.inception_resnet_v2 import KERNEL_GRADS
from melanoma_jax.training import checkpoint as checkpoint_lib
from melanoma_jax.training import losses, metrics, reporting, steps
from melanoma_jax.training import state as state_lib
from melanoma_jax.utils import plots
from melanoma_jax.utils.errors import InputError
from melanoma_jax.utils.results import write_results

MIN_IMAGE_SIZE = 75
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class NonFiniteLossError(RuntimeError):
  """The loss became NaN or inf; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------ config
def validate_config(config):
  """Refuses configs that cannot work, before any data is read or anything compiles."""
  if int(config.image_size) < MIN_IMAGE_SIZE:
    raise InputError(f"config.image_size={config.image_size}: InceptionResNetV2 needs at least "
                     f"{MIN_IMAGE_SIZE}x{MIN_IMAGE_SIZE} pixels")
  if int(config.per_device_batch_size) < 1:
    raise InputError(f"config.per_device_batch_size={config.per_device_batch_size} must be >= 1")
  steps.global_batch_size(config)
  if int(config.num_epochs) < 1:
    raise InputError(f"config.num_epochs={config.num_epochs} must be >= 1")
  if not 0 <= int(config.fold) < int(config.num_folds):
    raise InputError(f"config.fold={config.fold} must be in [0, config.num_folds={config.num_folds})")
  if config.model.dtype not in _DTYPES:
    raise InputError(f"config.model.dtype={config.model.dtype!r} must be one of {sorted(_DTYPES)}")
  if config.model.get("kernel_grad", "auto") not in KERNEL_GRADS:
    raise InputError(f"config.model.kernel_grad={config.model.kernel_grad!r} must be one of "
                     f"{', '.join(KERNEL_GRADS)}")
  if not 0.0 <= float(config.oversample_share or 0.0) < 1.0:
    raise InputError(f"config.oversample_share={config.oversample_share} must be in [0, 1)")
  if config.optimizer.name not in ("adam", "adamw"):
    raise InputError(f"config.optimizer.name={config.optimizer.name!r} must be 'adam' or 'adamw'")


# ------------------------------------------------------------------------------------------------ model
def build_model(config, freeze_backbone=False):
  """The classifier of config.model.name (default InceptionResNetV2 + the seed's head)."""
  dtype = _DTYPES[config.model.dtype]
  name = config.model.get("name", "inception_resnet_v2")
  if name == "tiny":
    from melanoma_jax.models.tiny import TinyClassifier  # pylint: disable=g-import-not-at-top
    return TinyClassifier(dropout_rate=config.model.dropout_rate, freeze_backbone=freeze_backbone,
                          dtype=dtype, bn_axis_name=steps.AXIS)
  if name != "inception_resnet_v2":
    raise InputError(f"config.model.name={name!r} must be 'inception_resnet_v2' or 'tiny'")
  from melanoma_jax.models import MelanomaClassifier  # pylint: disable=g-import-not-at-top
  return MelanomaClassifier(head_sizes=tuple(config.model.head_sizes), dropout_rate=config.model.dropout_rate,
                            freeze_backbone=freeze_backbone, dtype=dtype, remat=config.model.remat,
                            kernel_grad=config.model.get("kernel_grad", "auto"), bn_axis_name=steps.AXIS)


def learning_rate_schedule(opt, steps_per_epoch):
  """The seed's schedule: linear ramp over warmup_epochs, then exponential decay per epoch to lr_min."""
  warmup = float(opt.warmup_epochs)

  def schedule(step):
    epoch = step / steps_per_epoch
    ramp = opt.lr_start + (opt.lr_max - opt.lr_start) * epoch / max(warmup, 1e-9)
    decayed = opt.lr_min + (opt.lr_max - opt.lr_min) * opt.decay ** jnp.floor(epoch - warmup)
    return jnp.where(epoch < warmup, ramp, decayed)

  return schedule


def build_optimizer(config, steps_per_epoch):
  opt = config.optimizer
  schedule = learning_rate_schedule(opt, steps_per_epoch)
  if opt.name == "adamw":
    core = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    core = optax.adam(schedule)
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm else []
  return optax.chain(*parts, core), schedule


def initial_state(config, model, tx, rng):
  """Random init, or (config.model.init_weights) converted Keras weights for the backbone + a new head."""
  if not config.model.init_weights:
    sample = jnp.zeros((1, config.image_size, config.image_size, 3), jnp.float32)
    return state_lib.create_train_state(model, tx, rng, sample)
  from melanoma_jax.models import init_with_pretrained_backbone  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import keras_weights  # pylint: disable=g-import-not-at-top
  backbone = keras_weights.init_backbone_variables(config.model.init_weights, include_top=False)
  variables = init_with_pretrained_backbone(model, jax.random.fold_in(rng, 1), backbone)
  logging.info("backbone initialised from %s", config.model.init_weights)
  return state_lib.create_train_state(model, tx, rng, None, variables=variables)


def make_predict_step(model, tta):
  """Probabilities (mean over flips when `tta`) of one device's shard."""

  def predict_step(state, batch):
    x = batch["x"]
    views = [x, x[:, :, ::-1], x[:, ::-1]] if tta else [x]
    variables = state_lib.model_variables(state)
    probs = [jax.nn.sigmoid(model.apply(variables, v, train=False).astype(jnp.float32)) for v in views]
    return sum(probs) / len(probs)

  return steps.p_eval(predict_step)


# ------------------------------------------------------------------------------------------------ data
def resolve_data(config, workdir):
  """The run's ImageData: config.data_dir, or a synthetic set generated into WORKDIR/data."""
  data_dir = config.data_dir
  if not data_dir:
    from melanoma_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    data_dir = os.path.join(workdir, "data")
    kwargs = {"image_size": int(config.synthetic.get("image_size", 0) or config.image_size),
              "seed": int(config.synthetic.seed)}
    if config.synthetic.num_patients:
      kwargs["num_patients"] = int(config.synthetic.num_patients)
    summary = synthetic.generate_dataset(data_dir, **kwargs)
    logging.info("synthetic data in %s: %s", data_dir,
                 {k: v for k, v in summary.items() if isinstance(v, (int, float, str))})
  data = sources.resolve(data_dir)
  logging.info("%s", data.leakage_report)
  logging.info("records: %d train and %d test file(s), %s layout", len(data.train_files),
               len(data.test_files), data.layout)
  return data


@dataclasses.dataclass
class Split:
  train_df: pd.DataFrame
  val_df: pd.DataFrame


def make_split(config, data):
  fold_ids = folds_lib.assign_folds(data.train_df, int(config.num_folds), int(config.seed))
  train_df = data.train_df[fold_ids != config.fold].reset_index(drop=True)
  val_df = data.train_df[fold_ids == config.fold].reset_index(drop=True)
  for name, part in (("training", train_df), ("validation", val_df)):
    if part.empty or part["target"].nunique() < 2:
      raise InputError(f"{data.train_df.attrs.get('path')}: fold {config.fold} of {config.num_folds} leaves "
                       f"the {name} split without both classes ({len(part)} images, "
                       f"{int(part['target'].sum())} malignant)")
  logging.info("fold %d/%d: %d training images (%d malignant), %d validation images (%d malignant) of "
               "disjoint patients", config.fold, config.num_folds, len(train_df), train_df["target"].sum(),
               len(val_df), val_df["target"].sum())
  return Split(train_df, val_df)


def make_pipeline(config, data, split):
  targets = dict(zip(data.train_df["image_name"], data.train_df["target"].astype(int)))
  return pipeline_lib.ImagePipeline(data.train_files, data.test_files, targets,
                                    split.train_df["image_name"], split.val_df["image_name"], config)


def stream_class_weights(config, pipeline):
  """config.class_weights, or N / (2 N_c) of the training stream after oversampling."""
  if config.class_weights:
    return tuple(float(w) for w in config.class_weights)
  share = pipeline.positive_share()
  return 1.0 / (2.0 * (1.0 - share)), 1.0 / (2.0 * share)


# ------------------------------------------------------------------------------------------------ evaluation
def run_inference(p_predict, state, pipeline, dataset, files, expected, what):
  """(image_names, targets, probabilities) of every example of `dataset` exactly once."""
  names, targets, probs = [], [], []
  for batch, batch_names in pipeline.device_batches(dataset, files):
    out = np.asarray(p_predict(state, batch)).reshape(-1)
    keep = batch["mask"].reshape(-1) > 0
    probs.append(out[keep])
    targets.append(batch["y"].reshape(-1)[keep])
    names.extend(n for n, k in zip(batch_names, keep) if k)
  pipeline_lib.count_check(len(names), expected, what, files[0] if files else "",
                           skip_corrupt=bool(pipeline.config.get("skip_corrupt", False)))
  if len(set(names)) != len(names):
    raise InputError(f"{files[0]}: {what} records hold duplicate image names")
  return names, np.concatenate(targets), np.concatenate(probs)


def validation_metrics(targets, probs, class_weights):
  p = np.clip(probs, 1e-7, 1 - 1e-7)
  w = np.where(targets > 0.5, class_weights[1], class_weights[0])
  loss = float(np.mean(-w * (targets * np.log(p) + (1 - targets) * np.log(1 - p))))
  return {"val_loss": loss, "val_auc": metrics.roc_auc(targets, probs)}


# ------------------------------------------------------------------------------------------------ training
def _to_jsonable_history(history):
  return [{k: float(v) for k, v in h.items()} for h in history]


def train_and_evaluate(config, workdir, start_time=None):
  """Trains (or resumes) one fold, then predicts with the best checkpoint. Returns the results dict."""
  start_time = start_time or time.time()
  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  data = resolve_data(config, workdir)
  split = make_split(config, data)
  pipeline = make_pipeline(config, data, split)
  steps_per_epoch = pipeline.steps_per_epoch
  num_epochs = int(config.num_epochs)
  total_steps = steps_per_epoch * num_epochs
  weights = stream_class_weights(config, pipeline)
  logging.info("global batch %d on %d device(s), %d steps/epoch, malignant share of the stream %.3f, "
               "class weights %.3f / %.3f", pipeline.global_batch, pipeline.num_devices, steps_per_epoch,
               pipeline.positive_share(), *weights)

  model = build_model(config)
  tx, schedule = build_optimizer(config, steps_per_epoch)
  state = initial_state(config, model, tx, jax.random.PRNGKey(int(config.seed)))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                                     max_to_keep=int(config.checkpoints_to_keep))
  meta = {"epoch": 0, "best_val_auc": -1.0, "history": [], "train_images": 0, "train_seconds": 0.0}
  restored = ckpt.restore_latest(state)
  if restored is not None:
    state, meta = restored
    logging.info("resumed from %s at epoch %d (step %d)", ckpt.directory, meta["epoch"], int(state.step))
  if meta["epoch"] >= num_epochs:
    logging.info("training already finished (%d epochs)", meta["epoch"])
  state = steps.replicate(state)

  train_steps = {}

  def train_step_for(epoch):
    frozen = epoch < int(config.freeze_backbone_epochs)
    if frozen not in train_steps:
      phase_model = build_model(config, freeze_backbone=frozen) if frozen else model
      train_steps[frozen] = steps.p_train(steps.make_train_step(
          phase_model, weights, float(config.label_smoothing), frozen=("backbone",) if frozen else ()))
    return train_steps[frozen]

  p_predict = make_predict_step(model, tta=False)
  summaries = reporting.Summaries(os.path.join(workdir, "tensorboard"))
  progress = reporting.Progress(total_steps, int(state.step), pipeline.global_batch)
  log_every = max(1, int(config.log_every_steps))
  step = int(state.step)  # Counted on the host: reading state.step would sync with the devices every step.
  try:
    for epoch in range(int(meta["epoch"]), num_epochs):
      p_step = train_step_for(epoch)
      pending = []  # (step, loss) device scalars fetched every log_every steps: no host sync per step.
      epoch_start = time.time()
      progress.resume()
      batches = pipeline.device_batches(pipeline.train_dataset(epoch, int(config.seed)), data.train_files)
      for batch, _ in steps.prefetch_to_device(batches):
        state, step_metrics = p_step(state, batch)
        step += 1
        pending.append((step, step_metrics["loss"]))
        if progress.timed_steps == 0:  # Start the clock once the first step has compiled and run.
          jax.block_until_ready(step_metrics["loss"])
        progress.step_done(step)
        if len(pending) >= log_every or step == (epoch + 1) * steps_per_epoch:
          losses_now = _check_finite(pending, ckpt)
          progress.report(epoch, num_epochs, step, losses_now[-1])
          summaries.scalars(step, {"train/loss": float(np.mean(losses_now)),
                                   "train/learning_rate": float(schedule(step)),
                                   "train/images_per_sec": progress.images_per_sec})
          pending = []
      meta["train_images"] += steps_per_epoch * pipeline.global_batch
      meta["train_seconds"] += time.time() - epoch_start
      _, val_targets, val_probs = run_inference(p_predict, state, pipeline, pipeline.val_dataset(),
                                                data.train_files, len(split.val_df), "the validation fold")
      epoch_metrics = validation_metrics(val_targets, val_probs, weights)
      is_best = epoch_metrics["val_auc"] > meta["best_val_auc"]
      if is_best:
        meta["best_val_auc"] = epoch_metrics["val_auc"]
      meta["epoch"] = epoch + 1
      meta["history"] = meta["history"] + [dict(epoch=epoch + 1, **epoch_metrics)]
      ckpt.save(int(state.step), state, meta, is_best=is_best)
      summaries.scalars(int(state.step), {"val/loss": epoch_metrics["val_loss"], "val/auc": epoch_metrics["val_auc"]})
      logging.info("epoch %d/%d: val_loss %.4f val_auc %.4f (best %.4f)%s", epoch + 1, num_epochs,
                   epoch_metrics["val_loss"], epoch_metrics["val_auc"], meta["best_val_auc"],
                   " saved as best" if is_best else "")
  finally:
    summaries.close()
  ckpt.close()

  outputs = predict(config, workdir, data=data, split=split, pipeline=pipeline, model=model,
                    p_predict=None if config.tta else p_predict)
  history = meta["history"]
  results = {
      "val_auc": history[-1]["val_auc"] if history else None,
      "best_val_auc": meta["best_val_auc"],
      "epochs": meta["epoch"],
      "steps": int(state.step),
      "history": history,
      "train_images_per_sec": (progress.images_per_sec if progress.timed_steps
                               else meta["train_images"] / max(meta["train_seconds"], 1e-9)),
      "wall_seconds": time.time() - start_time,
      "global_batch": pipeline.global_batch,
      "devices": pipeline.num_devices,
      "outputs": outputs,
  }
  path = write_results(workdir, results, config)
  logging.info("results: %s", path)
  return results


def _check_finite(pending, ckpt):
  values = [float(v) for _, v in pending]
  for (step, _), value in zip(pending, values):
    if not math.isfinite(value):
      last = ckpt.latest_step()
      raise NonFiniteLossError(
          f"loss became {value} at step {step}; stopped. The last good checkpoint "
          f"({'step ' + str(last) if last is not None else 'none yet'}) is kept in {ckpt.directory}")
  return values


# ------------------------------------------------------------------------------------------------ prediction
def predict(config, workdir, data=None, split=None, pipeline=None, model=None, p_predict=None):
  """Loads the best checkpoint; writes oof.csv + roc.png (validation fold) and submission.csv (test)."""
  validate_config(config)
  data = data or resolve_data(config, workdir)
  split = split or make_split(config, data)
  pipeline = pipeline or make_pipeline(config, data, split)
  model = model or build_model(config)
  tx, _ = build_optimizer(config, pipeline.steps_per_epoch)
  abstract = jax.eval_shape(lambda: state_lib.create_train_state(
      model, tx, jax.random.PRNGKey(0), jnp.zeros((1, config.image_size, config.image_size, 3))))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  restored = ckpt.restore_best(abstract)
  ckpt.close()
  if restored is None:
    raise InputError(f"{ckpt.directory}: no best checkpoint to predict with (train first)")
  state, meta = restored
  state = steps.replicate(state)
  p_predict = p_predict or make_predict_step(model, tta=bool(config.tta))

  names, targets, probs = run_inference(p_predict, state, pipeline, pipeline.val_dataset(),
                                        data.train_files, len(split.val_df), "the validation fold")
  by_name = split.val_df.set_index("image_name")
  oof = pd.DataFrame({"image_name": names, "patient_id": by_name.loc[names, "patient_id"].to_numpy(),
                      "target": targets.astype(int), "prediction": probs, "fold": int(config.fold)})
  oof_path = os.path.join(workdir, "oof.csv")
  oof.to_csv(oof_path, index=False)
  roc_path = os.path.join(workdir, "roc.png")
  auc = plots.save_roc(oof["target"], oof["prediction"], roc_path,
                       title=f"Validation fold {config.fold} (epoch {meta['epoch']})")

  test_names, _, test_probs = run_inference(p_predict, state, pipeline, pipeline.test_dataset(len(data.test_df)),
                                            data.test_files, len(data.test_df), "test.csv")
  submission = pd.DataFrame({"image_name": test_names, "target": test_probs})
  submission = submission.set_index("image_name").reindex(data.test_df["image_name"])
  skipped = submission["target"].isna()
  if skipped.any():  # Only with config.skip_corrupt: Kaggle needs a row for every test image.
    logging.warning("%d corrupt test image(s) get the median prediction", int(skipped.sum()))
    submission.loc[skipped, "target"] = float(np.median(test_probs))
  submission = submission.reset_index()
  submission_path = os.path.join(workdir, "submission.csv")
  submission.to_csv(submission_path, index=False)
  logging.info("best checkpoint (epoch %d): validation AUC %.4f%s; wrote %s, %s, %s", meta["epoch"], auc,
               " with flip TTA" if config.tta else "", submission_path, oof_path, roc_path)
  return {"submission": submission_path, "oof": oof_path, "roc": roc_path, "predict_val_auc": auc,
          "tta": bool(config.tta)}
