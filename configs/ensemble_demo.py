"""The ensemble demo: the image demo's settings (configs/demo.py) on every fold of an ugly-duckling synthetic
set, where a melanoma looks like some patient's benign mole, only not like its own patient's; image-only
AUC is near 0.5 and only the patient context finds it. CPU-sized.

  python main.py --config=configs/ensemble_demo.py --workdir=runs/ensemble_demo     (what `make ensemble-demo` runs)
"""
from configs import demo
from configs import ensemble


def get_config():
  config = demo.get_config()
  config.task = "ensemble"
  config.synthetic.ugly_duckling = 1.0
  # One epoch: the demo's backbone stays frozen (random init), so the embeddings the context is built from
  # do not change with training; five fold models then fit the 15-minute CPU budget.
  config.num_epochs = 1
  config.freeze_backbone_epochs = 1
  config.ensemble = ensemble.get_config().ensemble
  return config
