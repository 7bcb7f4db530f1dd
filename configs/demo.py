"""The demo: synthetic lesions on the real ISIC 2020 metadata, small images, random init, a few minutes on CPU.

  python main.py --config=configs/demo.py --workdir=runs/demo     (what `make demo` runs)
"""
from configs import image


def get_config():
  config = image.get_config()
  config.data_dir = ""  # Generate the synthetic set into WORKDIR/data.
  config.image_size = 75
  config.per_device_batch_size = 64
  config.num_epochs = 3
  config.oversample_share = 0.2
  # As the seed: only the head trains, on a frozen (here randomly initialised) backbone. Forward-only
  # backbone passes make this about 10x cheaper than fine-tuning on a CPU, and random InceptionResNetV2
  # features already carry the colour, size and border cues of the synthetic lesions.
  config.freeze_backbone_epochs = config.num_epochs
  config.model.init_weights = ""
  config.model.dtype = "float32"
  config.model.remat = False
  config.optimizer.lr_start = 1e-3
  config.optimizer.lr_max = 1e-3
  config.optimizer.lr_min = 2e-4
  config.optimizer.warmup_epochs = 0
  config.optimizer.decay = 0.5
  config.log_every_steps = 10
  config.tta = 1
  config.synthetic.num_patients = 0
  return config
