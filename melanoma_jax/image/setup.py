"""The config boundary of the image task: a config checked and resolved once into plain values.

Everything below this module (data pipeline, model factory, fit loop) takes these values as arguments,
never the config, as the Flax ImageNet example's `create_split` takes its batch size and image size.
"""
import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import optax

from melanoma_jax import models
from melanoma_jax.data import diagnosis
from melanoma_jax.data import pipeline as pipeline_lib
from melanoma_jax.training import steps
from melanoma_jax.utils.errors import InputError

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("seed", "warmup_cosine")
TARGETS = ("melanoma", "diagnosis")  # One malignant logit, or a softmax over data.diagnosis.CLASSES.
TTA_VIEWS = (1, 2, 3, 8)  # steps.tta_views: none, + horizontal flip, + vertical flip, all flips x transpose.


@dataclasses.dataclass(frozen=True)
class Optimizer:
  """The `config.optimizer` section in plain values: Adam(W) on a schedule (`learning_rate_schedule`)."""
  name: str  # One of OPTIMIZERS.
  schedule: str  # One of SCHEDULES.
  num_epochs: int  # The run's; warmup_cosine reaches zero at its end.
  lr_start: float
  lr_max: float
  lr_min: float
  warmup_epochs: float
  decay: float
  weight_decay: float
  grad_clip_norm: float  # 0: no clipping.


@dataclasses.dataclass(frozen=True)
class ImageRun:
  """What one image run is, in plain values."""
  data_dir: str  # "" = the synthetic set, generated into WORKDIR/data.
  extra_data: str  # Built ISIC archive sets for training only, comma-separated; "" none.
  image_size: int
  num_devices: int  # Of all processes.
  global_batch: int  # Rows per step over all processes; each process feeds global_batch / process_count.
  process_index: int
  process_count: int
  num_epochs: int
  freeze_backbone_epochs: int
  num_folds: int
  fold: int
  seed: int
  log_every_steps: int
  checkpoints_to_keep: int
  tta: int  # Views averaged at prediction (TTA_VIEWS).
  target: str  # One of TARGETS.
  label_smoothing: float
  class_weights: Optional[tuple]  # None: N / (2 N_c) of the oversampled training stream.
  model_name: str
  model_kwargs: dict  # models.build_model's keyword arguments.
  pipeline_kwargs: dict  # ImagePipeline's keyword arguments (all but the files and names).
  init_weights: str  # Keras weights file or converted directory for the backbone; "" = random init.
  synthetic_kwargs: dict  # synthetic.generate_dataset's keyword arguments, when data_dir is "".
  optimizer: Optimizer

  def build_model(self):
    return models.build_model(self.model_name, bn_axis_name=steps.AXIS, **self.model_kwargs)

  @property
  def compute_dtype(self):
    """"float32" or "bfloat16": the model's compute dtype (config.model.dtype)."""
    return self.model_kwargs.get("dtype", "float32")


def _check(condition, message):
  if not condition:
    raise InputError(message)


