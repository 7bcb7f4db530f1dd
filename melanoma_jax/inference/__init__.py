"""Inference for users: a trained workdir -> predictions on image files, saliency maps, a TF SavedModel.

Modules, one job each: `loading` (a workdir -> a `Predictor`), `images` (image files -> the model inputs the
run's own evaluation makes), `saliency` (Grad-CAM and SmoothGrad through the Flax model, and their figure),
`tf_export` (the jax2tf SavedModel). The command lines are `melanoma_jax.predict` and `melanoma_jax.export`.
"""
