"""The patient-level ensemble on real data: the image recipe (configs/image.py) on every fold, then image
context, fusion with the metadata and calibration, all out of fold. Every image field overrides as in the
image task (--config.image_size=512); the ensemble's own fields live in `config.ensemble`.

  python main.py --config=configs/ensemble.py --workdir=runs/ensemble \
      --config.data_dir=siim-isic-melanoma-classification --config.model.init_weights=weights/irv2_notop
"""
import ml_collections

from configs import image


def get_config():
  config = image.get_config()
  config.task = "ensemble"
  # Synthetic sets only (data_dir ""): 1 draws every melanoma as a stranger's typical nevus (the ugly
  # duckling, found only by comparing a patient's images), 0 the ordinary set.
  config.synthetic.ugly_duckling = 0.0
  config.ensemble = ml_collections.ConfigDict()
  # Model families of each second stage (fusion.CANDIDATES); each stage keeps the best out-of-fold AUC.
  config.ensemble.candidates = ("hgb", "logistic")
  # Directions of the patients' "style" the image context measures distances in (context.fit_style).
  config.ensemble.style_components = 8
  return config
