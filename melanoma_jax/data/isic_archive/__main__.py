"""python -m melanoma_jax.data.isic_archive --year=2019 --image_size=512 --manual_dir=DOWNLOADS --data_dir=OUT"""
import sys

from melanoma_jax.data.isic_archive.command import main

if __name__ == "__main__":
  sys.exit(main())
