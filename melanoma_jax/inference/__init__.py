"""Inference for users: a trained workdir -> predictions on image files, saliency maps, a TF SavedModel.

Every model here is reached through the image package's seam (`image.load_best` -> `image.TrainedModel`),
never a task's internals. Public modules, one job each: `loading` (`load_predictor`, `kind_of`: a workdir
-> a TrainedModel or an `ensemble.EnsemblePredictor`), `ensemble` (fold models + the fitted stages),
`images` (image files -> the model inputs the run's own evaluation makes), `limits` (size, format and pixel
checks from an image's header, before decoding, in TF for predict and the SavedModel alike), `preds_csv`
(the predict CSV: quoted, spreadsheet-safe names), `metadata` (the --metadata CSV),
`saliency` (Grad-CAM and SmoothGrad through the Flax model, and their figure), `tf_export` (the jax2tf
SavedModel), `outputs` (where these commands may write: never over inputs, the run or others' files). The
command lines are `melanoma_jax.predict` and `melanoma_jax.export`.
"""
