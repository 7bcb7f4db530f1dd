"""The model server as clients use it: `python -m melanoma_jax.serve` in a subprocess on a free loopback port.

One tiny model is trained once through main.py (75x75 synthetic lesions, 1 epoch) and one server is started
on it for the whole module (token, CORS origin, small body and instance limits, a 50 ms batching window); the
last test stops it with SIGTERM while requests are in flight. References come from the predict command's own
function (`predict.predict_folder` on the same JPEG files, in this process).
"""
import base64
import concurrent.futures
import glob
import http.client
import io
import json
import os
import signal
import struct
import time
import zlib

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import helpers
import serving_client
from melanoma_jax import predict as predict_cli
from melanoma_jax.data import records
from melanoma_jax.ensemble import context as context_lib
from melanoma_jax.inference import images as images_lib
from melanoma_jax.inference import loading

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ORIGIN = "http://viewer.example"
MAX_BODY_MB, MAX_INSTANCES = 1, 8
RSS_GROWTH_BOUND_MB = 64  # Hundreds of refused requests may not grow the server by more than this.


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A tiny model trained for 1 epoch on 12 patients' 75x75 synthetic lesions (about 25 s)."""
  workdir = tmp_path_factory.mktemp("serve") / "run"
  proc = helpers.python("main.py", "--config=configs/demo.py", f"--workdir={workdir}", "--config.model.name=tiny",
                 "--config.synthetic.image_size=75", "--config.per_device_batch_size=2", "--config.num_epochs=1",
                 "--config.synthetic.num_patients=12", "--config.log_every_steps=100", "--jax_cache_dir=")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir


@pytest.fixture(scope="module")
def jpegs(workdir):
  """Twelve test-record JPEGs as files: {file name: bytes} (sorted) and their folder."""
  examples = [e for p in sorted(glob.glob(str(workdir / "data" / "test*.tfrec"))) for e in records.read_examples(p)]
  folder = workdir.parent / "images"
  folder.mkdir()
  out = {}
  for example in examples[:12]:
    name = f"{example['image_name']}.jpg"
    (folder / name).write_bytes(example["image"])
    out[name] = example["image"]
  return dict(sorted(out.items())), folder


@pytest.fixture(scope="module")
def reference(workdir, jpegs):
  """The predict command's probabilities of the JPEG files ({file name: probability}) and its predictor."""
  predictor = loading.load_predictor(str(workdir))
  data, folder = jpegs
  rows = predict_cli.predict_folder(predictor, [str(folder / n) for n in data], progress=None)
  assert all(not r["error"] for r in rows)
  return {r["image"]: r["probability"] for r in rows}, predictor


@pytest.fixture(scope="module")
def server(workdir, tmp_path_factory):
  """The module's server: a token, one CORS origin, small body and instance limits, a 50 ms batching window."""
  served = serving_client.start(tmp_path_factory.mktemp("server_log") / "server.log", f"--workdir={workdir}",
                                f"--token={TOKEN}", f"--cors_origins={ORIGIN}", f"--max_body_mb={MAX_BODY_MB}",
                                f"--max_instances={MAX_INSTANCES}", "--batch_timeout_ms=50", "--max_batch_size=16",
                                auth=AUTH)
  yield served
  serving_client.stop(served)


def _b64(data):
  return base64.b64encode(data).decode("ascii")


