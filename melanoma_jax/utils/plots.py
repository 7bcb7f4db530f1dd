"""Pictures for people who would rather look than read."""
import numpy as np


def save_roc(targets, predictions, path, title="Validation ROC"):
  """Draws the ROC curve with its AUC into a PNG and returns the AUC."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  from sklearn import metrics  # pylint: disable=g-import-not-at-top

  targets = np.asarray(targets)
  predictions = np.asarray(predictions)
  fpr, tpr, _ = metrics.roc_curve(targets, predictions)
  auc = metrics.roc_auc_score(targets, predictions)
  fig, ax = plt.subplots(figsize=(5, 5))
  ax.plot(fpr, tpr, lw=2, label=f"AUC = {auc:.4f} (n = {len(targets)}, {int(targets.sum())} positive)")
  ax.plot([0, 1], [0, 1], "k--", lw=1)
  ax.set(xlabel="False positive rate", ylabel="True positive rate", title=title, xlim=(0, 1), ylim=(0, 1.01))
  ax.legend(loc="lower right")
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return float(auc)
