"""The heavy half of tests/test_onnx.py, run by it in fresh processes (`python tests/onnx_worker.py COMMAND ...`):
Keras twins, tf2onnx, ONNX Runtime and int8 calibration never enter the pytest process, and each process's
memory is returned when it exits.

  ort MODEL X OUT        ONNX Runtime (and numpy) only: MODEL's probabilities of inputs X.npy -> OUT.npy.
  random OUT_DIR NAME:SIZE[:TTA:CLASSES] ...
                         Randomly initialised classifiers NAME (models.build_model) for SIZE-pixel images exported
                         (TTA views; CLASSES > 1: a diagnosis softmax): OUT_DIR/TAG{.onnx, .x.npy, .want.npy},
                         `want` the JAX path's probabilities of `x` (TAG: the spec, ":" as "_").
  exports WORKDIR OUT    The export command (--format=onnx --quantize=int8 --force) -> OUT/onnx; then the int8
                         export under a bound no model meets (--max_auc_drop=-1), refused -> OUT/refused and
                         forced -> OUT/forced; what happened -> OUT/bound.json.
"""
import json
import math
import os
import sys
import traceback

import numpy as np


def ort(model, x, out):
  import onnxruntime  # pylint: disable=g-import-not-at-top
  session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
  probabilities = session.run(["probability"], {"image": np.load(x)})[0]
  # What is compared is ONNX Runtime's alone: nothing of the exporting side was loaded here.
  loaded = sorted(m for m in ("tensorflow", "keras", "jax", "tf2onnx", "melanoma_jax") if m in sys.modules)
  assert not loaded, loaded
  np.save(out, probabilities)