def test_health_model_status_metadata_page_and_metrics(server):
  assert server.json("GET", "/v2/health/live", auth=False) == (200, {"live": True})
  assert server.json("GET", "/v2/health/ready", auth=False) == (200, {"ready": True})
  status, body = server.json("GET", "/v1/models/melanoma")
  assert status == 200 and body["model_version_status"][0]["state"] == "AVAILABLE"
  version = body["model_version_status"][0]["version"]
  status, body = server.json("GET", "/v1/models/melanoma/metadata")
  signature = body["metadata"]["signature_def"]["signature_def"]["serving_default"]
  assert status == 200 and body["model_spec"] == {"name": "melanoma", "signature_name": "", "version": version}
  assert signature["inputs"]["image_bytes"]["dtype"] == "DT_STRING"
  assert signature["outputs"]["probability"]["dtype"] == "DT_FLOAT"
  status, body = server.json("GET", "/v2/models/melanoma")
  assert status == 200 and body["inputs"] == [{"name": "image_bytes", "datatype": "BYTES", "shape": [-1]}]
  assert body["versions"] == [version] and body["outputs"][0]["name"] == "probability"
  assert server.json("GET", "/v2/models/melanoma/ready") == (200, {"name": "melanoma", "ready": True})
  status, headers, page = server.request("GET", "/", auth=False)
  assert status == 200 and headers["content-type"].startswith("text/html") and b"not a diagnosis" in page.lower()
  assert b"http://" not in page and b"https://" not in page  # No external asset: it works offline.
  metrics = server.metrics()
  for name in ("melanoma_model_load_seconds", "melanoma_warmup_seconds", "melanoma_queue_depth",
               "melanoma_images_scored_total", "melanoma_batch_size_count", "melanoma_model_ready"):
    assert name in metrics, name
  assert metrics["melanoma_model_ready"] == 1
  assert metrics['melanoma_requests_total{route="/v2/models/{requested}",status="200"}'] >= 1


def test_predictions_equal_the_predict_commands_in_every_format(server, jpegs, reference):
  data, _ = jpegs
  want = [reference[0][n] for n in data][:MAX_INSTANCES]
  images = list(data.values())[:MAX_INSTANCES]
  bodies = {"predictions": [{"instances": [{"b64": _b64(d)} for d in images]},
                            {"instances": [{"image_bytes": {"b64": _b64(d)}} for d in images]}],
            "outputs": [{"inputs": [{"b64": _b64(d)} for d in images]},
                        {"inputs": {"image_bytes": [{"b64": _b64(d)} for d in images]}}]}
  for key, requests in bodies.items():
    for body in requests:
      status, answer = server.json("POST", "/v1/models/melanoma:predict", body)
      assert status == 200 and list(answer) == [key], answer
      np.testing.assert_allclose(answer[key], want, rtol=0, atol=1e-6)
  body = {"id": "r1", "inputs": [{"name": "image_bytes", "shape": [len(images)], "datatype": "BYTES",
                                  "data": [_b64(d) for d in images]}]}
  status, answer = server.json("POST", "/v2/models/melanoma/infer", body)
  assert status == 200 and answer["id"] == "r1" and answer["model_name"] == "melanoma"
  assert answer["outputs"][0]["name"] == "probability" and answer["outputs"][0]["shape"] == [len(images)]
  np.testing.assert_allclose(answer["outputs"][0]["data"], want, rtol=0, atol=1e-6)


def test_patient_endpoint_ranks_and_ugly_duckling_scores_with_saliency(server, jpegs, reference):
  data, _ = jpegs
  names = list(data)[:5]
  body = {"images": [{"b64": _b64(data[n]), "name": n} for n in names], "saliency": True}
  status, answer = server.json("POST", "/v1/models/melanoma/patient", body)
  assert status == 200, answer
  rows = answer["images"]
  assert [r["name"] for r in rows] == names and answer["fused"] is False
  probs = np.array([r["probability"] for r in rows])
  np.testing.assert_allclose(probs, [reference[0][n] for n in names], rtol=0, atol=1e-6)
  assert [r["rank"] for r in rows] == list(1 + np.argsort(np.argsort(-probs, kind="stable"), kind="stable"))
  # The ugly-duckling score is the ensemble's image-context feature, computed by its own code.
  predictor = reference[1]
  reader = images_lib.Reader(predictor.image_size)
  x = np.stack([reader.read_data(data[n])[0] for n in names])
  scores = predictor.score(x, embeddings=True)
  context = context_lib.image_context(["p"] * len(names), scores.probabilities, scores.embeddings)
  np.testing.assert_allclose([r["ugly_duckling"] for r in rows], context["embedding_dist_mean"], rtol=0, atol=1e-6)
  point = answer["operating_point"]
  assert point["name"].startswith("90% sensitivity") and 0 < point["threshold"] < 1
  figure = Image.open(io.BytesIO(base64.b64decode(rows[0]["saliency_png"])))
  assert figure.format == "PNG" and figure.size[0] > 500  # The predict command's three panels.


