"""The model server behind `python -m melanoma_jax.serve`: a trained workdir over HTTP.

Modules, one job each: `model` (`ServedModel`: the workdir's predictor from `inference.loading`, image bytes
checked and preprocessed by `inference.images`, the patient view and saliency), `protocol` (request bodies of
the TF Serving REST API, the Open Inference Protocol v2 and the patient endpoint -> images; `ApiError`),
`batching` (`Batcher`: concurrent requests scored together on one model thread, a bounded queue), `metrics`
(Prometheus), `page` (the review page), `app` (`create_app`, `Runtime`, `Settings`: routes and the guard).
"""
from melanoma_jax.serving.app import create_app
from melanoma_jax.serving.app import Runtime
from melanoma_jax.serving.app import Settings
from melanoma_jax.serving.metrics import Metrics
from melanoma_jax.serving.model import ServedModel

__all__ = ["Metrics", "Runtime", "ServedModel", "Settings", "create_app"]