def resolve(config, num_devices=None, processes=None) -> ImageRun:
  """Checks `config` and resolves it; refuses configs that cannot work, before any data is read.

  `num_devices` (default `jax.device_count()`) counts the devices of all processes; `processes` is
  (this process's index, process count), default JAX's.
  """
  num_devices = num_devices or jax.device_count()
  process_index, process_count = processes or (jax.process_index(), jax.process_count())
  name = config.model.name
  _check(name in models.CLASSIFIERS or name == "tiny",
         f"config.model.name={name!r} must be one of {', '.join(models.CLASSIFIERS)} or 'tiny'")
  smallest = models.min_image_size(name) if name in models.CLASSIFIERS else models.MIN_IMAGE_SIZE
  _check(int(config.image_size) >= smallest,
         f"config.image_size={config.image_size}: {name} needs at least {smallest}x{smallest} pixels")
  global_batch = steps.global_batch_size(config.global_batch_size, config.per_device_batch_size, num_devices,
                                         process_count)
  _check(int(config.num_epochs) >= 1, f"config.num_epochs={config.num_epochs} must be >= 1")
  _check(0 <= int(config.fold) < int(config.num_folds),
         f"config.fold={config.fold} must be in [0, config.num_folds={config.num_folds})")
  _check(config.model.dtype in models.DTYPES,
         f"config.model.dtype={config.model.dtype!r} must be one of {', '.join(sorted(models.DTYPES))}")
  _check(config.model.kernels in models.KERNELS,
         f"config.model.kernels={config.model.kernels!r} must be one of {', '.join(models.KERNELS)}")
  _check(0.0 <= float(config.oversample_share or 0.0) < 1.0,
         f"config.oversample_share={config.oversample_share} must be in [0, 1)")
  _check(config.optimizer.name in OPTIMIZERS,
         f"config.optimizer.name={config.optimizer.name!r} must be one of {', '.join(OPTIMIZERS)}")
  schedule = config.optimizer.get("schedule", "seed")
  _check(schedule in SCHEDULES,
         f"config.optimizer.schedule={schedule!r} must be one of {', '.join(SCHEDULES)}")
  _check(schedule != "warmup_cosine" or 0 <= float(config.optimizer.warmup_epochs) < int(config.num_epochs),
         f"config.optimizer.warmup_epochs={config.optimizer.warmup_epochs} must be in [0, config.num_epochs="
         f"{config.num_epochs}) for the warmup_cosine schedule")
  tta = tta_views(config.tta)
  _check(tta is not None, f"config.tta={config.tta!r} must be True, False or a number of views in "
         f"{', '.join(map(str, TTA_VIEWS))}")
  target = config.get("target", "melanoma")
  _check(target in TARGETS, f"config.target={target!r} must be one of {', '.join(TARGETS)}")
  classes = len(diagnosis.CLASSES) if target == "diagnosis" else 1
  if target == "diagnosis":
    _check(config.class_weights is None or len(config.class_weights) == classes,
           f"config.class_weights={config.class_weights} must be None or one weight per class of "
           f"{', '.join(diagnosis.CLASSES)}")
  else:
    _check(config.class_weights is None or len(config.class_weights) == 2,
           f"config.class_weights={config.class_weights} must be None or (w_benign, w_malignant)")
  augment = None
  if config.augment.enabled:
    augment = pipeline_lib.Augment(**{k: v for k, v in config.augment.items() if k != "enabled"})
  model_kwargs = {"dtype": config.model.dtype, "dropout_rate": float(config.model.dropout_rate),
                  "kernels": config.model.kernels}
  if classes > 1:  # Only then: a one-logit model keeps the arguments it always had.
    model_kwargs["num_classes"] = classes
  if name in models.CLASSIFIERS:
    model_kwargs.update(head_sizes=tuple(config.model.head_sizes), remat=bool(config.model.remat))
  return ImageRun(
      data_dir=config.data_dir, extra_data=str(config.get("extra_data", "") or ""), image_size=int(config.image_size), num_devices=num_devices,
      global_batch=global_batch, process_index=process_index, process_count=process_count,
      num_epochs=int(config.num_epochs),
      freeze_backbone_epochs=int(config.freeze_backbone_epochs), num_folds=int(config.num_folds),
      fold=int(config.fold), seed=int(config.seed), log_every_steps=int(config.log_every_steps),
      checkpoints_to_keep=int(config.checkpoints_to_keep), tta=tta, target=target,
      label_smoothing=float(config.label_smoothing),
      class_weights=None if config.class_weights is None else tuple(float(w) for w in config.class_weights),
      model_name=name, model_kwargs=model_kwargs,
      pipeline_kwargs={"image_size": int(config.image_size), "global_batch": global_batch,
                       "num_devices": num_devices // process_count, "process_index": process_index,
                       "process_count": process_count, "oversample_share": float(config.oversample_share or 0.0),
                       "max_steps_per_epoch": int(config.max_steps_per_epoch),
                       "skip_corrupt": bool(config.skip_corrupt), "augment": augment},
      init_weights=config.model.init_weights, synthetic_kwargs=_synthetic_kwargs(config),
      optimizer=Optimizer(name=config.optimizer.name, schedule=schedule, num_epochs=int(config.num_epochs),
                          lr_start=float(config.optimizer.lr_start),
                          lr_max=float(config.optimizer.lr_max), lr_min=float(config.optimizer.lr_min),
                          warmup_epochs=float(config.optimizer.warmup_epochs), decay=float(config.optimizer.decay),
                          weight_decay=float(config.optimizer.weight_decay),
                          grad_clip_norm=float(config.optimizer.grad_clip_norm or 0.0)))


def tta_views(value) -> Optional[int]:
  """The number of TTA views of a `config.tta` value: True is the flips runs recorded before views could be
  counted (3), False one view; a number must be one of TTA_VIEWS. None for anything else."""
  if isinstance(value, bool):
    return 3 if value else 1
  if isinstance(value, int) and value in TTA_VIEWS:
    return value
  return None


def _synthetic_kwargs(config):
  kwargs = {"image_size": int(config.synthetic.image_size or config.image_size),
            "seed": int(config.synthetic.seed)}
  if config.synthetic.num_patients:
    kwargs["num_patients"] = int(config.synthetic.num_patients)
  if config.synthetic.ugly_duckling:
    kwargs["ugly_duckling"] = float(config.synthetic.ugly_duckling)
  if config.synthetic.generator != "dermoscopy":  # Only then: the default's kwargs stay as they were.
    kwargs["generator"] = str(config.synthetic.generator)
  return kwargs


def learning_rate_schedule(opt, steps_per_epoch):
  """The learning rate at a step of `opt.schedule`, both starting with a linear ramp lr_start -> lr_max
  over warmup_epochs:

  "seed": then exponential decay per epoch (lr *= decay) towards lr_min, as the seed notebook;
  "warmup_cosine": then cosine decay to zero at the end of the run (optax's), as the 1st-place SIIM-ISIC
  solution trained.
  """
  warmup = float(opt.warmup_epochs)
  if opt.schedule == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=opt.lr_start, peak_value=opt.lr_max, warmup_steps=int(round(warmup * steps_per_epoch)),
        decay_steps=int(opt.num_epochs * steps_per_epoch), end_value=0.0)

  def schedule(step):
    epoch = step / steps_per_epoch
    ramp = opt.lr_start + (opt.lr_max - opt.lr_start) * epoch / max(warmup, 1e-9)
    decayed = opt.lr_min + (opt.lr_max - opt.lr_min) * opt.decay ** jnp.floor(epoch - warmup)
    return jnp.where(epoch < warmup, ramp, decayed)

  return schedule


def build_optimizer(opt: Optimizer, steps_per_epoch):
  """(optax transformation, schedule) of a run's `Optimizer`."""
  schedule = learning_rate_schedule(opt, steps_per_epoch)
  if opt.name == "adamw":
    core = optax.adamw(schedule, weight_decay=opt.weight_decay)
  else:
    core = optax.adam(schedule)
  parts = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm else []
  return optax.chain(*parts, core), schedule