def test_concurrent_requests_are_scored_in_fewer_batches(server, jpegs):
  images = list(jpegs[0].values())
  before = server.metrics()
  requests = 24
  body = lambda i: {"instances": [{"b64": _b64(images[i % len(images)])}]}
  with concurrent.futures.ThreadPoolExecutor(requests) as pool:
    answers = list(pool.map(lambda i: server.json("POST", "/v1/models/melanoma:predict", body(i)), range(requests)))
  assert all(status == 200 for status, _ in answers)
  after = server.metrics()
  scored = after["melanoma_images_scored_total"] - before["melanoma_images_scored_total"]
  batches = after["melanoma_batches_total"] - before["melanoma_batches_total"]
  assert scored == requests and batches < requests, (scored, batches)


def test_batches_are_padded_to_the_smallest_compiled_size_that_holds_them():
  from melanoma_jax.serving import model as served_model  # pylint: disable=g-import-not-at-top
  assert served_model.batch_sizes(16, 1) == [1, 2, 4, 8, 16]
  assert served_model.batch_sizes(12, 1) == [1, 2, 4, 8, 12]
  assert served_model.batch_sizes(16, 8) == [8, 16]  # Multiples of the device count.
  assert served_model.batch_sizes(20, 8) == [8, 16, 24]
  assert served_model.batch_sizes(3, 8) == [8]


def test_a_full_queue_gets_503_and_a_late_answer_504_over_http_and_the_server_stays_ready(workdir, jpegs, tmp_path):
  """A server whose queue holds one image and whose requests time out after a millisecond."""
  image = _b64(next(iter(jpegs[0].values())))
  served = serving_client.start(tmp_path / "server.log", f"--workdir={workdir}", "--max_batch_size=1",
                                "--max_queue=1", "--timeout_s=0.001")
  try:
    busy = served.json("POST", "/v1/models/melanoma:predict", {"instances": [{"b64": image}] * 2})
    late = served.json("POST", "/v2/models/melanoma/infer",
                       {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [image]}]})
    ready = served.request("GET", "/v2/health/ready")[0]
    counts = served.metrics()
  finally:
    serving_client.stop(served)
  assert served.proc.returncode == 0
  assert busy[0] == 503 and busy[1]["error"].startswith("the server is busy (0 images queued, --max_queue=1)"), busy
  assert late == (504, {"error": "not answered within --timeout_s=0.001"}), late
  assert ready == 200
  assert counts['melanoma_requests_total{route="/v1/models/{target}",status="503"}'] == 1
  assert counts['melanoma_requests_total{route="/v2/models/{requested}/infer",status="504"}'] == 1


