"""Outputs written atomically: to a temporary name beside the target, then renamed over it.

A reader (or a run killed half-way) sees either the old file or the new one, never a torn one. Also the
one file digest (`sha256`) that records and identities use, and `sha256_cached`, which reads a large file
again only when it changed.
"""
import contextlib
import hashlib
import json
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


def _stamp(path):
  info = os.stat(path)
  return [info.st_size, info.st_mtime_ns, info.st_ino]


def sha256_cached(paths, cache_path, write=True):
  """{path: sha256} of each file, reusing `cache_path`'s entry (a JSON file {real path: [size, mtime_ns,
  inode, sha256]}) for a file whose size, modification time and inode are unchanged, so data of many
  gigabytes is read once, not on every run. Any edit through the file system moves the modification time,
  so a file is read again after any change made without forging the time. `write`: whether to save the
  updated cache (atomically; one process of a run writes it)."""
  try:
    with open(cache_path, encoding="utf-8") as f:
      cache = json.load(f)
    if not isinstance(cache, dict):
      cache = {}
  except (OSError, ValueError):
    cache = {}  # A missing or damaged cache only costs reading the files again.
  digests, changed = {}, False
  for path in paths:
    real = os.path.realpath(path)
    stamp = _stamp(real)
    entry = cache.get(real)
    if isinstance(entry, list) and entry[:3] == stamp and len(entry) == 4:
      digests[path] = entry[3]
      continue
    digests[path] = sha256(real)
    cache[real] = stamp + [digests[path]]
    changed = True
  if changed and write and os.path.isdir(os.path.dirname(os.path.abspath(cache_path))):
    with atomic_path(cache_path) as tmp, open(tmp, "w", encoding="utf-8") as f:
      json.dump(cache, f, indent=0, sort_keys=True)
  return digests
