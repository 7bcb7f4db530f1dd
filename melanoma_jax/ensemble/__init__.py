"""The patient-level ensemble: K-fold image models, image context among a patient's images, fusion with the
metadata and out-of-fold calibration.

Public modules: `task` (train/predict/train_table, main.py's ensemble task), `outputs` (the fold models'
out-of-fold and test scores, as their image runs kept them), `context` (image context among a patient's
images), `fusion` (the stage models, fitted out of fold), `fitted` (the fitted second stage, saved in a form
that runs no code when loaded).
"""
