"""WORKDIR/results.json: final metrics, the config that produced them and the package versions."""
import datetime
import importlib.metadata
import json
import os
import platform
import sys

from melanoma_jax.training import distributed
from melanoma_jax.utils import files

NAME = "results.json"

_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "tensorflow-cpu", "keras",
             "numpy", "pandas", "scikit-learn", "imbalanced-learn", "ml-collections")


def package_versions():
  versions = {"python": sys.version.split()[0], "platform": platform.platform()}
  for name in _PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  try:
    import jax  # pylint: disable=g-import-not-at-top
    versions["devices"] = [str(d) for d in jax.local_devices()]
  except Exception:  # pylint: disable=broad-except
    pass
  return versions


def _jsonable(value):
  """Numbers from numpy/jax become Python numbers; anything else unknown becomes its str."""
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, (str, bool, int, float)) or value is None:
    return value
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def write_results(workdir, metrics, config=None, name=NAME):
  """Writes WORKDIR/`name` (metrics, config, versions) atomically and returns its path.

  In a multi-process run only process 0 writes (the others return the path it writes).
  """
  path = os.path.join(workdir, name)
  if not distributed.is_primary():
    return path
  os.makedirs(workdir, exist_ok=True)
  payload = dict(_jsonable(metrics))
  if config is not None:
    payload["config"] = _jsonable(config.to_dict() if hasattr(config, "to_dict") else config)
  payload["versions"] = package_versions()
  payload["finished_at"] = datetime.datetime.now(datetime.timezone.utc).isoformat()
  with files.atomic_path(path) as tmp, open(tmp, "w") as f:
    json.dump(payload, f, indent=2, sort_keys=True)
  return path
