"""`python -m shims doctor --html PATH`: the report as one self-contained HTML page (inline CSS and SVG, one inline
script that only measures what the browser drew; nothing is fetched when it is viewed).

    the summary line; the findings ranked by cost, each with the code around its line; the suppressed findings;
    a timeline of the first observed events (training forwards, evaluation forwards, backward passes, optimizer
    steps), forwards at a wasted-work finding's line marked; with --profile, the operator table (per-step averages)
    and a link to the trace.
"""

from __future__ import annotations

import html
import linecache
import os

from shims.detect import results

LANES = (("forward", "training forward"), ("eval-forward", "evaluation forward"), ("backward", "backward"),
         ("step", "optimizer step"))
WIDTH, LANE, LEFT = 1100, 26, 150

_CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:24px;color:#1d232b;max-width:1200px}
h1{font-size:20px} h2{font-size:17px;margin-top:28px}
.summary{background:#eef3f8;border-left:4px solid #3d6ea5;padding:8px 12px}
table.findings{border-collapse:collapse;width:100%} table.findings td,table.findings th{padding:4px 8px;
border-bottom:1px solid #d7dde4;text-align:left;vertical-align:top}
.finding{margin:14px 0;padding:10px 14px;border:1px solid #d7dde4;border-radius:6px}
.finding h3{font-size:15px;margin:0 0 6px} .cost{color:#7a3d00} .fix{color:#0d5b2a} .basis{color:#66707c}
pre.code{background:#f6f8fa;padding:6px 0;overflow-x:auto;font-size:12.5px}
pre.code span{display:block;padding:0 10px} pre.code span.hit{background:#ffe5b4;font-weight:600}
svg text{font-size:11px;fill:#444} .legend span{display:inline-block;margin-right:14px}
.swatch{display:inline-block;width:12px;height:10px;margin-right:4px;vertical-align:middle}
table.ops td,table.ops th{padding:2px 8px;text-align:right} table.ops td:first-child{text-align:left}
"""
_COLORS = {"forward": "#3d6ea5", "eval-forward": "#8a6fbf", "backward": "#4f9a5b", "step": "#c98a1b",
           "wasted": "#d0342c"}

_SCRIPT = """
(function(){
  var bars=document.querySelectorAll('#timeline rect.event'), drawn=0;
  bars.forEach(function(r){ if(r.getBoundingClientRect().height>0) drawn++; });
  var rows=document.querySelectorAll('article.finding'), shown=0;
  rows.forEach(function(a){ if(a.getBoundingClientRect().height>0) shown++; });
  document.getElementById('rendered').textContent='rendered: '+shown+' findings, '+drawn+' timeline events';
})();
"""


def _esc(text):
    return html.escape(str(text), quote=True)


def code_around(where, context=3):
    """The lines around file:line, the line itself marked (empty when the source cannot be read)."""
    path, _, line = (where or "").rpartition(":")
    if not line.isdigit():
        return ""
    number = int(line)
    rows = []
    for n in range(max(1, number - context), number + context + 1):
        text = linecache.getline(path, n)
        if not text and n > number:
            break
        rows.append(f'<span class="{"hit" if n == number else ""}">{n:>5}  {_esc(text.rstrip())}</span>')
    return f'<pre class="code">{"".join(rows)}</pre>' if rows else ""


def _finding(number, f):
    parts = [f'<article class="finding" data-kind="{_esc(f.kind)}" id="finding-{number}">',
             f"<h3>{number}. <code>{_esc(f.kind)}</code> &times;{f.count} at "
             f"<code>{_esc(results.shown_place(f.where))}</code> &middot; {_esc(results.cost_column(f))}</h3>",
             f"<p>{_esc(f.message)}</p>"]
    if f.framework:
        parts.append(f"<p>in {_esc(f.framework)} {_esc(f.framework_version or '(version unknown)')}, reached from "
                     f"<code>{_esc(results.shown_place(f.user_where))}</code></p>")
    if f.cost:
        parts.append(f'<p class="cost">cost: {_esc(f.cost)} <span class="basis">'
                     f'[{_esc(results.BASIS.get(f.basis, f.basis))}]</span></p>')
    if f.fix:
        parts.append(f'<p class="fix">fix: {_esc(f.fix)}</p>')
    if f.alternative:
        parts.append(f"<p>or: {_esc(f.alternative)}</p>")
    if len(f.ranks) > 1:
        parts.append("<p>per process: " + " | ".join(f"{_esc(p)}: {c}" for p, c in f.ranks) + "</p>")
    parts.append(code_around(f.where))
    if f.user_where:
        parts.append(code_around(f.user_where))
    parts.append("</article>")
    return "\n".join(parts)


def timeline_svg(report):
    events = report.observed.timeline
    if not events:
        return "<p>No events were observed (no forward, backward or optimizer step).</p>"
    wasted = {f.where for f in report.findings if f.name in results.WASTED}
    start, end = min(e[1] for e in events), max(e[2] for e in events)
    scale = (WIDTH - LEFT - 10) / max(end - start, 1e-9)
    height = LANE * len(LANES) + 30
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" role="img" '
           f'aria-label="timeline of observed events">']
    rows = {kind: i for i, (kind, _) in enumerate(LANES)}
    for kind, label in LANES:
        y = rows[kind] * LANE
        out.append(f'<text x="4" y="{y + 17}">{_esc(label)}</text>')
        out.append(f'<line x1="{LEFT}" x2="{WIDTH - 10}" y1="{y + LANE - 2}" y2="{y + LANE - 2}" stroke="#e3e7ec"/>')
    for kind, t0, t1, where in events:
        if kind not in rows:
            continue
        waste = kind in ("forward", "eval-forward") and where in wasted
        x = LEFT + (t0 - start) * scale
        w = max((t1 - t0) * scale, 1.5)
        color = _COLORS["wasted" if waste else kind]
        tip = f"{kind} {1000 * (t1 - t0):.2f} ms" + (f" at {results.shown_place(where)}" if where else "") + \
            (" (wasted: its graph was never used)" if waste else "")
        out.append(f'<rect class="event{" wasted" if waste else ""}" data-kind="{kind}" x="{x:.1f}" '
                   f'y="{rows[kind] * LANE + 4}" width="{w:.1f}" height="{LANE - 8}" fill="{color}">'
                   f"<title>{_esc(tip)}</title></rect>")
    y = LANE * len(LANES) + 20
    out.append(f'<text x="{LEFT}" y="{y}">0 s</text><text x="{WIDTH - 80}" y="{y}">{end - start:.3f} s</text>')
    out.append("</svg>")
    legend = " ".join(f'<span><i class="swatch" style="background:{_COLORS[k]}"></i>{_esc(label)}</span>'
                      for k, label in LANES + (("wasted", "wasted work (a forward whose graph no backward used)"),))
    note = (f"<p>The first {len(events)} events of the run; {report.observed.timeline_dropped} later events are "
            "counted in the summary but not drawn.</p>" if report.observed.timeline_dropped else "")
    return "\n".join(out) + f'<p class="legend">{legend}</p>' + note


def _profile(profile):
    if not profile:
        return ""
    rows = "".join(f"<tr><td>{_esc(r['name'])}</td><td>{r['calls_per_step']:.1f}</td>"
                   f"<td>{r['self_cpu_ms_per_step']:.3f}</td><td>{_esc(r.get('self_device_ms_per_step', '-'))}</td>"
                   "</tr>" for r in profile.get("operators", ()))
    trace = profile.get("trace")
    link = (f'<p>Trace (open in chrome://tracing or ui.perfetto.dev): <a href="{_esc(_file_uri(trace))}">'
            f"{_esc(trace)}</a></p>") if trace else ""
    return (f'<section id="profile"><h2>Profile</h2><p>{_esc(profile.get("window", ""))}</p>'
            '<table class="ops"><tr><th>operator</th><th>calls/step</th><th>self CPU ms/step</th>'
            f"<th>self device ms/step</th></tr>{rows}</table>{link}</section>")


def _file_uri(path):
    from pathlib import Path
    return Path(os.path.abspath(path)).as_uri()


def render(report, title="shims doctor", profile=None):
    findings = "\n".join(_finding(n, f) for n, f in enumerate(report.findings, 1)) or "<p>No findings.</p>"
    suppressed = ""
    if report.suppressed:
        items = "".join(f"<li><code>{_esc(f.kind)}</code> &times;{f.count} at "
                        f"<code>{_esc(results.shown_place(f.where))}</code>: {_esc(f.suppressed)}</li>"
                        for f in report.suppressed)
        suppressed = f'<section id="suppressed"><h2>Suppressed ({len(report.suppressed)})</h2><ul>{items}</ul></section>'
    problems = ""
    if report.problems:
        problems = "<h2>Not observed</h2><ul>" + "".join(f"<li>{_esc(p)}</li>" for p in report.problems) + "</ul>"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{_esc(title)}</h1>
<p class="summary" id="summary">{_esc(report.summary)}</p>
<p id="rendered"></p>
<section id="timeline"><h2>Timeline</h2>
{timeline_svg(report)}
</section>
<section id="findings"><h2>Findings, costliest first</h2>
{findings}
</section>
{suppressed}
{_profile(profile)}
{problems}
<script>{_SCRIPT}</script>
</body></html>
"""


def write(path, report, title="shims doctor", profile=None):
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(report, title, profile))
