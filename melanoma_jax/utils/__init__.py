"""Small shared helpers below every other layer: `files` (atomic writes, CSVs, sha256), `errors` (the
one-line error types), `tf_host` (TensorFlow on the host, GPUs hidden), `cli` (flag parsing)."""
