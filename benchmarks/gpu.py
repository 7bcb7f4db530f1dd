"""Our train step on a GPU: images/s and model FLOP utilisation in bfloat16 at 299x299 and 1024x1024.

Runs the same pmapped step as benchmarks/train_step.py (MelanomaClassifier, Adam, all local GPUs) with
the batch already on the devices (as training's prefetch delivers it). FLOPs per step come from XLA's
cost analysis of the compiled program; MFU = FLOPs per second / the chips' peak dense bf16 FLOP/s
(a table of known chips, or --peak_tflops). Memory is XLA's estimate and, where the runtime reports it,
the devices' peak use.

  pip install "jax[cuda13]==0.10.2"   # once, on the GPU host (see README, GPU)
  .venv/bin/python benchmarks/gpu.py                        # 299 (64/GPU) and 1024 (16/GPU, remat)
  .venv/bin/python benchmarks/gpu.py --configs 1024:16:remat,1024:16 --out gpu.json

The last line printed is one JSON object.
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position
import train_step  # pylint: disable=g-import-not-at-top,wrong-import-position

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
                      help="comma-separated SIZE:PER_DEVICE_BATCH[:remat] settings")
  parser.add_argument("--dtype", choices=sorted(common.DTYPES), default="bfloat16")
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


def measure(size, per_device, remat, args):
  jax = common.jax
  devices = jax.local_device_count()
  bench_args = argparse.Namespace(size=size, global_batch=per_device * devices, dtype=args.dtype,
                                  remat=remat, compile_only=False, batch_on_device=True)
  ours = train_step.OursBench(bench_args)
  wall, _ = ours.run(args.steps)
  step_s = statistics.median(wall)
  peak = peak_tflops(args.peak_tflops)
  achieved = ours.flops_per_step / step_s / 1e12
  stats = jax.local_devices()[0].memory_stats() or {}
  row = {"size": size, "per_device_batch": per_device, "remat": remat,
         "images_per_s": round(bench_args.global_batch / step_s, 1), "step_s": round(step_s, 4),
         "compile_s": round(ours.compile_s, 1),
         "gflops_per_image": round(ours.flops_per_step / bench_args.global_batch / 1e9, 1),
         "achieved_tflops_per_device": round(achieved / devices, 1),
         "mfu": round(achieved / devices / peak, 3) if peak else None,
         "xla_memory_gib": ours.memory,
         "peak_memory_gib": (round(stats["peak_bytes_in_use"] / 1024**3, 2)
                             if "peak_bytes_in_use" in stats else None)}
  common.log(row)
  del ours
  return row


def main(argv=None):
  args = parse_args(argv)
  jax = common.jax
  result = {"name": "gpu_train_step", "dtype": args.dtype, "machine": common.machine(),
            "devices": jax.local_device_count(), "peak_tflops_per_device": peak_tflops(args.peak_tflops),
            "runs": []}
  if jax.devices()[0].platform != "gpu":
    common.log(f"warning: no GPU visible to JAX (platform {jax.devices()[0].platform}); "
               "install jax[cuda13] for numbers that mean anything")
  for spec in args.configs.split(","):
    parts = spec.split(":")
    size, per_device, remat = int(parts[0]), int(parts[1]), len(parts) > 2 and parts[2] == "remat"
    result["runs"].append(measure(size, per_device, remat, args))
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
