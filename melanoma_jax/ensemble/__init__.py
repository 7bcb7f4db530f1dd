"""The patient-level ensemble: K-fold image models, image context among a patient's images, fusion with the
metadata and out-of-fold calibration (task.py orchestrates; context.py, fusion.py, embed.py do one job each)."""
