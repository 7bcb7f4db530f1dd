"""Latency and images/s of the model server over loopback HTTP, against in-process scoring of the same images.

  .venv/bin/python benchmarks/serve_http.py --workdir=runs/demo [--requests 128] [--concurrency 1,8,32]

Starts `python -m melanoma_jax.serve --workdir=W` on a free loopback port (this process's environment, so
the same devices) and, once it is ready, runs bounded clients per concurrency level: `--requests` TF Serving
:predict requests of one JPEG each, spread over that many threads (each with its own keep-alive connection),
then stops; the figures are each request's latency (p50, p99) and the images/s of the whole level. In the
same run and process, the in-process reference is what the predict command does with the same JPEGs
(`inference.images.Reader.read_data`, then the predictor's `score`): one image at a time in a batch of one
per device (p50 latency), and images/s in batches of --max_batch_size, the largest the server forms (the
reference of the throughput ratio), and of the run's global batch (the predict command's). Server and
reference take turns, never run at once.
The JPEGs are the workdir's test records (its synthetic or real test images), cycled.

Goals (issue 26): at concurrency 32, images/s at least 0.8x in-process batch scoring; at concurrency 1, p50
latency at most 1.3x in-process single-image latency. The last line printed is one JSON object.
"""
import argparse
import base64
import concurrent.futures
import glob
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # pylint: disable=g-import-not-at-top,wrong-import-position


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--workdir", required=True, help="a trained image run (main.py --workdir)")
  parser.add_argument("--requests", type=int, default=128, help="requests per concurrency level")
  parser.add_argument("--concurrency", default="1,8,32")
  parser.add_argument("--max_batch_size", type=int, default=32)
  parser.add_argument("--batch_timeout_ms", type=float, default=100.0, help="the server's default")
  parser.add_argument("--out", default=None, help="also write the JSON line to this file")
  return parser.parse_args(argv)


def test_jpegs(workdir, limit=64):
  from melanoma_jax.data import records  # pylint: disable=g-import-not-at-top
  paths = sorted(glob.glob(os.path.join(workdir, "data", "test*.tfrec")))
  jpegs = [e["image"] for p in paths for e in records.read_examples(p)][:limit]
  if not jpegs:
    raise SystemExit(f"error: {workdir}/data holds no test records to send")
  return jpegs


