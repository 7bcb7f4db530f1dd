"""Our train step on a GPU: images/s and model FLOP utilisation in bfloat16 at 299x299 and 1024x1024.

Runs the same pmapped step as benchmarks/train_step.py (MelanomaClassifier, Adam, all local GPUs) with
the batch already on the devices (as training's prefetch delivers it). Model FLOPs per step are those of
the step's matrix products and convolutions, counted in its jaxpr without remat (recomputation is not
model work); HFU counts those of the program that ran (with remat's recomputation). XLA's own cost
analysis is reported beside them but not used: on a GPU it leaves out the convolutions it hands to cuDNN
(7.6 GFLOPs per 299x299 training image where XLA:CPU counts 79.5 and the jaxpr 83.8, the difference
there being padding, which XLA:CPU does not count). MFU = model FLOPs per second / the chip's peak dense
bf16 FLOP/s (a table of known chips, or --peak_tflops).
Memory is XLA's estimate and, where the runtime reports it, the devices' peak use. A setting that fails
(out of memory, say) is reported with its error and the others still run.

  pip install "jax[cuda13]==0.12.0.1"   # once, on the GPU host (see README, GPU)
  .venv/bin/python benchmarks/gpu.py                        # 299 (64/GPU) and 1024 (16/GPU, remat)
  .venv/bin/python benchmarks/gpu.py --configs 1024:16:remat,1024:16 --out gpu.json
  .venv/bin/python benchmarks/gpu.py --configs 299:64:xla,299:64:cpu   # the XLA:CPU workarounds off, on

The last line printed is one JSON object.
"""
import argparse
import os
import statistics
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from melanoma_jax.models import DTYPES, KERNELS  # pylint: disable=g-import-not-at-top,wrong-import-position

# Peak dense bfloat16 tensor-core FLOP/s per chip (vendor data sheets), by jax device_kind prefix.
PEAK_BF16_TFLOPS = {
    "NVIDIA H200": 989.4,
    "NVIDIA H100 80GB HBM3": 989.4,  # SXM
    "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0,
    "NVIDIA H100": 989.4,
    "NVIDIA A100": 312.0,
    "NVIDIA L4": 121.0,
}


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--configs", default="299:64,1024:16:remat",
                      help="comma-separated SIZE:PER_DEVICE_BATCH[:remat][:auto|cpu|xla] settings "
                           "(the last: the XLA:CPU workarounds, models/kernels.py, default auto)")
  parser.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="peak dense FLOP/s per chip in TFLOP/s (0 = from the table of known chips)")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  return parser.parse_args(argv)


def peak_tflops(override):
  if override:
    return override
  kind = common.jax.devices()[0].device_kind
  for prefix, value in PEAK_BF16_TFLOPS.items():
    if kind.startswith(prefix):
      return value
  return None


def measure(size, per_device, remat, kernels, args):
  jax = common.jax
  devices = jax.local_device_count()
  bench_args = argparse.Namespace(size=size, global_batch=per_device * devices, dtype=args.dtype,
                                  remat=remat, kernels=kernels, compile_only=False,
                                  batch_on_device=True)
  work = common.step_flops(size, bench_args.global_batch, args.dtype, kernels, remat=False)
  executed = (common.step_flops(size, bench_args.global_batch, args.dtype, kernels, remat=True)
              if remat else work)
  ours = train_step.OursBench(bench_args)
  wall, _ = ours.run(args.steps)
  step_s = statistics.median(wall)
  peak = peak_tflops(args.peak_tflops)
  per_image = lambda f: round(f / bench_args.global_batch / 1e9, 1) if f else None
  achieved = work / step_s / 1e12 / devices
  executed_rate = executed / step_s / 1e12 / devices
  stats = jax.local_devices()[0].memory_stats() or {}
  row = {"size": size, "per_device_batch": per_device, "remat": remat, "kernels": kernels,
         "images_per_s": round(bench_args.global_batch / step_s, 1), "step_s": round(step_s, 4),
         "compile_s": round(ours.compile_s, 1),
         "model_gflops_per_image": per_image(work),
         "executed_gflops_per_image": per_image(executed),
         "xla_cost_analysis_gflops_per_image": per_image(ours.flops_per_step),
         "model_tflops_per_device": round(achieved, 1),
         "mfu": round(achieved / peak, 3) if peak else None,
         "hfu": round(executed_rate / peak, 3) if peak else None,
         "xla_memory_gib": ours.memory,
         "peak_memory_gib": (round(stats["peak_bytes_in_use"] / 1024**3, 2)
                             if "peak_bytes_in_use" in stats else None)}
  common.log(row)
  del ours
  return row


def parse_spec(spec):
  """'1024:16:remat:xla' -> (1024, 16, True, 'xla')."""
  parts = spec.split(":")
  flags = set(parts[2:])
  kernels = flags & set(KERNELS)
  if len(parts) < 2 or flags - kernels - {"remat"} or len(kernels) > 1:
    raise SystemExit(f"--configs: cannot read {spec!r} (SIZE:PER_DEVICE_BATCH[:remat][:auto|cpu|xla])")
  return int(parts[0]), int(parts[1]), "remat" in flags, kernels.pop() if kernels else "auto"


def main(argv=None):
  args = parse_args(argv)
  jax = common.jax
  result = {"name": "gpu_train_step", "dtype": args.dtype, "machine": common.machine(),
            "jax": jax.__version__,
            "devices": jax.local_device_count(), "peak_tflops_per_device": peak_tflops(args.peak_tflops),
            "runs": []}
  if jax.devices()[0].platform != "gpu":
    common.log(f"warning: no GPU visible to JAX (platform {jax.devices()[0].platform}); "
               "install jax[cuda13] for numbers that mean anything")
  specs = [parse_spec(spec) for spec in args.configs.split(",")]
  for size, per_device, remat, kernels in specs:
    try:
      result["runs"].append(measure(size, per_device, remat, kernels, args))
    except Exception as e:  # pylint: disable=broad-except  (out of memory, say: report it, go on)
      message = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
      traceback.print_exc()
      common.log(f"{size}:{per_device} remat={remat} kernels={kernels} failed: {message}")
      result["runs"].append({"size": size, "per_device_batch": per_device, "remat": remat,
                             "kernels": kernels, "error": message})
  common.log("size batch/dev remat kernels  img/s   MFU   HFU  peak GiB")
  for row in result["runs"]:
    common.log(f"{row['size']:4d} {row['per_device_batch']:9d} {str(row['remat']):5s} "
               f"{row['kernels']:7s} " + (f"{row['images_per_s']:7.1f} {row['mfu'] or 0:5.3f} "
                                          f"{row['hfu'] or 0:5.3f} {row['peak_memory_gib']}"
                                          if "error" not in row else row["error"][:60]))
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
