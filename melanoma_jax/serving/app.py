"""The HTTP application (FastAPI on Starlette): routes of the TF Serving REST API, the Open Inference Protocol
v2, the patient endpoint, the review page, /metrics; and the guard every request passes first.

Routes (NAME: --model_name):
  GET  /v1/models/NAME, /v1/models/NAME/metadata; POST /v1/models/NAME:predict      (TF Serving)
  GET  /v2/health/live, /v2/health/ready, /v2/models/NAME, /v2/models/NAME/ready;
  POST /v2/models/NAME/infer                                                      (Open Inference Protocol)
  POST /v1/models/NAME/patient    one patient's images -> probability, rank, ugly-duckling score
                                  (+ fused probability for an ensemble, + saliency PNG on request)
  GET  /  the review page;  GET /metrics  Prometheus
Every error is {"error": "<one line>"} with its status: 400 bad request, 401 missing or wrong token, 404
unknown route or model, 405 wrong method, 413 body over --max_body_mb or too many images, 503 not ready or
queue full, 504 over --timeout_s.

The guard (`Guard`, plain ASGI around the app): the bearer token (health and the page stay open: a load
balancer probes without it and the page asks for it), the body limit (Content-Length first, then counted
while the body is read, so a chunked upload cannot pass it), the metrics and one log line per request
(method, route, status, milliseconds, images: never the image bytes or the query).
"""
import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import signal
import time

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from melanoma_jax.serving import batching, page, protocol
from melanoma_jax.serving import model as model_lib
from melanoma_jax.serving.protocol import ApiError
from melanoma_jax.utils.errors import InputError

LOG = logging.getLogger("melanoma_jax.serve")
OPEN_PATHS = ("/v2/health/live", "/v2/health/ready", "/")


@dataclasses.dataclass(frozen=True)
class Settings:
  """The server's options (the command's flags)."""
  model_name: str = "melanoma"
  max_batch_size: int = 16
  batch_timeout_ms: float = 100.0  # Waited only while requests are being received (see batching.py).
  max_queue: int = 256         # Images waiting for the model before a request is refused with 503.
  timeout_s: float = 60.0      # Per request, from its arrival to its answer (504 past it).
  max_body_mb: float = 100.0   # Request body (413 past it).
  max_instances: int = 64      # Images per request (413 past it).
  token: str = ""              # Bearer token; "" = none.
  cors_origins: tuple = ()     # Origins a browser may call from; () = no CORS headers at all.


class TooLarge(Exception):
  """The body grew past the limit while it was read."""


def error(status, message, headers=None):
  return JSONResponse({"error": " ".join(str(message).split())}, status_code=status, headers=headers)


class Guard:
  """ASGI middleware: token, body limit, metrics, one log line (see the module doc)."""

  def __init__(self, app, settings, metrics):
    self.app, self.settings, self.metrics = app, settings, metrics
    self.max_bytes = int(settings.max_body_mb * (1 << 20))

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      return await self.app(scope, receive, send)
    start, status = time.perf_counter(), [0]
    scope.setdefault("state", {})

    async def send_status(message):
      if message["type"] == "http.response.start":
        status[0] = message["status"]
      await send(message)

    self.metrics.in_flight.inc()
    try:
      refusal = self._refusal(scope)
      if refusal is not None:
        await refusal(scope, receive, send_status)
      else:
        await self.app(scope, self._counted(receive), send_status)
    finally:
      self.metrics.in_flight.dec()
      route = getattr(scope.get("route"), "path", None) or "unmatched"
      seconds = time.perf_counter() - start
      self.metrics.requests.labels(route, str(status[0])).inc()
      self.metrics.latency.labels(route).observe(seconds)
      LOG.info("%s %s %d %.1f ms images=%d", scope["method"], route, status[0], seconds * 1000,
               scope["state"].get("images", 0))

  def _refusal(self, scope):
    headers = dict(scope["headers"])
    if self.settings.token and scope["path"] not in OPEN_PATHS:
      given = headers.get(b"authorization", b"").decode("latin-1")
      if not hmac.compare_digest(given.encode(), f"Bearer {self.settings.token}".encode()):
        return error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                     {"WWW-Authenticate": "Bearer"})
    length = headers.get(b"content-length", b"0")
    if length.isdigit() and int(length) > self.max_bytes:
      return error(413, f"request body of {int(length)} bytes is over --max_body_mb={self.settings.max_body_mb:g}")
    return None

  def _counted(self, receive):
    seen = [0]

    async def counted():
      message = await receive()
      if message["type"] == "http.request":
        seen[0] += len(message.get("body", b""))
        if seen[0] > self.max_bytes:
          raise TooLarge(f"request body over --max_body_mb={self.settings.max_body_mb:g}")
      return message
    return counted