def test_batcher_groups_waiting_requests_refuses_a_full_queue_and_skips_abandoned_ones():
  """In-process, with a model that waits for the test: what the server's batching does, without timing."""
  import asyncio  # pylint: disable=g-import-not-at-top
  import threading  # pylint: disable=g-import-not-at-top
  from melanoma_jax.serving import batching, metrics  # pylint: disable=g-import-not-at-top
  entered, release, sizes = threading.Event(), threading.Event(), []

  def score(x):
    entered.set()
    release.wait(30)
    sizes.append(len(x))
    return x[:, 0]

  async def scenario():
    batcher = batching.Batcher(score, max_batch_size=4, timeout_ms=1, max_queue=7, metrics=metrics.Metrics())
    batcher.start()
    first = asyncio.ensure_future(batcher.score(np.zeros((1, 1))))
    while not entered.is_set():
      await asyncio.sleep(0.001)  # Until the model holds the first request (and waits).
    waiting = [asyncio.ensure_future(batcher.score(np.full((2, 1), i))) for i in range(3)]
    abandoned = asyncio.ensure_future(batcher.score(np.full((1, 1), 9)))
    await asyncio.sleep(0.01)
    with pytest.raises(batching.Busy, match="busy .7 images queued, --max_queue=7"):
      await batcher.score(np.zeros((1, 1)))
    abandoned.cancel()
    release.set()
    results = [await f for f in [first, *waiting]]
    await batcher.stop()
    return results

  results = asyncio.run(scenario())
  assert sizes == [1, 4, 2]  # The first alone; two waiting requests in one batch; the third, not the abandoned.
  assert [r.tolist() for r in results] == [[0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]


def _png_bomb(side):
  """A `side` x `side` 1-bit grey PNG of zeros: a few tens of KB, `side`^2 x 3 bytes once decoded to RGB."""
  def chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
  row, packer = b"\0" * (1 + (side + 7) // 8), zlib.compressobj(9)
  body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
  header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
  return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")


def _bad_requests(jpeg):
  """(kind, method, path, body, options, status, fragment of the error line)."""
  predict, good = "/v1/models/melanoma:predict", {"b64": _b64(jpeg)}
  big = {"instances": [{"b64": "A" * (MAX_BODY_MB << 20)}]}
  return [
      ("not JSON", "POST", predict, b"{not json", {}, 400, "the body is not JSON"),
      ("wrong shape", "POST", predict, {"instances": {"b64": good["b64"]}}, {}, 400, "expected a non-empty list"),
      ("both formats", "POST", predict, {"instances": [good], "inputs": [good]}, {}, 400, "exactly one of"),
      ("bad base64", "POST", predict, {"instances": [{"b64": "not base64!"}]}, {}, 400, "not valid base64"),
      ("not an image", "POST", predict, {"instances": [{"b64": _b64(b"GIF89a" + bytes(64))}]}, {}, 400,
       "a GIF image; only JPEG and PNG are read"),
      ("a bomb", "POST", predict, {"instances": [good, {"b64": _b64(_png_bomb(20000))}]}, {}, 400,
       "instances[1]: 20000x20000 = 400000000 pixels is over --max_pixels"),
      ("oversized body", "POST", predict, big, {}, 413, "is over --max_body_mb=1"),
      ("too many instances", "POST", predict, {"instances": [good] * (MAX_INSTANCES + 1)}, {}, 413,
       f"at most {MAX_INSTANCES} per request"),
      ("v2 wrong datatype", "POST", "/v2/models/melanoma/infer",
       {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, {}, 400, "BYTES"),
      ("unknown model", "POST", "/v1/models/other:predict", {"instances": [good]}, {}, 404, "model 'other' not found"),
      ("unknown v2 model", "GET", "/v2/models/other/ready", None, {}, 404, "model 'other' not found"),
      ("wrong method", "GET", predict, None, {}, 405, "predict needs POST"),
      ("wrong method v2", "GET", "/v2/models/melanoma/infer", None, {}, 405, "method GET is not allowed"),
      ("missing token", "POST", predict, {"instances": [good]}, {"auth": False}, 401, "bearer token"),
      ("wrong token", "GET", "/v1/models/melanoma", None, {"auth": False, "headers": {"Authorization": "Bearer x"}},
       401, "bearer token"),
      ("patient without images", "POST", "/v1/models/melanoma/patient", {"images": []}, {}, 400, '"images"'),
  ]


def test_bad_requests_get_their_status_and_one_line_and_leave_the_server_well(server, jpegs):
  jpeg = next(iter(jpegs[0].values()))
  cases = _bad_requests(jpeg)
  assert {c[5] for c in cases} == {400, 401, 404, 405, 413} and len(cases) >= 10

  def check(case):
    kind, method, path, body, options, status, fragment = case
    got, headers, data = server.request(method, path, body, **options)
    answer = json.loads(data)
    assert got == status and list(answer) == ["error"], (kind, got, answer)
    assert fragment in answer["error"] and "\n" not in answer["error"], (kind, answer)
    if status == 401:
      assert headers.get("www-authenticate") == "Bearer"

  for case in cases:  # Once, so the server has allocated what answering each takes.
    check(case)
  start = server.rss_mb()
  rounds = 20
  for _ in range(rounds):
    for case in cases:
      check(case)
  grown = server.rss_mb() - start
  assert grown < RSS_GROWTH_BOUND_MB, f"RSS grew {grown:.0f} MB over {rounds * len(cases)} bad requests"
  assert server.json("GET", "/v2/health/ready", auth=False) == (200, {"ready": True})
  assert server.json("POST", "/v1/models/melanoma:predict", {"instances": [{"b64": _b64(jpeg)}]})[0] == 200


def test_a_chunked_body_over_the_limit_is_refused(server):
  conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
  chunks = (b"x" * (256 << 10) for _ in range(4 * MAX_BODY_MB + 1))  # No Content-Length: counted as it comes.
  conn.request("POST", "/v1/models/melanoma:predict", body=chunks, headers=AUTH, encode_chunked=True)
  response = conn.getresponse()
  assert response.status == 413 and "over --max_body_mb=1" in json.loads(response.read())["error"]
  conn.close()


def test_cors_answers_only_the_given_origin(server):
  preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"}
  status, headers, _ = server.request("OPTIONS", "/v1/models/melanoma:predict", auth=False,
                                      headers={"Origin": ORIGIN, **preflight})
  assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
  status, headers, _ = server.request("OPTIONS", "/v1/models/melanoma:predict", auth=False,
                                      headers={"Origin": "http://elsewhere.example", **preflight})
  assert status == 400 and "access-control-allow-origin" not in headers
  status, headers, _ = server.request("GET", "/v1/models/melanoma", headers={"Origin": ORIGIN})
  assert status == 200 and headers["access-control-allow-origin"] == ORIGIN
  status, headers, _ = server.request("GET", "/v1/models/melanoma", headers={"Origin": "http://elsewhere.example"})
  assert status == 200 and "access-control-allow-origin" not in headers


def test_log_lines_name_requests_never_their_images(server, jpegs):
  jpeg = next(iter(jpegs[0].values()))
  server.request("POST", "/v1/models/melanoma:predict", {"instances": [{"b64": _b64(jpeg)}]})
  log = server.log.read_text()
  assert "POST /v1/models/{target} 200" in log and _b64(jpeg)[:40] not in log
  assert "GET /v2/health/ready 200" in log


def test_patient_endpoint_on_an_ensemble_fuses_as_its_test_stage(ensemble_run, tmp_path):
  """The session's tiny ensemble (tests/conftest.py), served: one test patient's images and test.csv metadata
  get the pred_image and calibrated prediction of the ensemble's own test stage (test_stages.csv)."""
  workdir = ensemble_run[0]
  test_csv = pd.read_csv(workdir / "data" / "test.csv")
  counts = test_csv["patient_id"].value_counts()
  patient = counts[counts >= 3].sort_values(kind="stable").index[0]  # All their images: context is per patient.
  rows = test_csv[test_csv["patient_id"] == patient]
  wanted = set(rows["image_name"])
  jpeg = {e["image_name"]: e["image"] for p in sorted((workdir / "data").glob("test*.tfrec"))
          for e in records.read_examples(str(p)) if e["image_name"] in wanted}
  value = lambda v: None if pd.isna(v) else (float(v) if isinstance(v, (int, float, np.floating)) else str(v))
  images = [{"b64": _b64(jpeg[r.image_name]), "name": r.image_name, "sex": value(r.sex), "age": value(r.age_approx),
             "site": value(r.anatom_site_general_challenge)} for r in rows.itertuples()]
  served = serving_client.start(tmp_path / "ensemble.log", f"--workdir={workdir}")
  try:
    status, answer = served.json("POST", "/v1/models/melanoma/patient", {"images": images}, auth=False)
    refused = served.json("POST", "/v1/models/melanoma/patient", {"images": images, "saliency": True}, auth=False)
  finally:
    serving_client.stop(served)
  assert served.proc.returncode == 0
  assert status == 200 and answer["fused"] is True, answer
  want = pd.read_csv(workdir / "test_stages.csv").set_index("image_name").loc[list(rows["image_name"])]
  got = pd.DataFrame(answer["images"]).set_index("name")
  np.testing.assert_allclose(got["pred_image"], want["pred_image"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["pred_fused"], want["prediction"], rtol=0, atol=1e-5)
  np.testing.assert_allclose(got["probability"], got["pred_image"], rtol=0, atol=1e-9)
  assert refused[0] == 400 and "an ensemble workdir; saliency maps: one model only" in refused[1]["error"]


def test_a_port_in_use_is_refused_in_one_line_before_the_model_loads(server, workdir):
  proc = helpers.python("-m", "melanoma_jax.serve", f"--workdir={workdir}", f"--port={server.port}", timeout=120)
  lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert proc.returncode == 1 and lines == [f"error: 127.0.0.1:{server.port}: cannot listen there (Address already "
                                             "in use); choose another --port"], proc.stderr[-2000:]
  assert "best checkpoint" not in proc.stderr  # Refused before loading.


CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture()
def browser(tmp_path):
  """Debian's chromium, headless, through chromium-driver (.ci/run installs both), with a fresh profile."""
  from selenium import webdriver  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.chrome.service import Service  # pylint: disable=g-import-not-at-top
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.fail("chromium and chromium-driver are needed: apt-get install -y chromium chromium-driver (.ci/run does)")
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
               f"--user-data-dir={tmp_path / 'profile'}"):
    options.add_argument(flag)
  driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
  yield driver
  driver.quit()


def test_review_page_in_a_real_browser_shows_the_apis_numbers(server, jpegs, browser):
  from selenium.webdriver.common.by import By  # pylint: disable=g-import-not-at-top
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=g-import-not-at-top
  data, folder = jpegs
  names = list(data)[:4]
  browser.get(f"http://127.0.0.1:{server.port}/#token={TOKEN}")
  notice = browser.find_element(By.ID, "notice")
  assert notice.is_displayed() and "Not a diagnosis" in notice.text
  browser.find_element(By.ID, "files").send_keys("\n".join(str(folder / n) for n in names))
  browser.find_element(By.ID, "analyse").click()
  WebDriverWait(browser, 60).until(
      lambda d: d.find_element(By.ID, "error").text or len(d.find_elements(By.CSS_SELECTOR, "tr.result")) == 4)
  assert browser.find_element(By.ID, "error").text == ""
  shown = {}
  for row in browser.find_elements(By.CSS_SELECTOR, "tr.result"):
    cell = lambda cls: row.find_element(By.CSS_SELECTOR, f"td.{cls}").text
    shown[cell("name")] = (int(cell("rank")), float(cell("probability")), float(cell("ugly_duckling")), cell("verdict"))
    cam = row.find_element(By.CSS_SELECTOR, "td.saliency img")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", cam) > 500
  status, answer = server.json("POST", "/v1/models/melanoma/patient",
                               {"images": [{"b64": _b64(data[n]), "name": n} for n in names]})
  assert status == 200 and sorted(shown) == sorted(names)
  threshold = answer["operating_point"]["threshold"]
  for row in answer["images"]:  # The page shows four decimals of the API's numbers.
    rank, probability, duck, verdict = shown[row["name"]]
    assert rank == row["rank"]
    assert probability == pytest.approx(row["probability"], abs=5e-5)
    assert duck == pytest.approx(row["ugly_duckling"], abs=5e-5)
    assert verdict == ("above" if row["probability"] >= threshold else "below") + " the 90% sensitivity threshold"
  ranks = [int(r.text) for r in browser.find_elements(By.CSS_SELECTOR, "td.rank")]
  assert ranks == sorted(ranks)  # The patient ranking, most suspicious first.
  assert "threshold for 90% sensitivity on the run's validation images" in browser.find_element(By.ID, "operating").text


def test_sigterm_answers_the_requests_in_flight_and_exits_0(server, jpegs):
  """Last: it stops the module's server."""
  images = list(jpegs[0].values())
  body = {"images": [{"b64": _b64(d), "name": f"i{i}"} for i, d in enumerate(images[:4])], "saliency": True}

  def patient(_):
    try:
      return server.json("POST", "/v1/models/melanoma/patient", body)[0]
    except OSError:  # Sent after the server closed its socket: never accepted, so never in flight.
      return None

  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    futures = [pool.submit(patient, i) for i in range(4)]
    deadline = time.time() + 60
    while server.metrics()["melanoma_requests_in_flight"] < 3 and time.time() < deadline:
      time.sleep(0.01)  # The /metrics request itself is one of those in flight.
    server.proc.send_signal(signal.SIGTERM)
    statuses = [f.result() for f in futures]
  assert server.proc.wait(60) == 0, server.log.read_text()[-2000:]
  assert statuses.count(200) >= 2 and set(statuses) <= {200, None}, statuses
  assert "Finished server process" in server.log.read_text()
