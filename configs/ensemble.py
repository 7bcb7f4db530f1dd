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
  # Image feature sets of the second stage's candidates (fusion.IMAGE_SETS: base, style, embedding, all),
  # each with and without the metadata, in each model family (fusion.FAMILIES: logistic, hgb).
  config.ensemble.feature_sets = ("base", "style", "embedding", "all")
  config.ensemble.families = ("logistic", "hgb")
  # How a stage chooses among its candidates out of fold (choice.RULES): "one_se" keeps the simplest within
  # one standard error of the best AUC, "best" the best.
  config.ensemble.choice = "one_se"
  # Directions of the patients' "style" the style geometry measures distances in (context.fit_space).
  config.ensemble.style_components = 8
  return config
