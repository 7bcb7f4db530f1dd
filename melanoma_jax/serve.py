"""Serve a trained run or ensemble over HTTP: the TF Serving REST API, the Open Inference Protocol v2, a patient
endpoint and a review page (melanoma_jax/serving/).

  python -m melanoma_jax.serve --workdir=runs/demo [--host=127.0.0.1] [--port=8501] [--model_name=melanoma]
      [--max_batch_size=16] [--batch_timeout_ms=100] [--max_queue=256] [--timeout_s=60] [--token=...]
      [--cors_origins=https://viewer.example]
  python -m melanoma_jax.serve --engine=onnx --exported=EXPORT [--onnx_model=fp32|int8] [...]

Loads the workdir's best checkpoint through `inference.loading.load_predictor` (as the predict command does)
and holds the workdir's lock shared while it serves (no run can train there meanwhile; refused in one line
while one does), binds 127.0.0.1 unless --host says otherwise, and compiles every step before
/v2/health/ready answers 200: the predict step at a few batch sizes (`serving.model.batch_sizes`), each
batch padded to the smallest that holds it. --engine=onnx serves an ONNX export with ONNX Runtime instead (no
workdir, no lock, nothing to compile; its patient answers have no ugly-duckling scores and no saliency maps:
the export holds no embeddings and no gradients). SIGTERM (or Ctrl-C) stops accepting connections, answers the requests in
flight and exits 0. Exit code 1 with one `error:` line on bad input (workdir, flags, a port in use), before
the model loads. The token may come from $MELANOMA_JAX_SERVE_TOKEN instead of --token (kept out of `ps`).
"""
import contextlib
import os
import signal
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # Before anything imports TensorFlow.

from absl import app, flags

from melanoma_jax.utils import cli

FLAGS = flags.FLAGS
TOKEN_VARIABLE = "MELANOMA_JAX_SERVE_TOKEN"


def serve(workdir, host, port, settings, limits=None, tta=None, require_finished=False, engine="jax", exported="",
          onnx_model="fp32", dtype=None):
  """Serves until SIGTERM or SIGINT; returns the exit code (raises RunError on bad input). `engine` "onnx":
  ONNX Runtime on export `exported`'s `onnx_model` instead of `workdir` (as the predict command's)."""
  check_engine(engine, workdir, exported, tta, dtype)  # Before the slow imports.
  import logging  # pylint: disable=g-import-not-at-top
  import uvicorn  # pylint: disable=g-import-not-at-top
  from starlette.middleware.cors import CORSMiddleware  # pylint: disable=g-import-not-at-top
  from melanoma_jax import serving  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import loading  # pylint: disable=g-import-not-at-top
  from melanoma_jax.serving import app as app_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.training import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  handler = logging.StreamHandler(sys.stderr)
  handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
  app_lib.LOG.addHandler(handler)
  app_lib.LOG.setLevel(logging.INFO)
  app_lib.LOG.propagate = False
  lock = workdir_lib.read_lock(workdir) if engine == "jax" else contextlib.nullcontext()
  with lock:
    start = time.perf_counter()
    if engine == "onnx":
      from melanoma_jax.inference import onnx_predictor  # pylint: disable=g-import-not-at-top
      onnx_predictor.read_record(exported)  # A folder that is no export is refused before the bind.
    else:
      loading.kind_of(workdir)  # A workdir of another kind is refused before anything loads.
    sock = bind(host, port)  # A port in use is refused before the slow load, too.
    if engine == "onnx":
      predictor = onnx_predictor.load(exported, onnx_model)
      print(predictor.description, file=sys.stderr, flush=True)
    else:
      predictor = loading.load_predictor(workdir, tta=tta, dtype=dtype)
      loading.announce(workdir, predictor, require_finished)
    metrics = serving.Metrics()
    metrics.load_seconds.set(time.perf_counter() - start)
    served = serving.ServedModel(workdir if engine == "jax" else None, predictor, limits, settings.max_batch_size)
    runtime = serving.Runtime(served, settings, metrics)
    application = serving.create_app(served, settings, metrics, runtime)
    application.add_middleware(app_lib.Guard, settings=settings, metrics=metrics)
    if settings.cors_origins:  # Added last: outermost, so a browser's preflight is answered before the token.
      application.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                 allow_methods=["GET", "POST"], allow_headers=["Authorization", "Content-Type"])
    app_lib.LOG.info("serving %s as %r on http://%s:%d (loaded in %.1f s)", predictor.description,
                     settings.model_name, host, port, time.perf_counter() - start)
    config = uvicorn.Config(application, host=host, port=port, log_level="info", access_log=False,
                            lifespan="on", timeout_graceful_shutdown=settings.timeout_s + 5)
    server = uvicorn.Server(config)
    # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler found at start: this
    # one, so the drained server exits 0 instead of dying by the signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.signal(signal.SIGINT, lambda *_: None)  # Ctrl-C likewise (no KeyboardInterrupt traceback).
    server.run(sockets=[sock])
  if runtime.failed or not server.started:
    return 1
  app_lib.LOG.info("stopped")
  return 0


