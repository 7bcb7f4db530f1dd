"""Images/s that the tf.data training pipeline delivers from TFRecords, per host core and with all cores.

The pipeline measured is the one training uses (`ImagePipeline.train_dataset`): TFRecord read and
interleave, JPEG decode, resize, the fused random affine + flips + colour jitter of configs/image.py,
oversampling, batching and the numpy reshape to [devices, per_device, ...] (`device_batches`); nothing
goes to an accelerator, so this is the rate the host can feed training at. The records hold synthetic
lesions rendered at the measured size (a few distinct images, repeated), so decode and resize cost what
real full-size JPEGs cost.

Each thread count runs in its own subprocess (TF fixes its thread pools at start): `--threads 1` is the
per-core rate; `--threads 0` uses every core.

  .venv/bin/python benchmarks/input_pipeline.py                        # 512 and 1024, 1 thread and all
  .venv/bin/python benchmarks/input_pipeline.py --sizes 1024 --threads 1 --out r.json

The last line printed is one JSON object (images/s).
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--sizes", default="512,1024", help="comma-separated image sizes")
  parser.add_argument("--threads", default="1,0", help="comma-separated thread counts (0 = all cores)")
  parser.add_argument("--batch", type=int, default=16, help="global batch")
  parser.add_argument("--batches", type=int, default=0,
                      help="batches timed after warm-up (0 = about 15 s of work per setting)")
  parser.add_argument("--distinct_images", type=int, default=16)
  parser.add_argument("--records", type=int, default=256)
  parser.add_argument("--no_augment", action="store_true", help="decode and resize only")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
  parser.add_argument("--data", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def write_records(out_dir, size, distinct, total):
  """`total` train records (a malignant one in ten) cycling through `distinct` rendered lesions."""
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from melanoma_jax.data import records, synthetic  # pylint: disable=g-import-not-at-top
  rows = [{"image_name": f"ISIC_{i:07d}", "patient_id": f"IP_{i % 8:07d}", "sex": "male",
           "age_approx": 50.0, "anatom_site_general_challenge": "torso", "diagnosis": "unknown",
           "target": int(i % 10 == 0)} for i in range(total)]
  df = pd.DataFrame(rows)
  images = [synthetic.render_image(0, f"ISIC_{i:07d}", f"IP_{i % 8:07d}", i % 10 == 0, size)
            for i in range(distinct)]
  codes = records.fit_codes(df)
  records.write_resized_records(df, (images[i % distinct] for i in range(total)), out_dir, "train", 4,
                                codes)
  df.to_csv(os.path.join(out_dir, "train.csv"), index=False)
  return sum(len(b) for b in images) / distinct


def worker(args, threads):
  """Subprocess side: builds the training pipeline with `threads` threads and times it."""
  from melanoma_jax.utils.tf_host import tf  # pylint: disable=g-import-not-at-top
  tf_ = tf()
  if threads:
    tf_.config.threading.set_intra_op_parallelism_threads(threads)
    tf_.config.threading.set_inter_op_parallelism_threads(threads)
  import pandas as pd  # pylint: disable=g-import-not-at-top
  from configs import image as image_config  # pylint: disable=g-import-not-at-top
  from melanoma_jax.data import pipeline, records  # pylint: disable=g-import-not-at-top
  from melanoma_jax.image import setup  # pylint: disable=g-import-not-at-top
  config = image_config.get_config()  # The recipe's augmentation and oversampling.
  config.image_size = args.size
  config.per_device_batch_size = args.batch // common.jax.local_device_count()
  config.augment.enabled = not args.no_augment
  df = pd.read_csv(os.path.join(args.data, "train.csv"))
  names = list(df.image_name)
  files = records.list_record_files(args.data, "train")
  pipe = pipeline.ImagePipeline(files, [], dict(zip(names, df.target)), names[:-8], names[-8:],
                                **setup.resolve(config).pipeline_kwargs)
  options = tf_.data.Options()
  if threads:
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1

  def batches(epoch):
    ds = pipe.train_dataset(epoch, seed=0).with_options(options)
    return pipe.device_batches(ds, files)

  warm = iter(batches(0))
  for _ in range(3):
    next(warm)
  timed, epoch, start, deadline = 0, 1, time.perf_counter(), args.batches
  cpu_start = time.process_time()
  target_s = 15.0
  while True:
    for _ in batches(epoch):
      timed += 1
      elapsed = time.perf_counter() - start
      if (deadline and timed >= deadline) or (not deadline and elapsed >= target_s and timed >= 5):
        cpu = time.process_time() - cpu_start
        common.worker_say({"images_per_s": timed * args.batch / elapsed, "batches": timed,
                           "seconds": elapsed, "cores_busy": cpu / elapsed})
        return
    epoch += 1


def run_worker(args, size, threads, data):
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--size", str(size), "--data", data,
         "--batch", str(args.batch), "--batches", str(args.batches), "--threads", str(threads)]
  if args.no_augment:
    cmd.append("--no_augment")
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
  out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, env=env, check=True).stdout
  reply = common.worker_reply(out.splitlines())
  if reply is not None:
    return reply
  raise RuntimeError(f"input pipeline worker ({size}, {threads} threads) printed no result")


def main(argv=None):
  args = parse_args(argv)
  if args.worker:
    worker(args, int(args.threads))
    return
  sizes = [int(s) for s in args.sizes.split(",") if s]
  thread_counts = [int(t) for t in args.threads.split(",") if t]
  cores = os.cpu_count()
  result = {"name": "input_pipeline", "batch": args.batch, "augment": not args.no_augment,
            "machine": common.machine(), "cores": cores}
  with tempfile.TemporaryDirectory() as tmp:
    for size in sizes:
      data = os.path.join(tmp, str(size))
      start = time.perf_counter()
      jpeg = write_records(data, size, args.distinct_images, args.records)
      common.log(f"{size}x{size}: {args.records} records written ({jpeg / 1024:.0f} KiB per JPEG) in "
                 f"{time.perf_counter() - start:.0f} s")
      result[f"jpeg_kib_{size}"] = round(jpeg / 1024, 1)
      for threads in thread_counts:
        run = run_worker(args, size, threads, data)
        rate = run["images_per_s"]
        used = threads or cores
        label = "per_core" if threads == 1 else f"{used}_threads"
        common.log(f"{size}x{size}, {used} thread(s): {rate:.1f} images/s ({rate / used:.1f} per core; "
                   f"the process kept {run['cores_busy']:.2f} cores busy)")
        result[f"images_per_s_{size}_{label}"] = round(rate, 1)
        result[f"cores_busy_{size}_{label}"] = round(run["cores_busy"], 2)
  common.emit(result, args.out)


if __name__ == "__main__":
  main()
