"""A trained image model: the one seam through which anything scores with an image run's best checkpoint.

`load_best(workdir)` reads the config the run recorded (no --config: `identity.recorded_config`), resolves
it, builds its model and restores the best checkpoint's model variables alone (parameters and BatchNorm
statistics: the optimizer is never built and its state never read) into a `TrainedModel`.

Scoring goes through one compiled predict step per (model, TTA, embeddings) choice, batched over this
process's devices as the run's own evaluation is:
  * `TrainedModel.score(images, embeddings=False)`: model inputs (float32 [N, S, S, 3] in [-1, 1]) ->
    `Scores` (probabilities; with `embeddings`, the pooled backbone features too);
  * `score_split(step, weights, pipeline, dataset, ...)`: every image of a table's records exactly once, in
    the table's order; with several processes, each scores its share and every process gets all rows. The
    fit loop's validation (with the training state) and the task's prediction (with a TrainedModel) use it.

The image task keeps what its prediction scored, the validation fold's and the test images' probabilities
and embeddings with the checkpoint step and TTA setting they came from, in WORKDIR/scores.npz
(`RunScores`), so the ensemble and a rerun of a finished run read them instead of scoring again.
"""
import dataclasses
import os
import zipfile
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from melanoma_jax.data import pipeline as pipeline_lib
from melanoma_jax.image import setup
from melanoma_jax.training import checkpoint as checkpoint_lib
from melanoma_jax.training import distributed, identity, loop, results
from melanoma_jax.training import predict as predict_lib
from melanoma_jax.training import steps
from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

CHECKPOINTS = "checkpoints"
SCORES = "scores.npz"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelWeights:
  """What the predict step reads of a train state (`state.model_variables`), without the optimizer."""
  params: Any
  batch_stats: Any


@dataclasses.dataclass(frozen=True)
class Scores:
  """Scored images: probabilities (of melanoma) float64 [N]; embeddings float32 [N, F] or None; names and
  targets when they came from records; a diagnosis model's class probabilities [N, K] with embeddings."""
  probabilities: np.ndarray
  embeddings: Optional[np.ndarray] = None
  names: Optional[list] = None
  targets: Optional[np.ndarray] = None
  classes: Optional[np.ndarray] = None


def predict_step(model, tta, embeddings):
  """The pmapped predict step of `model`: [devices, per_device] probabilities, or [.., 1 + F] with embeddings."""
  return steps.p_predict(steps.make_predict_step(model, tta=tta, embeddings=embeddings))


def _split_outputs(outputs, embeddings, num_classes=1):
  """(probabilities, embeddings, class probabilities) of a predict step's outputs (steps.make_predict_step)."""
  if not embeddings:
    return outputs.reshape(-1), None, None
  first = 1 + (num_classes if num_classes > 1 else 0)
  classes = outputs[:, 1:first] if num_classes > 1 else None
  return outputs[:, 0], outputs[:, first:].astype(np.float32), classes


def score_split(p_step, weights, pipeline, dataset, record_files, table_names, what, embeddings=False,
                num_classes=1) -> Scores:
  """Scores of every image of `table_names` (the validation rows or test.csv) exactly once, in the table's
  order, from `dataset` of `pipeline`; `p_step` is a `predict_step(..., embeddings)` of a model with
  `num_classes` outputs and `weights` a train state or `ModelWeights`. With several processes, every process's share is gathered (the same in every
  process). Refuses records missing from or extra to the table."""
  out = predict_lib.collect(p_step, weights, pipeline.device_batches(dataset, record_files), what)
  position = {n: i for i, n in enumerate(table_names)}
  names = out.get("names", [])
  rows = distributed.gather_rows({  # Names travel as positions in the table every process holds.
      "index": np.array([position.get(n, -1) for n in names], np.int32),
      "outputs": out["outputs"].astype(np.float32).reshape((len(names),) + out["outputs"].shape[1:]),
      "targets": np.asarray(out.get("targets", np.zeros(len(names))), np.float32)})
  source = record_files[0] if record_files else ""
  pipeline_lib.count_check(len(rows["index"]), len(table_names), what, source, skip_corrupt=pipeline.skip_corrupt)
  index = rows["index"]
  if len(set(index.tolist())) != len(index):
    raise InputError(f"{source}: {what} records hold duplicate image names")
  if (index < 0).any():
    raise InputError(f"{source}: {what} records hold {int((index < 0).sum())} image(s) its CSV lacks")
  order = np.argsort(index, kind="stable")
  probabilities, features, classes = _split_outputs(rows["outputs"][order].astype(np.float64), embeddings,
                                                    num_classes)
  return Scores(probabilities, features, [table_names[i] for i in index[order]],
                rows["targets"][order].astype(np.float64), classes)