def percentile(values, q):
  values = sorted(values)
  return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def in_process(workdir, jpegs, requests, max_batch_size):
  """The predict command's path in this process: p50 ms of one image, images/s of batches of --max_batch_size
  (the largest the server forms) and of the run's global batch."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import images as images_lib  # pylint: disable=g-import-not-at-top
  from melanoma_jax.inference import loading  # pylint: disable=g-import-not-at-top
  predictor = loading.load_predictor(workdir)
  reader = images_lib.Reader(predictor.image_size)
  batch = predictor.global_batch

  def score(data, rows=None):
    return predictor.score(np.stack([reader.read_data(d)[0] for d in data]), batch=rows).probabilities

  # One image in a batch of one per device (not padded to the global batch): the fastest single image here.
  one = jax.local_device_count()
  score(jpegs[:1], one)  # Both shapes compiled before timing (the server compiles at start-up too).
  score(jpegs[:max_batch_size], max_batch_size)
  score(jpegs[:batch])
  single = []
  for i in range(min(requests, 64)):
    start = time.perf_counter()
    score([jpegs[i % len(jpegs)]], one)
    single.append(time.perf_counter() - start)

  def images_per_s(rows):
    start, done = time.perf_counter(), 0
    while done < requests:
      chunk = [jpegs[(done + i) % len(jpegs)] for i in range(min(rows, requests - done))]
      score(chunk, rows)
      done += len(chunk)
    return requests / (time.perf_counter() - start)

  return {"single_p50_ms": 1000 * statistics.median(single), "batch_images_per_s": images_per_s(max_batch_size),
          "global_batch_images_per_s": images_per_s(batch), "global_batch": batch, "model": predictor.description}


def start_server(workdir, args):
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  log = tempfile.TemporaryFile()  # Not a pipe: one log line per request would fill it and block the server.
  proc = subprocess.Popen([sys.executable, "-m", "melanoma_jax.serve", f"--workdir={workdir}", f"--port={port}",
                           f"--max_batch_size={args.max_batch_size}", f"--batch_timeout_ms={args.batch_timeout_ms}",
                           "--max_queue=4096"], cwd=common.REPO, stdout=log, stderr=log)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    try:
      conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
      conn.request("GET", "/v2/health/ready")
      if conn.getresponse().status == 200:
        return proc, port
    except OSError:
      pass
    time.sleep(0.2)
  proc.kill()
  log.seek(0)
  raise SystemExit(f"error: the server did not get ready: {log.read().decode()[-2000:]}")


def counters(port):
  """(batches, images) the server has scored, from its /metrics."""
  conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
  conn.request("GET", "/metrics")
  values = dict(line.rsplit(" ", 1) for line in conn.getresponse().read().decode().splitlines()
                if line and not line.startswith("#"))
  conn.close()
  return float(values["melanoma_batches_total"]), float(values["melanoma_images_scored_total"])


def cpu_seconds(pid):
  """User + system CPU seconds process `pid` has used so far."""
  with open(f"/proc/{pid}/stat") as f:
    fields = f.read().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def over_http(port, jpegs, requests, concurrency, server_pid):
  """Latencies of `requests` one-image :predict requests from `concurrency` threads, and the level's images/s."""
  bodies = [json.dumps({"instances": [{"b64": base64.b64encode(j).decode()}]}).encode() for j in jpegs]
  counter = iter(range(requests))

  def client(_):
    conn, latencies = http.client.HTTPConnection("127.0.0.1", port, timeout=300), []
    for i in counter:  # Shared: the threads together send exactly `requests`.
      start = time.perf_counter()
      conn.request("POST", "/v1/models/melanoma:predict", body=bodies[i % len(bodies)],
                   headers={"Content-Type": "application/json"})
      response = conn.getresponse()
      response.read()
      if response.status != 200:
        raise SystemExit(f"error: HTTP {response.status}")
      latencies.append(time.perf_counter() - start)
    conn.close()
    return latencies

  batches, images = counters(port)
  server_cpu, client_cpu = cpu_seconds(server_pid), time.process_time()
  start = time.perf_counter()
  with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
    latencies = [t for part in pool.map(client, range(concurrency)) for t in part]
  wall = time.perf_counter() - start
  server_cpu, client_cpu = cpu_seconds(server_pid) - server_cpu, time.process_time() - client_cpu
  after = counters(port)
  return {"p50_ms": 1000 * statistics.median(latencies), "p99_ms": 1000 * percentile(latencies, 99),
          "images_per_s": requests / wall, "mean_batch": (after[1] - images) / max(1.0, after[0] - batches),
          # Cores busy on average: the clients share this machine's cores with the server.
          "server_cores": server_cpu / wall, "client_cores": client_cpu / wall}


def main(argv=None):
  args = parse_args(argv)
  jpegs = test_jpegs(args.workdir)
  levels = [int(c) for c in args.concurrency.split(",")]
  reference = in_process(args.workdir, jpegs, args.requests, args.max_batch_size)
  proc, port = start_server(args.workdir, args)
  try:
    over_http(port, jpegs, min(args.requests, 16), max(levels), proc.pid)  # Warm: connections, first batches.
    http_levels = {str(c): over_http(port, jpegs, args.requests, c, proc.pid) for c in levels}
  finally:
    proc.send_signal(signal.SIGTERM)
    proc.wait(120)
  for level, row in http_levels.items():
    print(f"concurrency {level:>3}: p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  "
          f"{row['images_per_s']:7.1f} images/s  mean batch {row['mean_batch']:.1f}  cores: server "
          f"{row['server_cores']:.2f}, clients {row['client_cores']:.2f}", file=sys.stderr)
  print(f"in process: one image p50 {reference['single_p50_ms']:.1f} ms, batches of {args.max_batch_size} "
        f"{reference['batch_images_per_s']:.1f} images/s, of the global batch {reference['global_batch']} "
        f"{reference['global_batch_images_per_s']:.1f} images/s", file=sys.stderr)
  result = {"benchmark": "serve_http", "machine": common.machine(), "model": reference["model"],
            "requests": args.requests, "max_batch_size": args.max_batch_size,
            "batch_timeout_ms": args.batch_timeout_ms, "in_process": reference, "http": http_levels,
            "throughput_ratio_at_max_concurrency": http_levels[str(max(levels))]["images_per_s"]
                                                   / reference["batch_images_per_s"],
            "p50_ratio_at_concurrency_1": (http_levels["1"]["p50_ms"] / reference["single_p50_ms"]
                                           if "1" in http_levels else None)}
  line = json.dumps(result)
  if args.out:
    with open(args.out, "w") as f:
      f.write(line + "\n")
  print(line)


if __name__ == "__main__":
  main()
