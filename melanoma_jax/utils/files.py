"""Outputs written atomically: to a temporary name beside the target, then renamed over it.

A reader (or a run killed half-way) sees either the old file or the new one, never a torn one. Also the
one file digest (`sha256`) that records and identities use.
"""
import contextlib
import hashlib
import os


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path in `path`'s folder, with its extension; renames it to `path` on success."""
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  stem, ext = os.path.splitext(name)
  # The stem is cut so the temporary name is never longer than the target's (file systems cap names at 255).
  tmp = os.path.join(folder, f".{stem[:32]}.{os.getpid()}.tmp{ext[-16:]}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_csv(frame, path, **to_csv):
  """`frame.to_csv(path, index=False, **to_csv)`, atomically."""
  with atomic_path(path) as tmp:
    frame.to_csv(tmp, index=False, **to_csv)
  return path


def sha256(*paths):
  """Hex sha256 of the files' bytes, read in order in 1 MiB blocks."""
  digest = hashlib.sha256()
  for path in paths:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
  return digest.hexdigest()