class TrainedModel:
  """An image run's best checkpoint, ready to score (see the module doc).

  `run` is the resolved run (`setup.ImageRun`); `model` the Flax module and `variables` its inference
  variables (BatchNorm uses the stored statistics), for saliency and export; `checkpoint_step` and `epoch`
  say which checkpoint this is.
  """

  engine = "jax"  # Beside inference.onnx_predictor's "onnx": how the model server tells them apart.

  def __init__(self, workdir, run, model, variables, checkpoint_step, epoch, unfinished=""):
    self.workdir, self.run, self.model, self.variables = workdir, run, model, variables
    self.checkpoint_step, self.epoch = int(checkpoint_step), int(epoch)
    self.unfinished = unfinished  # Why the run is not finished ("" when it is): see `unfinished_reason`.
    self.weights = steps.replicate(ModelWeights(variables["params"], variables.get("batch_stats", {})))
    self._compiled = {}

  @property
  def image_size(self):
    return self.run.image_size

  @property
  def tta(self):
    return self.run.tta

  @property
  def global_batch(self):
    return self.run.global_batch

  @property
  def num_classes(self):
    return int(self.run.model_kwargs.get("num_classes", 1))

  @property
  def description(self):
    dtype = self.run.compute_dtype
    return (f"{self.run.model_name} {self.image_size}x{self.image_size}"
            f"{', computing in ' + dtype if dtype != 'float32' else ''}, best checkpoint of epoch {self.epoch} "
            f"(step {self.checkpoint_step}){f', TTA over {self.tta} views' if self.tta > 1 else ''}")

  def predict_step(self, embeddings=False):
    """The compiled predict step (one per choice, built on first use)."""
    if embeddings not in self._compiled:
      self._compiled[embeddings] = predict_step(self.model, self.tta, embeddings)
    return self._compiled[embeddings]

  def score(self, images, embeddings=False, batch=None) -> Scores:
    """Scores of model inputs `images` (float32 [N, S, S, 3] in [-1, 1]; N = 0 gives empty scores), in
    batches of `batch` rows (default the run's global batch; a multiple of this machine's device count), the
    last one padded: each batch size is one compiled shape."""
    images = np.asarray(images, np.float32)
    if len(images) == 0:
      return Scores(np.zeros(0), np.zeros((0, 0), np.float32) if embeddings else None)
    out = predict_lib.collect(self.predict_step(embeddings), self.weights,
                              predict_lib.array_batches(images, batch or self.global_batch), "predictions")["outputs"]
    probabilities, features, classes = _split_outputs(out, embeddings, self.num_classes)
    return Scores(probabilities, features, classes=classes)

  def score_split(self, pipeline, dataset, record_files, table_names, what, embeddings=False) -> Scores:
    return score_split(self.predict_step(embeddings), self.weights, pipeline, dataset, record_files, table_names,
                       what, embeddings, self.num_classes)


def checkpointer(run, workdir):
  """The run's checkpoints (the latest few and the best by validation AUC)."""
  return checkpoint_lib.Checkpointer(os.path.join(workdir, CHECKPOINTS), monitor="val_auc",
                                     max_to_keep=run.checkpoints_to_keep)


def recorded_run(workdir, tta: Optional[int] = None, dtype: Optional[str] = None) -> setup.ImageRun:
  """The resolved run `workdir` recorded (`tta` None: its own setting, else a number of views as
  `config.tta` takes it; `dtype` None: its compute dtype, else "float32" or "bfloat16"), its batch filling
  this machine's devices whatever split of the global batch training used."""
  overrides = {"tta": tta} if tta is not None else {}
  if dtype is not None:
    overrides["model.dtype"] = dtype
  config = identity.recorded_config(workdir, overrides)
  config.global_batch_size = 0
  try:
    return setup.resolve(config)
  except (AttributeError, KeyError) as e:
    raise InputError(f"{workdir}: the recorded config lacks {e}; it was made by another version") from None