class Runtime:
  """What lives as long as the server: the batcher (its model thread), the decoding thread (one: the
  decoder's native messages are caught per image on the process's stderr) and readiness. Warm-up starts with
  the server and runs on the model thread; until it ends, scoring answers 503 and readiness is false. A
  warm-up that fails logs its reason and stops the server (`failed`: the command exits 1)."""

  def __init__(self, served, settings, metrics):
    self.served, self.metrics = served, metrics
    self.batcher = batching.Batcher(served.score, settings.max_batch_size, settings.batch_timeout_ms,
                                    settings.max_queue, metrics)
    self.decoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="decode")
    self.ready, self.failed = False, ""

  @contextlib.asynccontextmanager
  async def lifespan(self, app):
    del app
    self.batcher.start()
    warm_up = asyncio.get_running_loop().create_task(self._warm_up())
    yield
    warm_up.cancel()
    await self.batcher.stop()
    self.decoder.shutdown(wait=True)

  async def _warm_up(self):
    start = time.perf_counter()
    try:
      await self.batcher.run_exclusive(self.served.warm_up)
    except Exception as e:  # pylint: disable=broad-except
      self.failed = f"warm-up failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
      LOG.error("%s", self.failed)
      os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's own graceful stop; the command then exits 1.
      return
    self.metrics.warmup_seconds.set(time.perf_counter() - start)
    self.ready = True
    self.metrics.ready.set(1)
    LOG.info("ready: every step compiled in %.1f s", time.perf_counter() - start)