def _random_variables(model, size):
  """Random variables of Flax `model` for `size`-pixel images: He-normal kernels, BatchNorm scales and variances
  in [0.8, 1.2], biases and means around 0 (random statistics: the network must use the stored ones). Drawn in
  numpy from the variables' shapes: `model.init` would run the whole initialiser op by op."""
  import jax  # pylint: disable=g-import-not-at-top
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), np.zeros((1, size, size, 3), np.float32),
                                             train=False))
  rng = np.random.default_rng(0)

  def draw(path, shape):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, math.sqrt(2 / math.prod(shape.shape[:-1])), shape.shape).astype(np.float32)
    if name in ("scale", "var"):
      return rng.uniform(0.8, 1.2, shape.shape).astype(np.float32)
    return rng.normal(0, 0.05, shape.shape).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def _measured_statistics(name, variables, size):
  """`variables` with BatchNorm statistics measured on 16 random images, variances + 0.01.

  For EfficientNet: under made-up statistics its activations fade block after block (swish and the squeeze-and-
  excitation gates halve them) and its output hardly depends on the image, so the comparison would mean little.
  The 0.01 keeps a channel that is nearly constant over the 16 images from amplifying float32 rounding."""
  import jax  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import backbones  # pylint: disable=g-import-not-at-top
  from melanoma_jax.models import efficientnet  # pylint: disable=g-import-not-at-top
  backbone = backbones.backbone(name, None, drop_connect_rate=0.0)
  own = {"params": variables["params"]["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}
  x = backbones.from_model_input(name, np.random.default_rng(2).uniform(-1, 1, (16, size, size, 3)).astype(np.float32))
  _, updated = jax.jit(lambda v, x: backbone.apply(v, x, train=True, mutable=["batch_stats"]))(own, x)
  momentum = efficientnet.BN_MOMENTUM  # A training step's update: momentum * old + (1 - momentum) * measured.
  measured = jax.tree_util.tree_map_with_path(
      lambda path, new, old: np.asarray((new - momentum * old) / (1 - momentum) + 0.01 * (path[-1].key == "var"),
                                        np.float32), updated["batch_stats"], own["batch_stats"])
  measured["normalization"] = own["batch_stats"]["normalization"]  # The input normalisation is not measured.
  return dict(variables, batch_stats={"backbone": measured})


def random_exports(out_dir, *specs):
  """`specs`: NAME:SIZE[:TTA:CLASSES] (TTA views, CLASSES outputs: 1 a logit, more a diagnosis softmax); writes
  OUT_DIR/TAG.onnx, TAG.x.npy, TAG.want.npy for each (TAG: the spec, ":" as "_"), or TAG.error.txt with the
  traceback (the other models are still exported)."""
  for spec in specs:
    name, size, tta, classes = (spec.split(":") + ["1", "1"])[:4]
    tag = spec.replace(":", "_")
    try:
      _random_export(name, int(size), int(tta), int(classes), out_dir, tag)
    except Exception:  # pylint: disable=broad-except
      with open(os.path.join(out_dir, f"{tag}.error.txt"), "w", encoding="utf-8") as f:
        f.write(traceback.format_exc())


def _random_export(name, size, tta, classes, out_dir, tag):
  from melanoma_jax import image, models  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  from melanoma_jax.training import steps  # pylint: disable=g-import-not-at-top
  model = models.build_model(name, **({"num_classes": classes} if classes > 1 else {}))
  x = np.random.default_rng(1).uniform(-1, 1, (3, size, size, 3)).astype(np.float32)
  variables = _random_variables(model, size)
  if name.startswith("efficientnet_"):
    variables = _measured_statistics(name, variables, size)
  weights = lambda: image.ModelWeights(variables["params"], variables["batch_stats"])
  if tta > 1 or classes > 1 or "logit" not in variables["params"]["head"]:
    want = np.asarray(steps.make_predict_step(model, tta=tta)(weights(), {"x": x}), np.float64)
  else:
    logits = np.asarray(steps.make_predict_step(model, logits=True)(weights(), {"x": x}), np.float64)
    # A deep random network's logits barely differ: the logit layer is rescaled to spread them over (0, 1). The
    # expected probabilities follow from the JAX logits (one compile of the network, not two).
    logit = variables["params"]["head"]["logit"]
    scale, bias = 2 / logits.std(), float(logit["bias"][0])
    logit["kernel"] = (logit["kernel"] * scale).astype(np.float32)
    logit["bias"] = np.full(1, -(logits.mean() - bias) * scale, np.float32)
    want = 1 / (1 + np.exp(-((logits - bias) * scale + float(logit["bias"][0]))))
  onnx_export.write_onnx(name, variables, size, tta, os.path.join(out_dir, f"{tag}.onnx"))
  np.save(os.path.join(out_dir, f"{tag}.x.npy"), x)
  np.save(os.path.join(out_dir, f"{tag}.want.npy"), want)


def exports(workdir, out):
  from absl import app  # pylint: disable=g-import-not-at-top
  from melanoma_jax import export  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import onnx_export  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils import cli  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  # The command line as users run it, in this process: the two exports below reuse what it imported.
  export._define_flags()  # pylint: disable=protected-access
  argv = ["export", f"--workdir={workdir}", "--format=onnx", f"--out={os.path.join(out, 'onnx')}",
          "--quantize=int8", "--force"]
  try:
    app.run(export.main, argv=argv, flags_parser=cli.parse_flags)
  except SystemExit as e:
    if e.code:
      raise
  sys.stdout.flush()
  refused, forced = os.path.join(out, "refused"), os.path.join(out, "forced")
  try:
    export.run(workdir, refused, fmt="onnx", quantize="int8", max_auc_drop=-1.0)
    refusal = None
  except InputError as e:
    refusal = str(e)
  written = sorted(os.listdir(out))
  export.run(workdir, forced, fmt="onnx", quantize="int8", max_auc_drop=-1.0, force=True)
  with open(os.path.join(forced, onnx_export.MARKER), encoding="utf-8") as f:
    record = json.load(f)["int8"]
  with open(os.path.join(out, "bound.json"), "w", encoding="utf-8") as f:
    json.dump({"refusal": refusal, "written_after_refusal": written, "forced": record}, f)


if __name__ == "__main__":
  if os.path.dirname(os.path.dirname(os.path.abspath(__file__))) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  {"ort": ort, "random": random_exports, "exports": exports}[sys.argv[1]](*sys.argv[2:])
