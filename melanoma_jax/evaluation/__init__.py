"""Evaluation of predictions, separate from training (as big_vision's evaluators are).

Public modules and names:
  metrics       `roc_auc`: the one AUC of the project (exact, ties counted half).
  roc           `save_roc`: the ROC curve PNG.
  calibration   `logit`, `sigmoid`, `fit_platt`, `PlattCalibrator`: the one Platt calibrator.
  clinical      `write_report`, `with_context`, `summary`, `CONTEXT_COLUMNS` and the pure metric functions:
                the clinical report (report.json + report.html, rendered by `clinical_html.render`).
"""
from melanoma_jax.evaluation.calibration import PlattCalibrator
from melanoma_jax.evaluation.metrics import roc_auc

__all__ = ["PlattCalibrator", "roc_auc"]
