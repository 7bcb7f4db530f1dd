"""Images/s of serving: the predict command's in-process path, the SavedModel and ONNX exports, against Keras 3.

Five ways to get probabilities for a batch of encoded JPEGs from the same network (MelanomaClassifier:
InceptionResNetV2 + the 512-256-64-16 head, random weights, inference mode, no TTA):
* jax: what `python -m melanoma_jax.predict` runs per batch: each JPEG through `images.Reader` (the pipeline's
  decode, resize and scaling), then `image.TrainedModel.score` (the run's pmapped predict step);
* saved_model: the SavedModel `python -m melanoma_jax.export` writes (jax2tf, lowered for the CPU),
  loaded with `tf.saved_model.load` and called on the JPEG bytes (decoding inside the graph);
* keras: `keras.applications.InceptionResNetV2(include_top=False, weights=None, pooling='avg')` + the same
  head (benchmarks/train_step.py's `keras_model`) on the TensorFlow backend, `model.predict` on the already
  decoded and scaled images (so Keras is not charged for decoding; `decode_ms` says what that costs);
* onnx_fp32: the ONNX model `python -m melanoma_jax.export --format=onnx` writes (the network's Keras twin
  through Keras' ONNX export), in ONNX Runtime on the same decoded images as Keras;
* onnx_int8: that model after the export's static QDQ int8 quantization (calibrated here on as many random images
  as the export would use: the speed is what is measured; its AUC is measured by the export on a run's
  validation fold);
* with --bf16, jax_bf16: the predict command's path with `--dtype=bfloat16` (the same float32 weights, computed
  in bfloat16: on a CPU with AMX / AVX512-BF16 its spatial convolutions run as bfloat16 matrix products,
  `kernels.bf16_dots`), and keras_bf16: the Keras model under Keras' `mixed_bfloat16` policy (oneDNN's
  bfloat16 kernels), `model.predict` on the decoded images.
Every side uses every core (`threads`: XLA, TensorFlow and ONNX Runtime each run that many). ONNX fp32 is
checked against the JAX path on the timed batch (`onnx_fp32_max_abs_diff_vs_jax`, within 1e-4 to count as
correct); int8's difference is reported, not required. `batch1_latency_ms`: the median time of one image
per call, the sides taking turns (the JAX path pads it to one image per local device, as the server does).
All run in this process; after each has run once (compilation, reported apart), they take turns
(`--rounds` x `--steps` batches each), so they see the same machine load.

  .venv/bin/python benchmarks/serve.py                          # 299x299, batch 16
  .venv/bin/python benchmarks/serve.py --size 150 --rounds 2 --steps 1 --out r.json

The last line printed is one JSON object (images/s; ratio = ours / Keras, > 1 means ours is faster).
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ["KERAS_BACKEND"] = "tensorflow"  # Keras 3 reads it once, at import.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--global_batch", type=int, default=16)
  parser.add_argument("--rounds", type=int, default=3, help="turns each side takes")
  parser.add_argument("--steps", type=int, default=2, help="timed batches per side per round")
  parser.add_argument("--latency_calls", type=int, default=5, help="batch-1 calls per side")
  parser.add_argument("--no_int8", action="store_true", help="leave out the int8 model")
  parser.add_argument("--bf16", action="store_true", help="add our bfloat16 path and Keras' mixed_bfloat16")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  return parser.parse_args(argv)


def jpeg_batch(global_batch, size):
  """`global_batch` JPEGs (quality 90) of random pixels, size x size."""
  from melanoma_jax.data.synthetic import encode_jpeg  # pylint: disable=g-import-not-at-top
  pixels = ((common.random_images(global_batch, size) + 1.0) * 127.5).astype(common.np.uint8)
  return [encode_jpeg(p) for p in pixels]


def contenders(args, jpegs, workdir):
  """{name: one batch -> probabilities}, each already run once; and the first calls' seconds."""
  from configs import image as image_config  # pylint: disable=g-import-not-at-top
  from melanoma_jax import image  # pylint: disable=g-import-not-at-top
  from melanoma_jax.image import setup  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import images, onnx_export, tf_export  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.tf_host import tf  # pylint: disable=g-import-not-at-top
  import train_step  # pylint: disable=g-import-not-at-top
  tf_ = tf()
  config = image_config.get_config()
  config.image_size, config.global_batch_size, config.tta = args.size, args.global_batch, False
  run = setup.resolve(config)
  model = run.build_model()
  # The predict command's own path (image.TrainedModel.score) with filled weights instead of a checkpoint.
  predictor = image.TrainedModel("", run, model, common.filled_variables(model, args.size), 0, 0)
  reader = images.Reader(args.size)

  def jax_path(model=predictor):
    return model.score(images.stack([reader.decode(b) for b in jpegs], args.size)).probabilities

  start = time.perf_counter()
  tf_export.export(predictor, os.path.join(workdir, "saved_model"), {"benchmark": True}, platforms=("cpu",))
  export_s = time.perf_counter() - start
  serve = tf_.saved_model.load(os.path.join(workdir, "saved_model")).signatures["serving_default"]
  batch = tf_.constant(jpegs)
  saved_model_path = lambda: serve(image_bytes=batch)["probability"].numpy()

  keras = train_step.keras_model(args.size, "float32")
  decoded = images.stack([reader.decode(b) for b in jpegs], args.size)
  keras_path = lambda: keras.predict(decoded, batch_size=args.global_batch, verbose=0)

  fp32 = onnx_export.write_onnx(run.model_name, predictor.variables, args.size, False, os.path.join(workdir, "m.onnx"))
  threads = os.cpu_count()
  fp32_session = onnx_export.session(fp32, threads)
  sides = {"jax": jax_path, "saved_model": saved_model_path, "keras": keras_path,
           "onnx_fp32": lambda: onnx_export.probabilities(fp32_session, decoded, args.global_batch)}
  if args.bf16:
    import keras as keras_lib  # pylint: disable=g-import-not-at-top
    config.model.dtype = "bfloat16"
    run_bf16 = setup.resolve(config)
    bf16 = image.TrainedModel("", run_bf16, run_bf16.build_model(), predictor.variables, 0, 0)
    sides["jax_bf16"] = lambda: jax_path(bf16)
    keras_bf16 = train_step.keras_model(args.size, "bfloat16")  # Sets the global policy: built last.
    keras_lib.mixed_precision.set_global_policy("float32")
    sides["keras_bf16"] = lambda: keras_bf16.predict(decoded, batch_size=args.global_batch, verbose=0)
  # The JAX side at its smallest compiled size (one image per local device), as the server pads a lone image.
  batch1 = {"jax": lambda: predictor.score(decoded[:1], batch=common.jax.local_device_count()).probabilities,
            "saved_model": lambda: serve(image_bytes=batch[:1])["probability"].numpy(),
            "keras": lambda: keras.predict(decoded[:1], batch_size=1, verbose=0),
            "onnx_fp32": lambda: onnx_export.probabilities(fp32_session, decoded[:1])}
  if not args.no_int8:
    int8 = os.path.join(workdir, "m.int8.onnx")
    int8_method = onnx_export.quantize_int8(fp32, int8, common.random_images(onnx_export.calibration_count(args.size),
                                                                             args.size, seed=1))
    int8_session = onnx_export.session(int8, threads)
    sides["onnx_int8"] = lambda: onnx_export.probabilities(int8_session, decoded, args.global_batch)
    batch1["onnx_int8"] = lambda: onnx_export.probabilities(int8_session, decoded[:1])
  first = {}
  for name, fn in sides.items():
    common.log(f"{name}: first batch (compiling) ...")
    first[name], _ = common.timed(fn)
    common.log(f"{name}: first batch {first[name]:.1f} s")
  decode_s = statistics.median(common.timed(lambda: [reader.decode(b) for b in jpegs])[0] for _ in range(3))
  reference = np.asarray(jax_path(), np.float64)
  diffs = {f"{n}_max_abs_diff_vs_jax": float(np.max(np.abs(np.asarray(sides[n](), np.float64).reshape(-1) - reference)))
           for n in sides if n.startswith("onnx")}
  return sides, batch1, first, export_s, decode_s, dict(diffs, threads=threads,
                                                       int8_calibration=None if args.no_int8 else int8_method)