def check_engine(engine, workdir, exported, tta, dtype=None):
  """The engine's flags, refused in one line when they do not fit (the predict command's rules)."""
  cli.check_engine(engine, workdir, exported, (("--tta", tta is not None), ("--dtype", dtype is not None)),
                   "serves --exported=DIR (its own TTA)")


def bind(host, port):
  """A TCP socket bound to (host, port), for uvicorn to listen on; InputError in one line if it cannot be."""
  import socket  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import InputError  # pylint: disable=g-import-not-at-top
  try:
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.socket(family, socket.SOCK_STREAM)
  except OSError as e:
    raise InputError(f"--host={host}: {e.strerror or e}") from None
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise InputError(f"{host}:{port}: cannot listen there ({e.strerror or e}); choose another --port") from None
  return sock


def settings_of_flags():
  from melanoma_jax.serving import app as app_lib  # pylint: disable=g-import-not-at-top
  origins = tuple(o.strip() for o in FLAGS.cors_origins.split(",") if o.strip())
  # The environment variable keeps the token out of `ps` listings; the flag wins when both are given.
  token = FLAGS.token or os.environ.get(TOKEN_VARIABLE, "")
  return app_lib.Settings(model_name=FLAGS.model_name, max_batch_size=FLAGS.max_batch_size,
                          batch_timeout_ms=FLAGS.batch_timeout_ms, max_queue=FLAGS.max_queue,
                          timeout_s=FLAGS.timeout_s, max_body_mb=FLAGS.max_body_mb,
                          max_instances=FLAGS.max_instances, token=token, cors_origins=origins)


def main(argv):
  del argv
  from absl import logging  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import limits  # pylint: disable=g-import-not-at-top
  from melanoma_jax.utils.errors import RunError  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  if FLAGS.max_queue < FLAGS.max_batch_size:
    print(f"error: --max_queue={FLAGS.max_queue} must be at least --max_batch_size={FLAGS.max_batch_size}",
          file=sys.stderr)
    sys.exit(1)
  try:
    # Before settings_of_flags, which imports the server (and TensorFlow): a bad flag is answered at once.
    check_engine(FLAGS.engine, FLAGS.workdir, FLAGS.exported, cli.TTA_CHOICES[FLAGS.tta],
                 cli.DTYPE_CHOICES[FLAGS.dtype])
    code = serve(FLAGS.workdir, FLAGS.host, FLAGS.port, settings_of_flags(),
                 limits.Limits(FLAGS.max_file_mb, FLAGS.max_pixels), cli.TTA_CHOICES[FLAGS.tta],
                 FLAGS.require_finished, FLAGS.engine, FLAGS.exported, FLAGS.onnx_model,
                 cli.DTYPE_CHOICES[FLAGS.dtype])
  except RunError as e:
    print(f"error: {e}", file=sys.stderr)
    code = e.exit_code
  sys.exit(code)


def _define_flags():
  flags.DEFINE_string("workdir", "", "A trained run's or ensemble's directory (main.py --workdir); --engine=jax.")
  flags.DEFINE_enum("engine", "jax", ["jax", "onnx"], "jax: the workdir's checkpoint; onnx: ONNX Runtime on "
                    "--exported.")
  flags.DEFINE_string("exported", "", "An ONNX export's folder (python -m melanoma_jax.export --format=onnx).")
  flags.DEFINE_enum("onnx_model", "fp32", ["fp32", "int8"], "Which model of --exported ONNX Runtime runs.")
  flags.DEFINE_string("host", "127.0.0.1", "Address to bind (0.0.0.0 exposes the server to the network).")
  flags.DEFINE_integer("port", 8501, "TCP port (TF Serving's REST port by default).", lower_bound=0)
  flags.DEFINE_string("model_name", "melanoma", "The model's name in the URLs (/v1/models/NAME).")
  flags.DEFINE_integer("max_batch_size", 16, "Most images scored in one batch of grouped requests.", lower_bound=1)
  # Long enough for a burst of requests to be decoded into one batch (batches of 32 at concurrency 32 on the
  # demo's model instead of two of about 16: docs/performance.md); a lone request never waits for it.
  flags.DEFINE_float("batch_timeout_ms", 100.0, "Most a batch waits for requests already being received.",
                     lower_bound=0)
  flags.DEFINE_integer("max_queue", 256, "Most images waiting for the model; past it requests get 503.",
                       lower_bound=1)
  flags.DEFINE_float("timeout_s", 60.0, "Per-request limit, arrival to answer; past it 504.", lower_bound=0.001)
  flags.DEFINE_float("max_body_mb", 100.0, "Largest request body (MB); a larger one gets 413.", lower_bound=0)
  flags.DEFINE_integer("max_instances", 64, "Most images in one request; more get 413.", lower_bound=1)
  flags.DEFINE_string("token", "", "Bearer token every request but health and the page must carry ('' = "
                      f"${TOKEN_VARIABLE} if set, else none).")
  flags.DEFINE_string("cors_origins", "", "Comma-separated origins browsers may call from ('' = no CORS).")
  cli.define_tta_flag()
  cli.define_dtype_flag()
  from melanoma_jax.inference import limits  # pylint: disable=g-import-not-at-top
  cli.define_reader_flags(limits.DEFAULT_MAX_FILE_MB, limits.DEFAULT_MAX_PIXELS, over="is refused with 400",
                          uses="serves")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
