"""What native code (libjpeg, libpng inside TensorFlow) prints on the process's stderr, caught per call.

libjpeg reports through its own `output_message`, which writes straight to file descriptor 2 ("Improper call
to JPEG library in state 201", "Corrupt JPEG data: premature end of data segment"): a line on the user's
terminal that names no file. `captured()` points descriptor 2 at a temporary file around one call and hands
back what was written, so the caller can attach it to the file it was reading (or drop it) instead.
"""
import contextlib
import os
import sys
import tempfile
import threading

_LOCK = threading.Lock()  # Descriptor 2 is one per process: one capture at a time.


class Captured:
  """The text written to descriptor 2 during the `captured()` block (set when the block ends)."""
  text = ""

  @property
  def lines(self):
    return [line.strip() for line in self.text.splitlines() if line.strip()]


@contextlib.contextmanager
def captured():
  """Yields a `Captured` whose `text` holds what descriptor 2 received inside the block. Python's own
  writes to sys.stderr are flushed before and after, so they keep their place on the terminal."""
  result = Captured()
  with _LOCK, tempfile.TemporaryFile(mode="w+b") as sink:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
      os.dup2(sink.fileno(), 2)
      try:
        yield result
      finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
    finally:
      os.close(saved)
    sink.seek(0)
    result.text = sink.read().decode("utf-8", "replace")
