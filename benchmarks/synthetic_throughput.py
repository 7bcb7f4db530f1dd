"""Throughput of the synthetic lesion generator on one core, JPEG encoding included; prints one JSON line.

  .venv/bin/python benchmarks/synthetic_throughput.py --image_size 128 --num_images 500
"""
import argparse
import json
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from melanoma_jax.data import synthetic  # pylint: disable=g-import-not-at-top,wrong-import-position


def measure(image_size, num_images, seed=0, malignant_every=10, warmup=20):
  """Images/s of render_image (draw + JPEG) over num_images rows of 20 patients, in this process."""
  jobs = [(seed, f"ISIC_{i:07d}", f"IP_{i % 20:07d}", i % malignant_every == 0, image_size)
          for i in range(num_images + warmup)]
  for job in jobs[:warmup]:
    synthetic.render_image(*job)
  start = time.perf_counter()
  total_bytes = sum(len(synthetic.render_image(*job)) for job in jobs[warmup:])
  seconds = time.perf_counter() - start
  return {"benchmark": "synthetic_throughput", "image_size": image_size, "images": num_images,
          "seconds": round(seconds, 3), "images_per_second": round(num_images / seconds, 1),
          "mean_jpeg_bytes": round(total_bytes / num_images), "processes": 1}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--image_size", "--image-size", type=int, default=128)
  parser.add_argument("--num_images", "--num-images", type=int, default=500)
  args = parser.parse_args(argv)
  print(json.dumps(measure(args.image_size, args.num_images)))


if __name__ == "__main__":
  main()
