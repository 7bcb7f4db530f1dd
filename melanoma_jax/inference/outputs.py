"""Where the inference commands may write: never over an input or a run's files, never over a file they did
not write, and only where writing is possible, all checked before any model loads.

Every output path is compared after resolving symlinks and `..` (`os.path.realpath`): an output that is, or
lies inside, a protected path (the workdir, the --images folder, an input file) is refused. A file output
(predict --out) must name a file (not a folder) whose nearest existing ancestor is a folder we can create a
file in. An output folder (--saliency, export --out) must be new, empty, or one these commands made before:
it then holds a marker, a JSON record whose `files` maps each file the command wrote there (relative path)
to the sha256 of its bytes. Only listed files whose bytes still match are ever replaced; a planned file that
exists otherwise (a user's file under that name, or beside a copied marker) is refused, and files the user
added beside ours are never touched.
Refusals are InputErrors of one line naming the flag and the path.
"""
import json
import os
import shutil
import tempfile

from melanoma_jax.utils import files
from melanoma_jax.utils.errors import InputError

_NAME_MAX = 255  # Bytes in one file name on Linux's and macOS's file systems.


def _real(path):
  return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(path))))


def _inside(path, folder):
  """Whether real path `path` is `folder` or lies under it (both resolved)."""
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def is_inside(path, folder):
  """Whether `path` is `folder` or lies under it, symlinks and `..` resolved."""
  return _inside(_real(path), _real(folder))


class Protected:
  """The paths an output must stay out of: the workdir (nothing inside it, nor a folder holding it), the
  images folder (not the folder itself) and `inputs` (files read: never written)."""

  def __init__(self, workdir="", images_dir="", inputs=()):
    self.workdir = _real(workdir) if workdir else ""
    self.images_dir = _real(images_dir) if images_dir else ""
    self.inputs = {_real(p) for p in inputs if p}

  def check(self, path, flag):
    """Raises InputError if `path` (resolved) is an input, the images folder, or in or over the workdir."""
    real = _real(path)
    shown = path if real == os.path.abspath(path) else f"{path} (resolves to {real})"
    if real in self.inputs:
      raise InputError(f"{flag}={shown}: is an input file; choose another path")
    if self.workdir and _inside(real, self.workdir):
      raise InputError(f"{flag}={shown}: is inside the workdir {self.workdir}; the run's files are never "
                       "written over, choose a path outside it")
    if self.workdir and _inside(self.workdir, real):
      raise InputError(f"{flag}={shown}: holds the workdir {self.workdir}; choose a path outside it")
    if self.images_dir and real == self.images_dir:
      raise InputError(f"{flag}={shown}: is the --images folder; choose another folder")


def check_can_create(path, flag):
  """Raises InputError unless a file or folder `path` can be created: its nearest existing ancestor must be a
  folder in which a file can be made (tried with a temporary file, removed at once)."""
  parent = os.path.dirname(_real(path))
  while not os.path.lexists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise InputError(f"{flag}={path}: {parent} is a file, not a folder")
  try:
    fd, probe = tempfile.mkstemp(dir=parent, prefix=".melanoma_jax_probe.")
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise InputError(f"{flag}={path}: cannot write in {parent} ({e.strerror or e})") from None


def check_file(path, flag, protected):
  """Raises InputError unless file output `path` may be written (see the module doc)."""
  if os.path.isdir(path):
    raise InputError(f"{flag}={path}: is a folder; give a file name")
  protected.check(path, flag)
  check_can_create(path, flag)
  if len(os.fsencode(os.path.basename(path))) > _NAME_MAX:
    raise InputError(f"{flag}={path}: file name too long (at most {_NAME_MAX} bytes)")


