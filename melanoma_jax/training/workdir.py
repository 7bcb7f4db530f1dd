"""One run at a time per workdir: an advisory lock held for the whole run.

The lock is `fcntl.flock` on WORKDIR/.lock, which the kernel releases when the holding process ends, however
it ends, so a lock left by a killed run never blocks the next one. The file names the holder (pid, host,
start time) for the refusal message.

In a multi-process run, process 0 holds WORKDIR/.lock (so a single-process run on the same workdir is
refused) and process i > 0 holds WORKDIR/.lock.<i>; the processes then agree, so a run of which any process
was refused is refused in every process (each exits with the error, none waits for the others).

Commands that only read a trained workdir (predict, export) take the same lock shared (`read_lock`): any
number of them at once, none while a run trains there, and no run starts while one of them reads.
"""
import contextlib
import datetime
import fcntl
import os
import socket

from melanoma_jax.training import distributed
from melanoma_jax.utils.errors import InputError

LOCK_FILE = ".lock"


@contextlib.contextmanager
def lock(workdir):
  """Holds WORKDIR's lock; raises InputError at once, naming the holder, if another process has it."""
  os.makedirs(workdir, exist_ok=True)
  index = distributed.process_index()
  path = os.path.join(workdir, LOCK_FILE if index == 0 else f"{LOCK_FILE}.{index}")
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      holder = None
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
    if not distributed.all_true(holder is None):  # Every process's verdict; single-process: its own.
      holder = holder or "another run (seen by another process of this run)"
      raise InputError(f"{os.path.abspath(workdir)} is in use by {holder} (or by a predict or export reading "
                       "it); wait for it to end or use another --workdir")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()} (started {started})\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # Closing the descriptor releases the lock.


@contextlib.contextmanager
def read_lock(workdir):
  """Holds WORKDIR's lock shared while a command reads its checkpoints; raises InputError at once, naming
  the holder, while a run trains there. A missing workdir is left to the caller to refuse (nothing created)."""
  if not os.path.isdir(workdir):
    yield
    return
  fd = os.open(os.path.join(workdir, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
      raise InputError(f"{os.path.abspath(workdir)} is being trained by {holder}; its checkpoints change while "
                       "it trains: predict or export when that run has ended") from None
    yield
  finally:
    os.close(fd)