def unfinished_reason(workdir, latest_meta, num_epochs):
  """Why the run in `workdir` has not finished training, or "": a run writes results.json when it ends, and
  its latest checkpoint then holds every epoch (or an early stop)."""
  epoch = "?" if latest_meta is None else latest_meta["epoch"]
  if not os.path.exists(os.path.join(workdir, results.NAME)):
    return f"training has not finished (no {results.NAME}; latest checkpoint: epoch {epoch})"
  if latest_meta is not None and not loop.is_finished(latest_meta, num_epochs):
    return f"training has not finished (latest checkpoint: epoch {epoch} of {num_epochs})"
  return ""


def load_best(workdir, run: Optional[setup.ImageRun] = None, tta: Optional[int] = None,
              dtype: Optional[str] = None) -> TrainedModel:
  """The TrainedModel of the best checkpoint in `workdir` (`run` None: the run it recorded, see
  `recorded_run`); one-line InputError when there is none."""
  run = run or recorded_run(workdir, tta, dtype)
  directory = os.path.join(workdir, CHECKPOINTS)
  if not os.path.isdir(directory):  # Checked first: the checkpointer would create the folder.
    raise InputError(f"{directory}: no best checkpoint to predict with (train first)")
  manager = checkpointer(run, workdir)
  try:
    step = manager.best_step()
    if step is None:
      raise InputError(f"{directory}: no best checkpoint to predict with (train first)")
    # Before the model is built: an edited run.json names another model or size than the checkpoint's.
    identity.check_checkpoint(workdir, manager.read_meta(step), manager.step_dir(step))
    model = run.build_model()
    sample = jnp.zeros((1, run.image_size, run.image_size, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: model.init({"params": jax.random.PRNGKey(0)}, sample, train=False))
    abstract = {"params": abstract["params"], "batch_stats": abstract.get("batch_stats", {})}
    variables, meta = manager.restore_part(step, abstract)
    latest = manager.latest_step()
    latest_meta = manager.read_meta(latest) if latest is not None else None
  finally:
    manager.close()
  trained = TrainedModel(workdir, run, model, variables, step, meta["epoch"],
                         unfinished_reason(workdir, latest_meta, run.num_epochs))
  logging.info("%s: %s", workdir, trained.description)
  return trained


@dataclasses.dataclass(frozen=True)
class RunScores:
  """What an image run's prediction scored (WORKDIR/scores.npz): the validation fold and the test images,
  with the checkpoint step and TTA setting they came from."""
  checkpoint_step: int
  tta: int  # Views.
  val: Scores
  test: Scores

  def save(self, workdir):
    """Writes WORKDIR/scores.npz atomically (process 0; every process holds the same scores)."""
    if not distributed.is_primary():
      return
    arrays = {"checkpoint_step": np.int64(self.checkpoint_step), "tta": np.int64(self.tta)}
    for split, scores in (("val", self.val), ("test", self.test)):
      arrays.update({f"{split}_names": np.asarray(scores.names, str), f"{split}_targets": scores.targets,
                     f"{split}_probabilities": scores.probabilities, f"{split}_embeddings": scores.embeddings})
      if scores.classes is not None:
        arrays[f"{split}_classes"] = scores.classes
    with files.atomic_path(os.path.join(workdir, SCORES)) as tmp, open(tmp, "wb") as f:
      np.savez(f, **arrays)


def load_scores(workdir, checkpoint_step=None, tta=None) -> Optional[RunScores]:
  """WORKDIR/scores.npz, or None when missing, unreadable, or scored with another checkpoint step or TTA
  setting than those given."""
  try:
    with np.load(os.path.join(workdir, SCORES), allow_pickle=False) as saved:
      scores = RunScores(int(saved["checkpoint_step"]), setup.tta_views(saved["tta"].item()), *(
          Scores(saved[f"{s}_probabilities"], saved[f"{s}_embeddings"], saved[f"{s}_names"].tolist(),
                 saved[f"{s}_targets"], saved[f"{s}_classes"] if f"{s}_classes" in saved else None)
          for s in ("val", "test")))
  except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
    return None
  if checkpoint_step is not None and scores.checkpoint_step != checkpoint_step:
    return None
  if tta is not None and scores.tta != setup.tta_views(tta):
    return None
  return scores