def listed(folder, marker):
  """{relative path: sha256 or None (planned, not yet written)} of the files the marker in `folder` lists, or
  None if `folder` holds no marker."""
  path = os.path.join(folder, marker)
  if not os.path.isfile(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      names = json.load(f)["files"]
    if not isinstance(names, dict) or not all(isinstance(v, (str, type(None))) for v in names.values()):
      raise ValueError("files is not a table of names and digests")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{path}: not a file list this project wrote ({e}); choose a new or empty folder") from None
  return names


def _ours(folder, name, table, marker):
  """Whether `folder`/`name` may be replaced: the marker itself, absent, or listed with its current digest."""
  path = os.path.join(folder, name)
  if name == marker or not os.path.lexists(path):
    return True
  if name not in table or not os.path.isfile(path) or os.path.islink(path):
    return False
  return table[name] is None or files.sha256(path) == table[name]


def check_folder(folder, marker, flag, protected, planned=()):
  """Raises InputError unless output folder `folder` may receive the files `planned` (relative paths).

  Returns the files the folder's marker lists that are still as written, as `listed` (empty for a new or
  empty folder).
  """
  protected.check(folder, flag)
  if os.path.lexists(folder) and not os.path.isdir(folder):
    raise InputError(f"{flag}={folder}: exists and is not a folder")
  if not os.path.isdir(folder):
    check_can_create(folder, flag)
    return set()
  ours = listed(folder, marker)
  if ours is None:
    if os.listdir(folder):
      raise InputError(f"{flag}={folder}: a non-empty folder this project did not create (no {marker}); "
                       "choose a new or empty folder")
    ours = {}
  clash = sorted(p for p in planned if not _ours(folder, p, ours, marker))
  if clash:
    raise InputError(f"{flag}={folder}: {len(clash)} file(s) this project did not write would be replaced "
                     f"({', '.join(clash[:3])}); choose a new or empty folder")
  check_can_create(os.path.join(folder, marker), flag)
  return {n: d for n, d in ours.items() if n != marker and _ours(folder, n, ours, marker)}


def staging(folder, marker, planned):
  """(`folder` made absolute, the hidden sibling an export is written to before `install` moves it into place),
  once `check_folder` allows `--out=folder` to receive `planned`; creates nothing."""
  folder = os.path.abspath(folder)
  check_folder(folder, marker, "--out", Protected(), planned)
  return folder, os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.{os.getpid()}.tmp")


def clear_staging(tmp):
  """Makes the parent of staging folder `tmp` and removes what an interrupted export left there."""
  os.makedirs(os.path.dirname(tmp), exist_ok=True)
  shutil.rmtree(tmp, ignore_errors=True)


def claim(folder, marker, info, names):
  """Creates `folder` (after `check_folder`) and writes its marker: `info` plus `files`, each of `names`
  with the sha256 of its bytes (None for one not written yet)."""
  os.makedirs(folder, exist_ok=True)
  table = {n: files.sha256(os.path.join(folder, n)) if os.path.isfile(os.path.join(folder, n)) else None
           for n in sorted(set(names)) if n != marker}
  with files.atomic_path(os.path.join(folder, marker)) as tmp, open(tmp, "w", encoding="utf-8") as f:
    json.dump(dict(info, files=table), f, indent=2, sort_keys=True)


def tree(folder):
  """The relative paths of the files under `folder`."""
  return sorted(os.path.relpath(os.path.join(root, n), folder) for root, _, names in os.walk(folder) for n in names)


def install(new, folder, marker, flag):
  """Moves the files of finished folder `new` (which holds its own marker) into `folder`, replacing only the
  files `folder`'s marker lists with their digests; then removes `new`. A new or empty `folder` is replaced
  by `new` in one rename. Otherwise the old files of ours are moved aside first and put back if a move fails
  (the marker goes last, so a failed install keeps the old marker and file list)."""
  if not os.path.isdir(folder) or not os.listdir(folder):
    os.replace(new, folder)
    return
  ours = listed(folder, marker)
  incoming = [n for n in tree(new) if n != marker] + [marker]
  clash = sorted(p for p in incoming if ours is None or not _ours(folder, p, ours, marker))
  if clash:
    raise InputError(f"{flag}={folder}: {len(clash)} file(s) this project did not write would be replaced "
                     f"({', '.join(clash[:3])}); choose a new or empty folder")
  old = [n for n in sorted(ours) + [marker] if os.path.isfile(os.path.join(folder, n)) and _ours(folder, n, ours,
                                                                                                     marker)]
  aside = tempfile.mkdtemp(prefix=f".{os.path.basename(folder)}.old.", dir=os.path.dirname(folder))
  moved = []
  try:
    for name in old:
      os.makedirs(os.path.dirname(os.path.join(aside, name)), exist_ok=True)
      os.replace(os.path.join(folder, name), os.path.join(aside, name))
      moved.append(name)
    for name in incoming:
      os.makedirs(os.path.dirname(os.path.join(folder, name)), exist_ok=True)
      os.replace(os.path.join(new, name), os.path.join(folder, name))
  except OSError:
    for name in moved:
      os.replace(os.path.join(aside, name), os.path.join(folder, name))
    raise
  finally:
    shutil.rmtree(aside, ignore_errors=True)
  shutil.rmtree(new, ignore_errors=True)
