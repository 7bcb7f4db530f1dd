"""The review page served at `/`: one HTML document with its style and script inline and no external asset (it
works offline, and nothing leaves the machine but the calls to this server).

A clinician drops one or several photos of one patient (optionally the patient's sex and age and each lesion's
site, which an ensemble fuses); the page posts them to the patient endpoint and shows, per image ranked by
probability: the probability, the verdict at the run's operating point, named as such (the threshold reaching
90% sensitivity on the run's validation images, from report.json; "no operating point" when the run has
none), the rank and ugly-duckling score among this patient's images, the fused probability for an ensemble
and the Grad-CAM figure. A notice says it is not a diagnosis. Numbers carry their full value in
`data-value` and show four decimals. The token, when the server needs one, is typed in or given as
`/#token=...` (a fragment never reaches the server's logs).
"""

HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>melanoma_jax: patient review</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; max-width: 1200px; }
 #notice { background: #fff3cd; border: 2px solid #c9a000; padding: .8em 1em; font-weight: 600; }
 #drop { border: 2px dashed #888; padding: 1.5em; text-align: center; margin: 1em 0; }
 #drop.over { background: #eef6ff; }
 table { border-collapse: collapse; width: 100%; margin-top: 1em; }
 th, td { border-bottom: 1px solid #ddd; padding: .4em; text-align: left; vertical-align: top; }
 td.num { font-variant-numeric: tabular-nums; }
 img.thumb { width: 96px; height: 96px; object-fit: cover; }
 img.cam { max-width: 480px; }
 .above { color: #a00; font-weight: 600; } .below { color: #060; }
 #error { color: #a00; white-space: pre-wrap; }
 label { margin-right: 1em; }
</style></head>
<body>
<h1>Patient review</h1>
<p id="notice">Not a diagnosis. This page shows a research model's scores for the photos given; it does not
replace a clinician's examination, dermoscopy or histopathology.</p>
<p><label>Token <input id="token" type="password" autocomplete="off" size="24"></label>
<label>Sex <select id="sex"><option value="">unknown</option><option>male</option><option>female</option></select></label>
<label>Age <input id="age" type="number" min="0" max="120" step="5" size="4"></label></p>
<div id="drop">Drop one patient's lesion photos (JPEG or PNG) here, or
 <input id="files" type="file" accept="image/jpeg,image/png" multiple></div>
<div id="sites"></div>
<p><button id="analyse" disabled>Analyse</button> <span id="status"></span></p>
<div id="error"></div>
<p id="operating"></p>
<table id="results" hidden><thead><tr><th>Rank</th><th>Image</th><th>Name</th><th>Probability</th><th>Verdict</th>
<th>Ugly duckling</th><th id="fusedhead" hidden>Fused</th><th>Grad-CAM</th></tr></thead><tbody></tbody></table>
<p id="legend" hidden>Rank: 1 is this patient's highest probability. Ugly duckling: the photo's mean distance
to the patient's other photos in the model's features, over their typical distance (1: as typical as the
others; higher: stands out). Grad-CAM: the photo, where the model looked, SmoothGrad.</p>
<script>
"use strict";
const MODEL = __MODEL_NAME__;
const SITES = ["", "head/neck", "upper extremity", "lower extremity", "torso", "palms/soles", "oral/genital"];
let chosen = [], info = null;
const $ = (id) => document.getElementById(id);
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) $("token").value = fragment.get("token");

function headers() {
  const h = {"Content-Type": "application/json"};
  if ($("token").value) h["Authorization"] = "Bearer " + $("token").value;
  return h;
}
function text(tag, value, cls) {
  const el = document.createElement(tag); el.textContent = value; if (cls) el.className = cls; return el;
}
function number(value) {
  const td = text("td", value === null || value === undefined ? "" : value.toFixed(4), "num");
  td.dataset.value = value; return td;
}
function choose(files) {
  chosen = Array.from(files).filter((f) => /^image\/(jpeg|png)$/.test(f.type) || /\.(jpe?g|png)$/i.test(f.name));
  const sites = $("sites"); sites.replaceChildren();
  chosen.forEach((f, i) => {
    const label = text("label", f.name + " site ");
    const select = document.createElement("select"); select.id = "site" + i;
    SITES.forEach((s) => select.append(new Option(s || "unknown", s)));
    label.append(select); sites.append(label);
  });
  $("analyse").disabled = chosen.length === 0;
  $("status").textContent = chosen.length + " photo(s) chosen";
}
function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}
async function modelInfo() {
  const r = await fetch("/v2/models/" + encodeURIComponent(MODEL), {headers: headers()});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body.parameters || {};
}
async function analyse() {
  $("error").textContent = ""; $("status").textContent = "scoring...";
  try {
    info = await modelInfo();
    const sex = $("sex").value || null, age = $("age").value === "" ? null : Number($("age").value);
    const images = await Promise.all(chosen.map(async (f, i) => {
      const item = {b64: await base64(f), name: f.name};
      const site = $("site" + i).value || null;
      if (sex !== null || age !== null || site !== null) Object.assign(item, {sex: sex, age: age, site: site});
      return item;
    }));
    const r = await fetch("/v1/models/" + encodeURIComponent(MODEL) + "/patient", {
      method: "POST", headers: headers(), body: JSON.stringify({images: images, saliency: !!info.saliency})});
    const body = await r.json();
    if (!r.ok) throw new Error(r.status + ": " + (body.error || r.statusText));
    show(body, images);
    $("status").textContent = "done: " + body.images.length + " image(s)";
  } catch (e) {
    $("error").textContent = String(e.message || e); $("status").textContent = "";
  }
}
function show(body, images) {
  const point = body.operating_point;
  $("operating").textContent = point
    ? "Verdict at the operating point: probability >= " + point.threshold.toFixed(4) + ", the threshold for " + point.name + "."
    : "Verdict: none; this run has no operating point (no report.json with a 90% sensitivity threshold).";
  $("fusedhead").hidden = !body.fused;
  const rows = body.images.map((row, i) => ({row: row, image: images[i]})).sort((a, b) => a.row.rank - b.row.rank);
  const tbody = $("results").tBodies[0]; tbody.replaceChildren();
  for (const {row, image} of rows) {
    const tr = document.createElement("tr"); tr.className = "result"; tr.dataset.name = row.name;
    tr.append(text("td", String(row.rank), "rank"));
    const thumb = document.createElement("img"); thumb.className = "thumb"; thumb.alt = row.name;
    thumb.src = "data:image/*;base64," + image.b64;
    const cell = document.createElement("td"); cell.append(thumb); tr.append(cell);
    tr.append(text("td", row.name, "name"));
    const probability = number(row.probability); probability.classList.add("probability"); tr.append(probability);
    let verdict = "no operating point", cls = "verdict";
    if (point) {
      const above = row.probability >= point.threshold;
      verdict = (above ? "above" : "below") + " the " + point.name.split(" on ")[0] + " threshold";
      cls += above ? " above" : " below";
    }
    tr.append(text("td", verdict, cls));
    const duck = number(row.ugly_duckling); duck.classList.add("ugly_duckling"); tr.append(duck);
    if (body.fused) { const f = number(row.pred_fused); f.classList.add("fused"); tr.append(f); }
    const camCell = document.createElement("td"); camCell.className = "saliency";
    if (row.saliency_png) {
      const cam = document.createElement("img"); cam.className = "cam"; cam.alt = "Grad-CAM of " + row.name;
      cam.src = "data:image/png;base64," + row.saliency_png; camCell.append(cam);
    } else { camCell.textContent = "none (an ensemble explains no single network)"; }
    tr.append(camCell);
    tbody.append(tr);
  }
  $("results").hidden = false; $("legend").hidden = false;
}
$("files").addEventListener("change", (e) => choose(e.target.files));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => { e.preventDefault(); $("drop").classList.remove("over"); choose(e.dataTransfer.files); });
$("analyse").addEventListener("click", analyse);
</script></body></html>
"""
