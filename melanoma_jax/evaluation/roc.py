"""The ROC curve as a PNG, for people who would rather look than read."""
import numpy as np

from melanoma_jax.evaluation import metrics
from melanoma_jax.utils import files


def save_roc(targets, predictions, path, title="Validation ROC"):
  """Draws the ROC curve and its AUC (`metrics.roc_auc`) into the PNG `path` (atomically); returns the AUC."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from sklearn.metrics import roc_curve  # pylint: disable=g-import-not-at-top

  targets, predictions = np.asarray(targets), np.asarray(predictions)
  auc = metrics.roc_auc(targets, predictions)
  fpr, tpr, _ = roc_curve(targets, predictions)
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.4f} (n = {len(targets)}, {int(targets.sum())} positive)")
  ax.plot([0, 1], [0, 1], "k--", lw=1)
  ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
  ax.legend(loc="lower right")
  fig.tight_layout()
  with files.atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=100, format="png")
  plt.close(fig)
  return auc
