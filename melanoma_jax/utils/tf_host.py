"""Import TensorFlow for host-side work only (tf.data, TFRecords, JPEG codecs).

TensorFlow must never grab an accelerator: JAX is the only thing that runs there. Every module that
needs TF gets it from `tf()` so the GPUs are hidden before the first TF op.
"""
import functools
import os


@functools.lru_cache(maxsize=None)
def tf():
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  import tensorflow as tf_module  # pylint: disable=g-import-not-at-top
  tf_module.config.set_visible_devices([], "GPU")
  return tf_module
