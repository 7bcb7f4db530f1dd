"""A model server for tests: `python -m melanoma_jax.serve` in a subprocess on a free loopback port, and a tiny
HTTP client over one new connection per request (tests/test_serve.py, tests/test_onnx.py)."""
import http.client
import json
import signal
import socket
import subprocess
import sys
import time

import helpers


def free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Server:
  """The server's process and a tiny HTTP client over one new connection per request."""

  def __init__(self, proc, port, log, auth=None):
    self.proc, self.port, self.log, self.auth = proc, port, log, dict(auth or {})

  def request(self, method, path, body=None, headers=None, auth=True, timeout=120):
    """(status, headers, body bytes); `body` a dict is sent as JSON, bytes as they are."""
    headers = dict(headers or {}, **(self.auth if auth else {}))
    if isinstance(body, (dict, list)):
      body, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
    try:
      conn.request(method, path, body=body, headers=headers)
      response = conn.getresponse()
      return response.status, dict(response.getheaders()), response.read()
    finally:
      conn.close()

  def json(self, method, path, body=None, **kwargs):
    status, _, data = self.request(method, path, body, **kwargs)
    return status, json.loads(data)

  def metrics(self):
    """{sample name with labels: value} of /metrics."""
    status, _, data = self.request("GET", "/metrics")
    assert status == 200
    out = {}
    for line in data.decode().splitlines():
      if line and not line.startswith("#"):
        key, value = line.rsplit(" ", 1)
        out[key] = float(value)
    return out

  def rss_mb(self):
    with open(f"/proc/{self.proc.pid}/status") as f:
      return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def start(log_path, *flags, auth=None):
  """A Server (`python -m melanoma_jax.serve FLAGS`) on a free loopback port, once ready (its log in
  `log_path`); `auth`: headers every request of its client carries unless told not to."""
  port = free_port()
  log = open(log_path, "w")
  proc = subprocess.Popen([sys.executable, "-m", "melanoma_jax.serve", f"--port={port}", *flags],
                          cwd=helpers.REPO, env=helpers.ENV, stdout=log, stderr=subprocess.STDOUT)
  log.close()  # The child holds its own copy.
  served = Server(proc, port, log_path, auth)
  deadline = time.time() + 180
  while True:
    assert proc.poll() is None, log_path.read_text()[-3000:]
    assert time.time() < deadline, log_path.read_text()[-3000:]
    try:
      if served.request("GET", "/v2/health/ready", auth=False, timeout=5)[0] == 200:
        return served
    except OSError:
      pass
    time.sleep(0.2)


def stop(served):
  """SIGTERM, then a kill past 60 s."""
  if served.proc.poll() is None:
    served.proc.send_signal(signal.SIGTERM)
    try:
      served.proc.wait(60)
    except subprocess.TimeoutExpired:
      served.proc.kill()
      served.proc.wait()
