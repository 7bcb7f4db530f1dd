"""The image task: InceptionResNetV2 (or the tiny CNN) on TFRecords of one patient-grouped fold.

Public names (anything else in the package is internal to it):
  the task        `train(config, workdir)`, `predict(config, workdir)`, `train_table(config, workdir)`
  a trained run   `load_best(workdir) -> TrainedModel` (score model inputs, with embeddings when asked),
                  `load_scores(workdir) -> RunScores` (what the run's prediction scored), `Scores`,
                  `recorded_run(workdir)`, `ModelWeights` (a model's variables as the predict step reads them); modules: `setup` (the config boundary), `data`, `task`, `trained`.
"""
from melanoma_jax.image.task import predict
from melanoma_jax.image.task import train
from melanoma_jax.image.task import train_table
from melanoma_jax.image.trained import load_best
from melanoma_jax.image.trained import load_scores
from melanoma_jax.image.trained import ModelWeights
from melanoma_jax.image.trained import recorded_run
from melanoma_jax.image.trained import RunScores
from melanoma_jax.image.trained import Scores
from melanoma_jax.image.trained import TrainedModel

__all__ = ["ModelWeights", "RunScores", "Scores", "TrainedModel", "load_best", "load_scores", "predict", "recorded_run", "train",
           "train_table"]
