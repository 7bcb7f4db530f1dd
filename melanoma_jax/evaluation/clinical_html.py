"""report.html of a clinical report (evaluation/clinical.py): one file, readable offline.

Plots are inline SVG drawn from the report dict itself, the CSS is inline and nothing is linked, so the
file can be mailed or archived alone and shows exactly the numbers of report.json.
"""
import html

_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}h3{font-size:1.05em}
table{border-collapse:collapse;margin:.5em 0 1em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.plots{display:flex;flex-wrap:wrap;gap:1.5em}
.note{color:#555;font-size:.9em}svg text{font-size:11px;font-family:system-ui,sans-serif}
"""
_SIZE, _PAD = 300, 40  # Plot area side and margin, in SVG pixels.
_COLORS = {"before": "#1f77b4", "after": "#ff7f0e"}
_DERM_STYLE = (("#d62728", "square"), ("#2ca02c", "diamond"))


def _f(x, digits=3):
  return "–" if x is None else f"{x:.{digits}f}"


def _pct(x):
  return "–" if x is None else f"{100 * x:.1f}%"


def _coords(x, y):
  """SVG coordinates of a point of the unit square (y up)."""
  return _PAD + x * _SIZE, _PAD + (1 - y) * _SIZE


def _xy(x, y):
  return "{:.1f},{:.1f}".format(*_coords(x, y))


def _axes(xlabel, ylabel, title):
  """The opening of a unit-square plot: frame, grid, ticks, labels, diagonal."""
  parts = [f'<svg width="{_SIZE + 2 * _PAD}" height="{_SIZE + 2 * _PAD}" '
           f'role="img" aria-label="{html.escape(title)}">',
           f'<text x="{_PAD + _SIZE / 2}" y="{_PAD - 12}" text-anchor="middle" font-weight="bold">'
           f'{html.escape(title)}</text>']
  for k in range(6):
    v = k / 5
    parts.append(f'<line x1="{_PAD}" y1="{_PAD + (1 - v) * _SIZE}" x2="{_PAD + _SIZE}" y2="{_PAD + (1 - v) * _SIZE}" '
                 f'stroke="#eee"/><line x1="{_PAD + v * _SIZE}" y1="{_PAD}" x2="{_PAD + v * _SIZE}" '
                 f'y2="{_PAD + _SIZE}" stroke="#eee"/>'
                 f'<text x="{_PAD + v * _SIZE}" y="{_PAD + _SIZE + 14}" text-anchor="middle">{v:.1f}</text>'
                 f'<text x="{_PAD - 6}" y="{_PAD + (1 - v) * _SIZE + 4}" text-anchor="end">{v:.1f}</text>')
  parts += [f'<rect x="{_PAD}" y="{_PAD}" width="{_SIZE}" height="{_SIZE}" fill="none" stroke="#333"/>',
            f'<polyline points="{_xy(0, 0)} {_xy(1, 1)}" fill="none" stroke="#999" stroke-dasharray="4 3"/>',
            f'<text x="{_PAD + _SIZE / 2}" y="{_PAD + _SIZE + 30}" text-anchor="middle">{html.escape(xlabel)}</text>',
            f'<text transform="translate({_PAD - 28},{_PAD + _SIZE / 2}) rotate(-90)" text-anchor="middle">'
            f'{html.escape(ylabel)}</text>']
  return parts


def _marker(x, y, color, shape, label):
  cx, cy = _coords(x, y)
  tip = f"<title>{html.escape(label)}</title>"
  if shape == "square":
    return f'<rect x="{cx - 5:.1f}" y="{cy - 5:.1f}" width="10" height="10" fill="{color}">{tip}</rect>'
  corners = " ".join(f"{cx + dx:.1f},{cy + dy:.1f}" for dx, dy in ((0, -7), (7, 0), (0, 7), (-7, 0)))
  return f'<polygon points="{corners}" fill="{color}">{tip}</polygon>'


def roc_svg(stage, dermatologists):
  """The stage's ROC curve (1 - specificity on x) with the dermatologists' operating points."""
  parts = _axes("1 - specificity", "Sensitivity", "ROC")
  roc = stage["roc"]
  points = " ".join(_xy(x, y) for x, y in zip(roc["fpr"], roc["tpr"]))
  parts.append(f'<polyline points="{points}" fill="none" stroke="{_COLORS["before"]}" stroke-width="2"/>')
  for d, (color, shape) in zip(dermatologists, _DERM_STYLE):
    parts.append(_marker(1 - d["specificity"], d["sensitivity"], color, shape,
                         f'{d["name"]}: sensitivity {_pct(d["sensitivity"])}, specificity {_pct(d["specificity"])}'))
  parts.append("</svg>")
  return "".join(parts)


def reliability_svg(calibration):
  """Malignant share against mean probability per bin, before (and after) calibration."""
  parts = _axes("Mean predicted probability", "Observed malignant share", "Reliability")
  for when, result in calibration.items():
    filled = [b for b in result["bins"] if b["count"]]
    points = " ".join(_xy(b["mean_probability"], b["malignant_share"]) for b in filled)
    parts.append(f'<polyline points="{points}" fill="none" stroke="{_COLORS[when]}" stroke-width="2"/>')
    for b in filled:
      cx, cy = _coords(b["mean_probability"], b["malignant_share"])
      parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="{_COLORS[when]}">'
                   f'<title>{when}: {b["count"]} images in [{b["low"]:.1f}, {b["high"]:.1f})</title></circle>')
  parts.append("</svg>")
  return "".join(parts)


def _table(header, rows):
  head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
  body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
  return f"<table><tr>{head}</tr>{body}</table>"


def _ci(stage):
  ci = stage["auc_ci"]
  if not ci or ci["low"] is None:
    return _f(stage["auc"])
  return f'{_f(stage["auc"])} [{_f(ci["low"])}, {_f(ci["high"])}]'


def _summary_rows(report):
  rows = []
  for name, s in report["stages"].items():
    cal = s["calibration"]
    after = cal.get("after")
    rows.append([name, s["images"], s["malignant"], _ci(s), _f(s["pauc_80"], 4), _f(cal["before"]["brier"], 4),
                 _f(after["brier"], 4) if after else "–", _f(cal["before"]["ece"], 4),
                 _f(after["ece"], 4) if after else "–"])
  return rows


def _point_rows(points, what):
  return [[f'{what} ≥ {_pct(p["target"])}', _f(p["threshold"], 4), _pct(p["sensitivity"]), _pct(p["specificity"])]
          for p in points]


def _stage_section(name, stage):
  out = [f"<h2>Stage: {html.escape(name)}</h2>",
         f'<p>{stage["images"]} images of {stage["patients"]} patients, {stage["malignant"]} malignant; '
         f'probabilities from column <code>{html.escape(stage["column"])}</code>'
         + (f', calibrated from <code>{html.escape(stage["calibrated_column"])}</code>'
            if "calibrated_column" in stage else "") + ".</p>"]
  if stage["auc"] is None:
    out.append('<p class="note">One class only: no AUC, ROC or operating points.</p>')
  else:
    ci = stage["auc_ci"]
    out.append(f'<p>AUC {_ci(stage)} ({100 * ci["level"]:.0f}% interval, {ci["valid"]} of {ci["resamples"]} '
               f'{ci["unit"]}-level bootstrap resamples, seed {ci["seed"]}); partial AUC above 80% sensitivity '
               f'{_f(stage["pauc_80"], 4)} (max 0.2).</p>')
  plots = [] if stage["roc"] is None else [roc_svg(stage, stage["dermatologists"])]
  plots.append(reliability_svg(stage["calibration"]))
  out.append(f'<div class="plots">{"".join(plots)}</div>')
  legend = ["<b style='color:#1f77b4'>blue</b>: " + ("ROC / before calibration" if stage["roc"] else "before")]
  if "after" in stage["calibration"]:
    legend.append("<b style='color:#ff7f0e'>orange</b>: after calibration")
  if stage["roc"]:
    legend += ["<b style='color:#d62728'>■</b> dermatologists, dermoscopy alone",
               "<b style='color:#2ca02c'>◆</b> dermatologists with clinical information (Haenssle et al. 2018)"]
  out.append(f'<p class="note">{"; ".join(legend)}.</p>')
  if stage["operating_points"]:
    ops = stage["operating_points"]
    out += ["<h3>Operating points</h3>",
            _table(["Constraint", "Threshold", "Sensitivity", "Specificity"],
                   _point_rows(ops["specificity_at_sensitivity"], "sensitivity")
                   + _point_rows(ops["sensitivity_at_specificity"], "specificity")),
            "<h3>Against the dermatologists</h3>",
            _table(["Reader", "Their sensitivity", "Their specificity", "Model specificity at their sensitivity",
                    "Model sensitivity at their specificity"],
                   [[d["name"], _pct(d["sensitivity"]), _pct(d["specificity"]),
                     _pct(d["model_specificity_at_their_sensitivity"]["specificity"]),
                     _pct(d["model_sensitivity_at_their_specificity"]["sensitivity"])]
                    for d in stage["dermatologists"]])]
  out.append("<h3>Calibration</h3>")
  out.append(_table(["", "Brier", "ECE (10 bins)"],
                    [[when, _f(c["brier"], 4), _f(c["ece"], 4)] for when, c in stage["calibration"].items()]))
  out.append("<h3>Subgroups</h3>")
  for group, rows in stage["subgroups"].items():
    out.append(f"<p><b>{html.escape(group)}</b></p>")
    out.append(_table(["Group", "Images", "Malignant", "AUC"],
                      [[r["group"], r["n"], r["malignant"], _f(r["auc"])] for r in rows]))
  return "".join(out)


_DEFINITIONS = """<h2>Definitions</h2><ul class="note">
<li>A case is called malignant when its probability is ≥ the threshold.</li>
<li>AUC interval: percentile interval of the AUC over bootstrap resamples that draw patients with
replacement (all of a patient's images come along); resamples with one class are skipped.</li>
<li>Specificity at sensitivity S: the best specificity among thresholds whose sensitivity is ≥ S.
Sensitivity at specificity P: the best sensitivity among thresholds whose specificity is ≥ P.</li>
<li>Partial AUC above 80% sensitivity (ISIC 2024): area under the ROC curve and above sensitivity 0.8,
between 0 and 0.2 (0.02 for a random ranking).</li>
<li>ECE: over 10 equal-width probability bins, |mean probability − malignant share| weighted by the bin's
share of images. Brier: mean squared difference of probability and label.</li>
<li>Dermatologists: Haenssle et al., Ann Oncol 2018;29:1836-1842 (58 dermatologists, 100 dermoscopic
images): 86.6% sensitivity / 71.3% specificity with dermoscopy alone, 88.9% / 75.7% with clinical
information. Their test set is not this one: the comparison is indicative only.</li></ul>"""


def _choice_section(choice):
  """The second stage's out-of-fold choice: each stage's pick and every candidate's AUC."""
  stages = choice["stages"]
  picked = [[name, _f(s["nested_oof_auc"], 4), s["chosen"], _f(s["chosen_oof_auc"], 4),
             ", ".join(sorted(set(s["chosen_per_fold"].values())))] for name, s in stages.items()]
  kept_by = {}
  for name, s in stages.items():
    kept_by.setdefault(s["chosen"], []).append(name)
  candidates = [[c, _f(a, 4), ", ".join(kept_by.get(c, []))] for c, a in choice["candidate_oof_auc"].items()]
  return ("<h2>Second stage: the out-of-fold choice</h2>"
          f"<p>Rule: {html.escape(choice['rule'])}. A stage's AUC is nested: each fold's rows are scored by the "
          "candidate chosen without that fold.</p>"
          + _table(["Stage", "AUC (nested)", "Fitted on all rows", "Its own AUC", "Chosen in the folds"], picked)
          + _table(["Candidate", "Out-of-fold AUC", "Kept by"], candidates))


def render(report):
  """The whole report.html as a string."""
  title = html.escape(report["title"])
  head = (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
          f"<style>{_CSS}</style></head><body><h1>{title}</h1>"
          f'<p>{report["images"]} images of {report["patients"]} patients, {report["malignant"]} malignant.</p>')
  summary = _table(["Stage", "Images", "Malignant", "AUC [95% CI]", "pAUC > 80% TPR", "Brier", "Brier calibrated",
                    "ECE", "ECE calibrated"], _summary_rows(report))
  stages = "".join(_stage_section(name, stage) for name, stage in report["stages"].items())
  choice = _choice_section(report["choice"]) if "choice" in report else ""
  return f"{head}<h2>Summary</h2>{summary}{stages}{choice}{_DEFINITIONS}</body></html>\n"
