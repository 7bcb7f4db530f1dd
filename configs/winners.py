"""The 1st-place SIIM-ISIC 2020 single-model recipe (Ha, Liu, Liu), as far as this project has its parts.

EfficientNet-B3 with ImageNet weights at 512x512, a softmax over the ISIC 2019 diagnosis classes read as
p(MEL), Adam at 3e-5 after one warm-up epoch then cosine to zero, 15 epochs, the 8 flip/transpose views
at prediction. The write-up's figures (its ensemble: CV AUC 0.960, private LB 0.949; about +0.01 AUC from
the diagnosis target, +0.03 from the 2019 archive, 0.02 lost without the warm-up, in an independent re-run)
need the real images and the ISIC 2019 archive; neither is offline here, so this project reproduces none
of them yet. Build the 2019 set first (docs/data.md), then pass the directory the build printed:

  python -m melanoma_jax.data.isic_archive --year=2019 --image_size=512 --manual_dir=downloads \
      --data_dir=tfds_data
  python main.py --config=configs/winners.py --workdir=runs/b3_512 --config.data_dir=melanoma-512x512 \
      --config.extra_data=tfds_data/isic_archive/2019_512/1.0.0
"""
from configs import image


def get_config():
  config = image.get_config()
  config.image_size = 512
  config.per_device_batch_size = 8
  config.num_epochs = 15
  config.target = "diagnosis"
  config.oversample_share = 0.0  # The class weights balance the diagnosis classes instead.
  config.freeze_backbone_epochs = 0
  config.model.name = "efficientnet_b3"
  config.model.init_weights = "imagenet"
  config.model.remat = False
  config.optimizer.schedule = "warmup_cosine"
  config.optimizer.lr_start = 3e-6
  config.optimizer.lr_max = 3e-5
  config.optimizer.warmup_epochs = 1
  config.optimizer.grad_clip_norm = 0.0
  config.tta = 8
  return config
