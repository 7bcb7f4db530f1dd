"""melanoma_jax: melanoma detection on SIIM-ISIC 2020 with JAX/Flax, data-parallel with jax.pmap."""

__version__ = "0.1.0"
