"""The seed notebook's recipe on real data, without its flaws.

1024x1024 TFRecords, 16 images per device, 16 epochs, its warm-up-then-exponential-decay schedule, malignant
class oversampled to about 17% of the stream (6,619 of 39,161 in the seed) with matching class weights,
ImageNet weights converted from Keras. Unlike the seed: a patient-grouped validation fold, the backbone
fine-tuned (after one head-only epoch), inputs scaled to [-1, 1], probabilities submitted.

  python main.py --config=configs/image.py --workdir=runs/irv2_1024 \
      --config.data_dir=siim-isic-melanoma-classification \
      --config.model.init_weights=weights/irv2_notop
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.task = "image"
  # Kaggle folder (train.csv, test.csv, tfrecords/) or a resized melanoma-NxN set; "" = synthetic data.
  config.data_dir = "siim-isic-melanoma-classification"
  config.image_size = 1024
  config.per_device_batch_size = 16
  config.global_batch_size = 0  # 0 = per_device_batch_size x local devices; else must divide evenly.
  config.num_epochs = 16
  config.max_steps_per_epoch = 0  # 0 = a full pass of the training split; >0 caps it (smoke runs).
  config.seed = 0
  config.num_folds = 5
  config.fold = 0
  config.skip_corrupt = False  # True: corrupt JPEGs are skipped and counted instead of stopping the run.

  # Malignant share of the training stream (0 = natural rate). Class weights follow the stream: N / (2 N_c).
  config.oversample_share = 6619 / 39161
  config.class_weights = None  # Or (w_benign, w_malignant).
  config.label_smoothing = 0.0

  config.augment = ml_collections.ConfigDict()
  config.augment.enabled = True
  config.augment.rotation_deg = 180.0
  config.augment.shear_deg = 10.0
  config.augment.zoom = 0.1
  config.augment.shift = 0.1
  config.augment.flip = True
  config.augment.brightness = 0.1
  config.augment.contrast = 0.1
  config.augment.saturation = 0.1

  config.model = ml_collections.ConfigDict()
  # The backbone: "inception_resnet_v2" (the seed's), "efficientnet_b0" ... "efficientnet_b7" (what the
  # winning SIIM-ISIC 2020 solutions ensembled; native sizes 224, 240, 260, 300, 380, 456, 528, 600), or
  # "tiny": a few-layer CNN for smoke runs of the machinery. Every backbone takes the same [-1, 1] images.
  config.model.name = "inception_resnet_v2"
  # A Keras .h5 / .weights.h5 file of the backbone (no top or full), a converted directory
  # (python -m melanoma_jax.models.keras_weights), or "imagenet" (Keras' official weights of model.name,
  # downloaded; needs internet or Keras' file cache); "" = random init.
  config.model.init_weights = ""
  config.model.head_sizes = (512, 256, 64, 16)
  config.model.dropout_rate = 0.1
  config.model.dtype = "bfloat16"  # Compute dtype; parameters, BatchNorm statistics and the loss stay float32.
  # Recompute residual blocks in the backward pass: 1024x1024 x 16 per device in 11.9 GiB instead of 21.7
  # (bfloat16, measured on an H100), costing 16% of the throughput; False on devices with 24 GiB or more.
  config.model.remat = True
  # "auto": the kernels tuned for XLA:CPU on a CPU (1x1 convolutions as dots, im2col kernel gradients,
  # one-pass max-pool gradient, materialised residual outputs), XLA's plain ops elsewhere; "cpu" or
  # "xla" to force one. Same values either way (models/kernels.py).
  config.model.kernels = "auto"

  # A linear ramp lr_start -> lr_max over warmup_epochs, then "seed": lr *= decay each epoch towards lr_min
  # (the seed notebook's), or "warmup_cosine": cosine decay to zero at num_epochs (the 1st-place
  # solution's; raising num_epochs on a rerun stretches the cosine from where the run stands).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adam"  # "adam" or "adamw"
  config.optimizer.schedule = "seed"
  config.optimizer.lr_start = 1e-5
  config.optimizer.lr_max = 5e-5 * 8
  config.optimizer.lr_min = 1e-5
  config.optimizer.warmup_epochs = 5
  config.optimizer.decay = 0.8
  config.optimizer.weight_decay = 0.0
  config.optimizer.grad_clip_norm = 1.0
  config.freeze_backbone_epochs = 1  # Head-only epochs before fine-tuning everything.

  config.log_every_steps = 50
  config.checkpoints_to_keep = 3
  # Views averaged at prediction time: 1 (none), 2 (+ horizontal flip), 3 (+ vertical flip, this project's
  # default since its first runs, recorded as True by runs before views were counted), 8 (every flip and
  # transpose, the 1st-place solution's).
  config.tta = 3
  # "melanoma": one malignant logit (the seed's); "diagnosis": a softmax over the ISIC 2019 classes (MEL,
  # NV, BCC, AK, BKL, DF, VASC, SCC, UNK; 2020's diagnoses mapped onto them, data/diagnosis.py) with a
  # class weight each, read as p(MEL) everywhere a probability is used (the 1st place's target).
  config.target = "melanoma"
  # Built ISIC archive sets (`python -m melanoma_jax.data.isic_archive` prints each one's directory),
  # comma-separated, added to every fold's training images only; "" = none.
  config.extra_data = ""

  config.synthetic = ml_collections.ConfigDict()
  config.synthetic.num_patients = 0  # Patients of the real metadata to draw (0 = the generator's default).
  config.synthetic.seed = 0
  config.synthetic.image_size = 0  # Size the images are drawn at (0 = config.image_size).
  # 0..1: the share of melanomas drawn as the patient's "ugly duckling": a typical mole in another patient's
  # style, unremarkable alone (configs/ensemble_demo.py sets 1).
  config.synthetic.ugly_duckling = 0.0
  config.synthetic.generator = "dermoscopy"  # Or "plain": flat lesions on one skin colour (needs ugly_duckling 1).
  return config