def create_app(served, settings, metrics, state):
  """The FastAPI app serving `served` (a ServedModel) with `state` (its Runtime)."""
  app = FastAPI(title="melanoma_jax model server", docs_url=None, redoc_url=None, openapi_url=None,
                lifespan=state.lifespan)
  name = settings.model_name

  @app.exception_handler(ApiError)
  async def api_error(request, e):
    return error(e.status, e.message)

  @app.exception_handler(HTTPException)
  async def http_error(request, e):
    detail = e.detail if e.status_code != 404 else f"no route {request.method} {request.url.path}"
    if e.status_code == 405:
      detail = f"method {request.method} is not allowed on {request.url.path}"
    return error(e.status_code, detail)

  @app.exception_handler(RequestValidationError)
  async def validation_error(request, e):
    return error(400, str(e))

  @app.exception_handler(TooLarge)
  async def too_large(request, e):
    return error(413, str(e))

  def known(requested):
    if requested != name:
      raise ApiError(404, f"model {requested!r} not found; this server serves {name!r}")

  def ready():
    if not state.ready:
      raise ApiError(503, "the model is warming up (compiling); retry when /v2/health/ready answers 200")

  async def body_json(request):
    raw = await request.body()
    try:
      return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
      raise ApiError(400, f"the body is not JSON ({e})") from None

  async def decode(request, data, where):
    """Model inputs [N, S, S, 3] of encoded images `data`; ApiError 400 naming the first bad image."""
    request.scope["state"]["images"] = len(data)
    results = await asyncio.get_running_loop().run_in_executor(state.decoder, lambda: [served.decode(d) for d in data])
    for i, (_, reason) in enumerate(results):
      if reason:
        raise ApiError(400, f"{where}[{i}]: {reason}")
    return np.stack([x for x, _ in results]).astype(np.float32, copy=False)

  async def scored(x, arrival):
    ready()
    try:
      return await asyncio.wait_for(state.batcher.score(x, arrival), settings.timeout_s)
    except batching.Busy as e:
      raise ApiError(503, str(e)) from None
    except asyncio.TimeoutError:
      raise ApiError(504, f"not answered within --timeout_s={settings.timeout_s:g}") from None

  @app.get("/v1/models/{requested}")
  async def tf_status(requested: str):
    if requested.endswith((":predict", ":classify", ":regress")):
      raise ApiError(405, f"{requested.split(':')[1]} needs POST")
    known(requested)
    state_name, code = ("AVAILABLE", "OK") if state.ready else ("LOADING", "UNAVAILABLE")
    return {"model_version_status": [{"version": served.version, "state": state_name,
                                      "status": {"error_code": code, "error_message": ""}}]}

  @app.get("/v1/models/{requested}/metadata")
  async def tf_metadata(requested: str):
    known(requested)
    tensor = lambda key, dtype: {"dtype": dtype, "tensor_shape": {"dim": [{"size": "-1", "name": ""}],
                                                                   "unknown_rank": False}, "name": f"{key}:0"}
    signature = {"inputs": {protocol.INPUT: tensor(protocol.INPUT, "DT_STRING")},
                 "outputs": {protocol.OUTPUT: tensor(protocol.OUTPUT, "DT_FLOAT")},
                 "method_name": "tensorflow/serving/predict"}
    return {"model_spec": {"name": name, "signature_name": "", "version": served.version},
            "metadata": {"signature_def": {"signature_def": {"serving_default": signature}}}}

  @app.post("/v1/models/{target}")
  async def tf_predict(target: str, request: Request):
    requested, _, verb = target.rpartition(":")
    if verb != "predict":
      raise ApiError(404 if verb not in ("classify", "regress") else 400,
                     f"no route POST {request.url.path}; use /v1/models/{name}:predict")
    known(requested)
    data, form = protocol.tf_predict(await body_json(request), settings.max_instances)
    with state.batcher.arriving() as arrival:
      x = await decode(request, data, "instances" if form == "row" else "inputs")
      return protocol.tf_answer((await scored(x, arrival)).tolist(), form)

  @app.get("/v2/health/live")
  async def live():
    return {"live": True}

  @app.get("/v2/health/ready")
  async def ready_route():
    return JSONResponse({"ready": bool(state.ready)}, status_code=200 if state.ready else 503)

  @app.get("/v2/models/{requested}")
  async def v2_metadata(requested: str):
    known(requested)
    return {"name": name, "versions": [served.version], "platform": "onnxruntime" if served.engine == "onnx" else "jax",
            "inputs": [{"name": protocol.INPUT, "datatype": "BYTES", "shape": [-1]}],
            "outputs": [{"name": protocol.OUTPUT, "datatype": "FP64", "shape": [-1]}],
            # What the patient endpoint offers (the review page reads it).
            "parameters": {"saliency": served.explains, "fuses": served.fuses,
                           "operating_point": served.operating_point}}

  @app.get("/v2/models/{requested}/ready")
  async def v2_ready(requested: str):
    known(requested)
    return JSONResponse({"name": name, "ready": bool(state.ready)}, status_code=200 if state.ready else 503)

  @app.post("/v2/models/{requested}/infer")
  async def v2_infer(requested: str, request: Request):
    known(requested)
    data, request_id = protocol.v2_infer(await body_json(request), settings.max_instances)
    with state.batcher.arriving() as arrival:
      x = await decode(request, data, "inputs[0].data")
      return protocol.v2_answer(name, served.version, (await scored(x, arrival)).tolist(), request_id)

  @app.post("/v1/models/{requested}/patient")
  async def patient(requested: str, request: Request):
    known(requested)
    ready()
    data, names, metadata, saliency = protocol.patient(await body_json(request), settings.max_instances)
    x = await decode(request, data, "images")
    try:
      model_lib.check_names(names)
      if saliency:
        served.check_explains()
      rows = await asyncio.wait_for(state.batcher.run_exclusive(served.patient, x, names, metadata),
                                    settings.timeout_s)
      if saliency:
        for row, image in zip(rows, x):
          title = f"{row['name']}: probability {row['probability']:.3f}"
          png = await state.batcher.run_exclusive(served.saliency_png, image, title)
          row["saliency_png"] = base64.b64encode(png).decode("ascii")
    except InputError as e:
      raise ApiError(400, str(e)) from None
    except asyncio.TimeoutError:
      raise ApiError(504, f"not answered within --timeout_s={settings.timeout_s:g}") from None
    metrics.images.inc(len(x))
    return {"model_name": name, "model_version": served.version, "fused": served.fuses and metadata is not None,
            "operating_point": served.operating_point, "images": rows}

  @app.get("/", response_class=HTMLResponse)
  async def review_page():
    return HTMLResponse(page.HTML.replace("__MODEL_NAME__", json.dumps(name)))

  @app.get("/metrics")
  async def metrics_route():
    body, content_type = metrics.render()
    return Response(body, media_type=content_type)

  return app
