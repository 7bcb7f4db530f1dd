"""What each XLA:CPU workaround of the model is worth: the training step with all on against each one off.

The step is the one training runs and benchmarks/train_step.py times (`steps.p_train(steps.make_train_step(
...))` of MelanomaClassifier, Adam, float32, all local devices). It is compiled once for the "cpu" kernels
(the baseline: every workaround of `melanoma_jax.models.kernels.Kernels` on), once for each variant with
exactly one workaround off, and once for "xla" (all off), all in this one process and on one shared
state and batch (the variables are the same whatever the kernels). After every compilation and one
untimed step of each (a process's first steps run slower while its memory and threads warm up),
`--rounds` rounds each run every variant `--steps` steps, in an order that rotates from round to round,
so that a slow spell of a shared machine falls on all of them alike.

  .venv/bin/python benchmarks/cpu_kernels.py                    # 299x299, global batch 8
  .venv/bin/python benchmarks/cpu_kernels.py --size 512 --rounds 3 --out r.json

The last line printed is one JSON object: per variant its compile seconds, median seconds per step,
images/s, ratio = its step time / the baseline's (> 1: the workaround it turns off helps), and the seconds
of its untimed first step.
"""
import argparse
import contextlib
import dataclasses
import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
from melanoma_jax.models import conv  # pylint: disable=wrong-import-position
from melanoma_jax.models import kernels as kernels_lib  # pylint: disable=wrong-import-position

BASELINE = "cpu"


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--size", type=int, default=299)
  parser.add_argument("--global_batch", type=int, default=8)
  parser.add_argument("--rounds", type=int, default=5, help="rounds, each running every variant")
  parser.add_argument("--steps", type=int, default=2, help="steps per variant and round")
  parser.add_argument("--variants", default="",
                      help="comma-separated subset of the variants to time (the baseline always runs)")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  return parser.parse_args(argv)


# im2col_grad's own sub-choice: large kernel gradients accumulated image by image so the columns stay in
# cache. It has no Kernels flag; this variant compiles with the threshold out of reach.
NO_PER_IMAGE = "no_im2col_per_image"


@contextlib.contextmanager
def _variant_patch(name):
  if name != NO_PER_IMAGE:
    yield
    return
  saved = conv._PER_IMAGE_COLUMNS_BYTES  # pylint: disable=protected-access
  conv._PER_IMAGE_COLUMNS_BYTES = float("inf")  # pylint: disable=protected-access
  try:
    yield
  finally:
    conv._PER_IMAGE_COLUMNS_BYTES = saved  # pylint: disable=protected-access


def variants():
  """{name: Kernels}: the baseline (all on), each workaround off alone ("no_<flag>", and NO_PER_IMAGE), and
  "xla" (all off)."""
  result = {BASELINE: kernels_lib.CPU}
  for field in dataclasses.fields(kernels_lib.Kernels):
    result[f"no_{field.name}"] = dataclasses.replace(kernels_lib.CPU, **{field.name: False})
  result[NO_PER_IMAGE] = kernels_lib.CPU
  result["xla"] = kernels_lib.XLA
  return result


def main(argv=None):
  args = parse_args(argv)
  common.reexec_with_malloc_tunables(True)
  jax = common.jax
  kernels = variants()
  if args.variants:
    wanted = set(args.variants.split(","))
    unknown = wanted - set(kernels)
    if unknown:
      raise SystemExit(f"unknown --variants {sorted(unknown)}; known: {', '.join(kernels)}")
    kernels = {name: k for name, k in kernels.items() if name == BASELINE or name in wanted}
  # One state for all: each step takes the state the previous one returned (the step donates it).
  state = common.train_state(common.classifier(kernels=kernels[BASELINE]), args.size, args.global_batch)
  batch = common.train_batch(args.global_batch, args.size)
  compiled, compile_s = {}, {}
  for name, k in kernels.items():
    common.log(f"{name}: compiling ({args.size}x{args.size}, global batch {args.global_batch}) ...")
    with _variant_patch(name):
      compiled[name], compile_s[name] = common.compile_train_step(common.classifier(kernels=k), state, batch)
    common.log(f"{name}: compiled in {compile_s[name]:.1f} s")
  names = list(kernels)
  first_s = {}
  for name in names:
    first_s[name], (state, _) = common.timed(functools.partial(compiled[name], state, batch))
  seconds = {name: [] for name in names}
  for r in range(args.rounds):
    for name in names[r % len(names):] + names[:r % len(names)]:
      for _ in range(args.steps):
        step_s, (state, _) = common.timed(functools.partial(compiled[name], state, batch))
        seconds[name].append(step_s)
    common.log(f"round {r + 1}/{args.rounds}: " + ", ".join(
        f"{name} {statistics.median(seconds[name]):.3f} s" for name in names))
  baseline_s = statistics.median(seconds[BASELINE])
  result = {"name": "cpu_kernels", "size": args.size, "global_batch": args.global_batch, "dtype": "float32",
            "rounds": args.rounds, "steps": args.steps, "machine": common.machine(),
            "devices": jax.local_device_count(), "baseline": BASELINE, "variants": {}}
  for name in names:
    step_s = statistics.median(seconds[name])
    result["variants"][name] = {
        "kernels": dataclasses.asdict(kernels[name]), "compile_s": round(compile_s[name], 1),
        "first_step_s": round(first_s[name], 3), "step_s": round(step_s, 4),
        "images_per_s": round(common.throughput(args.global_batch, seconds[name]), 3),
        "ratio": round(step_s / baseline_s, 3)}
    common.log(f"{name:18s} {step_s:8.3f} s/step  ratio {step_s / baseline_s:.3f}")
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
