"""The command line: writes one synthetic dataset and prints its summary (record paths aside) as JSON.

  python -m melanoma_jax.data.synthetic --out DIR --num_patients 200 --image_size 128 --seed 0
  python -m melanoma_jax.data.synthetic --out DIR --generator plain --ugly_duckling 1
  python -m melanoma_jax.data.synthetic --out DOWNLOADS --archive 2019 --num_images 200 --image_size 64
"""
import argparse
import json
import logging
import sys

from melanoma_jax.data import synthetic
from melanoma_jax.utils.errors import InputError


def main(argv=None):
  parser = argparse.ArgumentParser(prog="python -m melanoma_jax.data.synthetic",
                                   description=synthetic.__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--num_patients", "--num-patients", type=int, default=synthetic.DEFAULT_NUM_PATIENTS,
                      help="train patients to draw (0 = all 2,056)")
  parser.add_argument("--num_test_patients", "--num-test-patients", type=int, default=None,
                      help="test patients (default: real test:train proportion)")
  parser.add_argument("--image_size", "--image-size", type=int, default=128)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--min_malignant", "--min-malignant", type=int,
                      default=synthetic.DEFAULT_MIN_MALIGNANT)
  parser.add_argument("--num_shards", "--num-shards", type=int, default=None)
  parser.add_argument("--num_workers", "--num-workers", type=int, default=1, help="rendering processes")
  parser.add_argument("--ugly_duckling", "--ugly-duckling", type=float, default=0.0,
                      help="share of melanomas drawn as a stranger's typical nevus (0 = ordinary set, 1 = pure)")
  parser.add_argument("--generator", default=synthetic.GENERATORS[0],
                      help=f"one of {', '.join(synthetic.GENERATORS)}; plain needs --ugly_duckling 1")
  parser.add_argument("--archive", type=int, choices=(2019, 2018), default=None,
                      help="write a synthetic ISIC archive download of this year into --out instead (its image "
                      "folder and CSVs; --num_images, --image_size, --seed)")
  parser.add_argument("--num_images", "--num-images", type=int, default=24, help="images of --archive")
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
  try:
    if args.archive is not None:
      summary = synthetic.write_archive(args.out, args.archive, args.num_images, args.seed, args.image_size)
      print(json.dumps({k: v for k, v in summary.items() if k != "classes"}))
      return 0
    summary = synthetic.generate_dataset(args.out, args.num_patients, args.image_size, args.seed,
                                         args.num_test_patients, num_shards=args.num_shards,
                                         min_malignant=args.min_malignant, num_workers=args.num_workers,
                                         ugly_duckling=args.ugly_duckling, generator=args.generator)
  except InputError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps({k: v for k, v in summary.items() if not k.endswith("_records")}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
