"""Outputs written atomically: to a temporary name beside the target, then renamed over it.

A reader (or a run killed half-way) sees either the old file or the new one, never a torn one.
"""
import contextlib
import os


@contextlib.contextmanager
def atomic_path(path):
  """Yields a temporary path in `path`'s folder, with its extension; renames it to `path` on success."""
  path = os.fspath(path)
  folder, name = os.path.split(os.path.abspath(path))
  stem, ext = os.path.splitext(name)
  tmp = os.path.join(folder, f".{stem}.{os.getpid()}.tmp{ext}")
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_csv(frame, path):
  """`frame.to_csv(path, index=False)`, atomically."""
  with atomic_path(path) as tmp:
    frame.to_csv(tmp, index=False)
  return path
