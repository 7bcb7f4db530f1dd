"""Dynamic batching: concurrent requests' images scored together, on one model thread.

`Batcher.score(x)` queues one request's model inputs and waits for their probabilities. One worker task takes
the oldest request, then keeps taking requests for up to `timeout_ms` while the batch holds fewer than
`max_batch_size` images (a request that would overflow it waits for the next batch; a request larger than
`max_batch_size` is scored alone), and scores the batch on the model thread, so the event loop keeps
accepting requests meanwhile. The model pads every batch to the run's global batch (the only compiled
shape, compiled at start-up), so no request size compiles anything.

The window only waits while another request is on its way (`arriving`: received, its images still being
decoded): a lone request is scored at once instead of waiting `timeout_ms` for company that is not coming.

The queue is bounded by images (`max_queue`): a request that would overflow it is refused at once (`Busy`,
503) instead of growing the wait of everyone behind it. A request whose caller stopped waiting (its timeout)
is dropped when the worker reaches it, never scored.

`run_exclusive(fn)` runs other model work (the patient endpoint, saliency) on the same model thread, so the
model is only ever called from one thread.
"""
import asyncio
import concurrent.futures
import contextlib

import numpy as np


class Busy(Exception):
  """The queue is full."""


class _Arrival:
  """One request between its arrival and its place in the queue (or its refusal)."""

  def __init__(self, batcher):
    self.batcher, self.open = batcher, True
    batcher.coming += 1

  def close(self):
    if self.open:
      self.open = False
      self.batcher.coming -= 1


class Batcher:
  """See the module doc. `score_fn`: model inputs [N, S, S, 3] -> probabilities [N]; `metrics`: a Metrics."""

  def __init__(self, score_fn, max_batch_size, timeout_ms, max_queue, metrics):
    self.score_fn, self.max_batch_size = score_fn, int(max_batch_size)
    self.timeout_s, self.max_queue, self.metrics = timeout_ms / 1000.0, int(max_queue), metrics
    self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="model")
    self._queue = None  # Made in `start`, inside the server's event loop.
    self._queued = 0
    self._worker = None
    self._carried = None  # A request taken from the queue that did not fit the batch being built.
    self.coming = 0  # Requests on their way to the queue (see `arriving`).

  def start(self):
    self._queue = asyncio.Queue()
    self._worker = asyncio.get_running_loop().create_task(self._run())

  async def stop(self):
    if self._worker is not None:
      self._worker.cancel()
      try:
        await self._worker
      except asyncio.CancelledError:
        pass
    self.executor.shutdown(wait=True)

  async def run_exclusive(self, fn, *args):
    """fn(*args) on the model thread."""
    return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

  @contextlib.contextmanager
  def arriving(self):
    """Around a request's decoding and `score(x, arrival)`: tells the batching window that it is coming."""
    arrival = _Arrival(self)
    try:
      yield arrival
    finally:
      arrival.close()

  async def score(self, x, arrival=None):
    """Probabilities of `x` [N, S, S, 3] (float64 [N]); raises Busy when the queue is full."""
    if arrival is not None:
      arrival.close()
    if self._queued + len(x) > self.max_queue:
      raise Busy(f"the server is busy ({self._queued} images queued, --max_queue={self.max_queue}); retry later")
    future = asyncio.get_running_loop().create_future()
    self._queued += len(x)
    self.metrics.queue_depth.set(self._queued)
    self._queue.put_nowait((x, future))
    return await future

  def _taken(self, item):
    self._queued -= len(item[0])
    self.metrics.queue_depth.set(self._queued)
    return item

  async def _next(self, timeout=None):
    if self._carried is not None:
      item, self._carried = self._carried, None
      return item
    if timeout is None:
      return self._taken(await self._queue.get())
    return self._taken(await asyncio.wait_for(self._queue.get(), timeout))

  async def _run(self):
    loop = asyncio.get_running_loop()
    while True:
      batch = [await self._next()]
      size = len(batch[0][0])
      deadline = loop.time() + self.timeout_s
      while size < self.max_batch_size:
        remaining = deadline - loop.time()
        if remaining <= 0 or (self._queue.empty() and self._carried is None and not self.coming):
          break
        try:
          item = await self._next(remaining)
        except asyncio.TimeoutError:
          break
        if size + len(item[0]) > self.max_batch_size:
          self._carried = item
          break
        batch.append(item)
        size += len(item[0])
      batch = [(x, f) for x, f in batch if not f.done()]  # Callers that timed out are not scored.
      if not batch:
        continue
      x = np.concatenate([x for x, _ in batch])
      try:
        probabilities = await loop.run_in_executor(self.executor, self.score_fn, x)
      except Exception as e:  # pylint: disable=broad-except
        for _, future in batch:  # Every caller of the batch gets the failure; the worker goes on.
          if not future.done():
            future.set_exception(e)
        continue
      self.metrics.batch_size.observe(len(x))
      self.metrics.batches.inc()
      self.metrics.images.inc(len(x))
      start = 0
      for part, future in batch:
        if not future.done():
          future.set_result(probabilities[start:start + len(part)])
        start += len(part)