def main(argv=None):
  args = parse_args(argv)
  common.reexec_with_malloc_tunables(True)
  jpegs = jpeg_batch(args.global_batch, args.size)
  with tempfile.TemporaryDirectory(prefix="serve_bench_") as workdir:
    sides, batch1, first, export_s, decode_s, facts = contenders(args, jpegs, workdir)
    times = {name: [] for name in sides}
    for r in range(args.rounds):
      for name, fn in sides.items():
        times[name] += [common.timed(fn)[0] for _ in range(args.steps)]
      common.log(f"round {r + 1}/{args.rounds}: " + ", ".join(
          f"{n} {args.global_batch / statistics.median(t):.3f} img/s" for n, t in times.items()))
    latency = {name: [] for name in batch1}
    for fn in batch1.values():  # A new batch shape retraces Keras and the SavedModel: not part of the latency.
      fn()
    for _ in range(args.latency_calls):
      for name, fn in batch1.items():
        latency[name].append(common.timed(fn)[0])
  rate = {name: common.throughput(args.global_batch, t) for name, t in times.items()}
  # bfloat16 sides round differently from the float32 network: compared apart, never the "fastest correct".
  correct = [n for n in rate if not n.endswith("_bf16")
             and (not n.startswith("onnx") or facts.get(f"{n}_max_abs_diff_vs_jax", 1) <= 1e-4)]
  fastest = max(correct, key=rate.get)
  result = {"name": "serve", "size": args.size, "global_batch": args.global_batch, "rounds": args.rounds,
            "steps": args.steps, "machine": common.machine(), "devices": common.jax.local_device_count(),
            **{f"{n}_images_per_s": round(r, 4) for n, r in rate.items()},
            "ratio_jax_vs_keras": round(rate["jax"] / rate["keras"], 3),
            "ratio_saved_model_vs_keras": round(rate["saved_model"] / rate["keras"], 3),
            **{f"ratio_{n}_vs_keras": round(rate[n] / rate["keras"], 3) for n in rate if n.startswith("onnx")},
            **({"ratio_jax_bf16_vs_keras": round(rate["jax_bf16"] / rate["keras"], 3),
                "ratio_jax_bf16_vs_keras_bf16": round(rate["jax_bf16"] / rate["keras_bf16"], 3),
                "ratio_jax_bf16_vs_jax": round(rate["jax_bf16"] / rate["jax"], 3)} if args.bf16 else {}),
            "fastest_correct": fastest, "ratio_fastest_correct_vs_keras": round(rate[fastest] / rate["keras"], 3),
            "batch1_latency_ms": {n: round(1000 * statistics.median(t), 1) for n, t in latency.items()},
            **{k: (round(v, 7) if isinstance(v, float) else v) for k, v in facts.items()},
            "first_batch_s": {n: round(s, 1) for n, s in first.items()}, "export_s": round(export_s, 1),
            "decode_ms": round(1000 * decode_s, 1)}
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
