"""Images/s of inference (the prediction step of `--mode=predict`), without and with flip TTA.

The step is prediction's `steps.p_predict(steps.make_predict_step(model, tta))`: MelanomaClassifier
(`--model`: InceptionResNetV2 or an EfficientNet B0-B7) in inference mode, sigmoid, pmapped over all local
devices; with TTA it averages the original and the two flipped views (3 forwards per image). Compile time
is reported apart from the steady state.

  .venv/bin/python benchmarks/eval_step.py                          # 299x299, global batch 16, float32
  .venv/bin/python benchmarks/eval_step.py --size 1024 --dtype bfloat16 --out r.json
  .venv/bin/python benchmarks/eval_step.py --model efficientnet_b3 --size 300

The last line printed is one JSON object (images/s).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from melanoma_jax.models import build_model, CLASSIFIERS, DTYPES, KERNELS  # pylint: disable=wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--model", choices=CLASSIFIERS, default="inception_resnet_v2", help="the backbone")
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--global_batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=4, help="timed steps per setting")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
  parser.add_argument("--kernels", choices=KERNELS, default="auto",
                      help="the XLA:CPU workarounds (models/kernels.py; auto = cpu on the CPU backend)")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  return parser.parse_args(argv)


def measure(model, state, images, tta, steps):
  """(compile seconds, steady-state images/s) of the predict step."""
  from melanoma_jax.training import steps as steps_lib  # pylint: disable=g-import-not-at-top
  predict = steps_lib.p_predict(steps_lib.make_predict_step(model, tta=tta))
  batch = steps_lib.shard_batch({"x": images})
  first_s, _ = common.timed(lambda: predict(state, batch))
  times = [common.timed(lambda: predict(state, batch))[0] for _ in range(steps)]
  return first_s, common.throughput(len(images), times)


def main(argv=None):
  args = parse_args(argv)
  common.reexec_with_malloc_tunables(True)
  jax = common.jax
  model = build_model(args.model, dtype=args.dtype, kernels=args.kernels)
  state = common.train_state(model, args.size, args.global_batch)
  images = common.random_images(args.global_batch, args.size)
  result = {"name": "eval_step", "model": args.model, "size": args.size, "global_batch": args.global_batch,
            "dtype": args.dtype, "kernels": args.kernels, "machine": common.machine(),
            "devices": jax.local_device_count()}
  for tta in (False, True):
    label = "tta" if tta else "plain"
    common.log(f"{label}: compiling ...")
    compile_s, rate = measure(model, state, images, tta, args.steps)
    common.log(f"{label}: compile {compile_s:.1f} s, {rate:.2f} images/s")
    result[f"images_per_s_{label}"] = round(rate, 3)
    result[f"compile_s_{label}"] = round(compile_s, 1)
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
