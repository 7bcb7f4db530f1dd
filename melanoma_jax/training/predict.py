"""The one prediction path of both tasks: padded device batches in, every real row out exactly once."""
import numpy as np

from melanoma_jax.training import steps
from melanoma_jax.utils.errors import NonFiniteLossError


def array_batches(x, global_batch, y=None):
  """(sharded batch, None) of every row of `x` (and `y`) in order; the last batch padded with mask 0."""
  for start in range(0, len(x), global_batch):
    batch = {"x": x[start:start + global_batch]}
    if y is not None:
      batch["y"] = y[start:start + global_batch]
    yield steps.shard_batch(steps.pad_batch(batch, global_batch)), None


def collect(p_predict, state, batches, what="predictions"):
  """Outputs of `p_predict` for the unmasked rows of `batches`, in order.

  `batches` yields (sharded batch with 'mask' and optionally 'y', names or None). Returns a dict with
  'outputs' (float64 [rows, ...], the step's trailing dimensions kept), 'targets' (float [rows], when the batches carry 'y') and 'names' (list, when
  they carry names). Non-finite outputs raise NonFiniteLossError naming `what`.
  """
  outputs, targets, names = [], [], []
  for batch, batch_names in batches:
    out = np.asarray(p_predict(state, batch))
    out = out.reshape((-1,) + out.shape[2:])  # [devices, per_device, ...] -> [rows, ...]
    keep = np.asarray(batch["mask"]).reshape(-1) > 0
    outputs.append(out[keep])
    if "y" in batch:
      targets.append(np.asarray(batch["y"]).reshape(-1)[keep])
    if batch_names is not None:
      names.extend(n for n, k in zip(batch_names, keep) if k)
  result = {"outputs": np.concatenate(outputs).astype(np.float64) if outputs else np.zeros(0)}
  if not np.isfinite(result["outputs"]).all():
    bad = int((~np.isfinite(result["outputs"])).sum())
    raise NonFiniteLossError(f"{what}: {bad} of {len(result['outputs'])} outputs are NaN or inf")
  if targets:
    result["targets"] = np.concatenate(targets)
  if names:
    result["names"] = names
  return result
