"""The HTML report: one self-contained page (no network) that fits 1280-1440 px.

    harness leaderboard RUN_DIR... --format html --out report.html

A provenance header, a sortable leaderboard (lossless, lossy and copy-based methods marked),
two overview plots, then one panel per method: its accepted-length histogram, acceptance by
position, time per decode step against the reference, speedup per sample, and a sample viewer
(prompt, output with the step each token came from, the first divergence if any).

Plots are plotly figures with plotly.js inlined once (the ``plots`` extra installs plotly);
labels are never placed on points: methods are told apart by a legend or an axis. Everything is
read from the run files (``harness.report.Runs``, texts.jsonl); nothing reads a model.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Optional

import pandas as pd

from harness.report import REFERENCE, REPETITION_NOTE, STOP_NOTE, Runs, header, pass_at_1_label, provenance
from harness.results import RunDir
from harness.errors import HarnessError

# methods whose drafts copy text already seen (the prompt, the output, a corpus or the reference):
# their speedup grows with the repetition column, not with how well anything predicts new text
COPY_BASED = {"prompt-lookup", "hf-prompt-lookup", "reference-lookup", "suffix", "rest"}
COLOURS = {"reference": "#6b7280", "lossless": "#2563eb", "copy-based": "#7c3aed", "lossy": "#ea580c",
           "unchecked": "#0d9488"}
GAIN, LOSS = "#16a34a", "#dc2626"
PLOT_CONFIG = {"displayModeBar": False, "responsive": True}  # drag to zoom, double-click to reset; no toolbar over titles
FONT = "system-ui, -apple-system, Segoe UI, Roboto, sans-serif"


class PageError(HarnessError):
    """The page cannot be made as asked; the message says what to do."""


@dataclass
class Column:
    """One leaderboard column: its header, a tooltip, the cell text and the value it sorts by."""

    title: str  # the header as a reader sees it
    tip: str  # what the figure means (the header's tooltip)
    text: Callable[[dict], str]  # the cell
    key: Callable[[dict], object]  # the sort value (a number or a string)


def fmt(value, digits: int = 2, suffix: str = "") -> str:
    """A number at a sensible precision; an en dash for a missing one."""
    if value is None or (isinstance(value, float) and value != value):
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def kind(row: dict) -> str:
    """reference | lossy | unchecked | copy-based | lossless: how a method's row is marked."""
    if row["method"] == REFERENCE:
        return "reference"
    if row.get("lossless") == "lossy mode" or row.get("mismatches", 0) > 0:
        return "lossy"
    if row.get("lossless") == "not checked":  # sampling: outputs are not compared token for token
        return "unchecked"
    return "copy-based" if row["method"] in COPY_BASED else "lossless"


def speedup_cell(row: dict) -> str:
    low, high = row.get("speedup_low"), row.get("speedup_high")
    interval = f' <span class="ci">[{fmt(low)}–{fmt(high)}]</span>' if low == low and low is not None else ""
    return f"<b>{fmt(row['speedup'], 2, '×')}</b>{interval}"


def nowrap(text: str) -> str:
    return f'<span class="nw">{text}</span>'


def num(name: str) -> Callable[[dict], object]:
    return lambda r: r.get(name) if r.get(name) == r.get(name) else -1e9


COLUMNS = [
    Column("Samples", "requests (sample x turn) measured", lambda r: str(r["samples"]), num("samples")),
    Column("Exact match", "share of outputs equal to greedy autoregressive decoding token for token; ties = first "
           "difference at a near-zero logit margin", lambda r: fmt(r["exact_match"] * 100, 0, "%")
           + (f' <span class="ci">{r["ties"]} ties</span>' if r.get("ties") else ""), num("exact_match")),
    Column("Speedup [95% CI]", "tokens/s over autoregressive, paired per sample within each run; bootstrap 95% "
           "interval", speedup_cell, num("speedup")),
    Column("Limit", "the speedup the measured acceptance allows at the measured forward costs (host time ignored)",
           lambda r: fmt(r.get("limit_speedup"), 2, "×"), num("limit_speedup")),
    Column("Of limit", "measured speedup / limit", lambda r: fmt(r.get("limit_fraction", float("nan")) * 100, 0, "%"),
           num("limit_fraction")),
    Column("Best setting", "the setting the measured acceptance and costs imply (Leviathan et al.), beside the one "
           "that ran", lambda r: best_setting(r), lambda r: r.get("best_setting") or ""),
    Column("Tokens / step", "new tokens per decode step: pooled over all steps / mean of each request's own",
           lambda r: nowrap(f'{fmt(r.get("accepted_pooled"))} <span class="ci">/ {fmt(r.get("accepted_per_request"))}</span>'),
           num("accepted_pooled")),
    Column("TTFT ms", "time to first token, median", lambda r: fmt(r.get("ttft_ms"), 1), num("ttft_ms")),
    Column("ms / token p50 · p90 · p99", "per-token latency after the first, percentiles over requests",
           lambda r: nowrap(" · ".join(fmt(r.get(f"tpot_ms_p{q}"), 1) for q in (50, 90, 99))), num("tpot_ms_p50")),
    Column("Draft · verify · host ms/step", "time per decode step in draft forwards, target forwards and outside "
           "any forward", lambda r: nowrap(" · ".join(fmt(r.get(f"{p}_ms_per_step"), 1) for p in ("draft", "verify", "host"))),
           num("verify_ms_per_step")),
    Column("Repetition", REPETITION_NOTE, lambda r: fmt(r.get("repetition", float("nan")) * 100, 0, "%"),
           num("repetition")),
    Column("Stops", STOP_NOTE, lambda r: html.escape(r.get("stop_reasons") or ""), lambda r: r.get("stop_reasons") or ""),
]  # fmt: skip


def best_setting(row: dict) -> str:
    if not row.get("best_setting"):
        return "–"
    ran = row.get("setting_run", "")
    moved = row["best_setting"] != ran
    limit = fmt(row.get("best_setting_limit"), 2, "×")
    return f'{"<b>" if moved else ""}{html.escape(row["best_setting"])}{"</b>" if moved else ""} ' \
           f'<span class="ci">{limit}; ran {html.escape(ran)}</span>'  # fmt: skip


# ---- plots -----------------------------------------------------------------------------------
def plotly():
    try:
        import plotly.graph_objects as go
    except ImportError:
        raise PageError("the HTML report needs plotly: pip install -e '.[plots]' (or pip install plotly)") from None
    return go


class Figures:
    """Renders figures to HTML divs, plotly.js inlined with the first one only."""

    def __init__(self):
        self.go = plotly()
        self.count = 0

    def div(self, fig, height: int) -> str:
        top = fig.layout.margin.t or 40  # a figure with its legend above the plot asks for more
        fig.update_layout(height=height, margin=dict(l=10, r=10, t=top, b=10), font=dict(family=FONT, size=13),
                          template="plotly_white", title_font_size=15, title_x=0.01)  # fmt: skip
        fig.update_xaxes(automargin=True)
        fig.update_yaxes(automargin=True)
        self.count += 1
        return fig.to_html(full_html=False, include_plotlyjs=self.count == 1, config=PLOT_CONFIG,
                           div_id=f"plot-{self.count}", default_width="100%")  # fmt: skip


def speedup_figure(figs: Figures, rows: list[dict]) -> str:
    """Horizontal bars: each method's speedup with its interval, and its limit as a diamond."""
    go = figs.go
    rows = sorted(rows, key=lambda r: r["speedup"] if r["speedup"] == r["speedup"] else -1)
    names = [r["method"] + (f" · {r['_group']}" if r.get("_group") else "") for r in rows]
    fig = go.Figure()
    fig.add_bar(y=names, x=[r["speedup"] for r in rows], orientation="h", name="measured speedup",
                marker_color=[COLOURS[kind(r)] for r in rows],
                error_x=dict(type="data", symmetric=False, color="#111827", thickness=1.2,
                             array=[max(r["speedup_high"] - r["speedup"], 0) if r["speedup_high"] == r["speedup_high"] else 0 for r in rows],
                             arrayminus=[max(r["speedup"] - r["speedup_low"], 0) if r["speedup_low"] == r["speedup_low"] else 0 for r in rows]),
                hovertemplate="%{y}: %{x:.2f}×<extra></extra>")  # fmt: skip
    fig.add_scatter(y=names, x=[r.get("limit_speedup") for r in rows], mode="markers", name="limit",
                    marker=dict(symbol="diamond", size=11, color="#111827"),
                    hovertemplate="%{y}: limit %{x:.2f}×<extra></extra>")  # fmt: skip
    fig.add_vline(x=1.0, line_dash="dash", line_color="#9ca3af")
    fig.update_layout(title="Speedup over autoregressive, with its 95% interval and its limit",
                      legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
                      xaxis_title="speedup (×)", margin_t=70)  # fmt: skip
    return figs.div(fig, max(260, 120 + 34 * len(rows)))


def accepted_figure(figs: Figures, rows: list[dict]) -> str:
    """Tokens per step against speedup, one trace per method (a legend, never labels on points).
    Methods lossy by design are left out: their tokens per target forward are not verified drafts
    (a small model writing alone counts dozens) and would squash every other point."""
    go = figs.go
    fig = go.Figure()
    top = 1.0
    for r in [r for r in rows if r.get("lossless") != "lossy mode"]:
        x = r.get("accepted_pooled")
        x = x if x == x and x is not None else r["mean_accepted_tokens"]
        top = max(top, x, r["speedup"] if r["speedup"] == r["speedup"] else 1)
        fig.add_scatter(x=[x], y=[r["speedup"]], mode="markers", name=r["method"],
                        marker=dict(size=13, color=COLOURS[kind(r)], symbol=SYMBOLS[len(fig.data) % len(SYMBOLS)],
                                    line=dict(width=1, color="white")),
                        hovertemplate=f"{r['method']}: %{{x:.2f}} tokens/step, %{{y:.2f}}×<extra></extra>")  # fmt: skip
    fig.add_scatter(x=[1, top * 1.05], y=[1, top * 1.05], mode="lines", name="speedup = tokens/step",
                    line=dict(dash="dash", color="#9ca3af"))  # fmt: skip
    fig.update_layout(title="Tokens per step vs speedup (lossless methods)", xaxis_title="tokens per decode step (pooled)",
                      yaxis_title="speedup (×)", legend=dict(font_size=12))  # fmt: skip
    return figs.div(fig, max(360, 120 + 34 * len(rows)))


SYMBOLS = ["circle", "square", "diamond", "triangle-up", "x", "star", "hexagon", "cross", "triangle-down", "pentagon"]


def histogram_figure(figs: Figures, row: dict) -> str:
    hist = {int(k): v for k, v in (row.get("accepted_histogram") or {}).items()}
    total = sum(hist.values()) or 1
    fig = figs.go.Figure(figs.go.Bar(x=list(hist), y=[v / total for v in hist.values()], marker_color="#2563eb",
                                     hovertemplate="%{x} tokens: %{y:.1%} of steps<extra></extra>"))  # fmt: skip
    fig.update_layout(title="Tokens committed per decode step", xaxis=dict(title="tokens in the step", dtick=1),
                      yaxis=dict(title="share of steps", tickformat=".0%"))  # fmt: skip
    return figs.div(fig, 300)


def position_figure(figs: Figures, row: dict) -> str:
    joint, conditional = row.get("acceptance_joint") or [], row.get("acceptance_conditional") or []
    positions = list(range(1, len(joint) + 1))
    fig = figs.go.Figure()
    fig.add_scatter(x=positions, y=conditional, mode="lines+markers", name="conditional (k given 1..k-1)")
    fig.add_scatter(x=positions, y=joint, mode="lines+markers", name="joint (1..k all accepted)")
    fig.update_layout(title="Acceptance by draft position / tree depth", xaxis=dict(title="position k", dtick=1),
                      yaxis=dict(title="acceptance", range=[0, 1.05], tickformat=".0%"),
                      legend=dict(orientation="h", y=-0.25))  # fmt: skip
    return figs.div(fig, 300)


def time_figure(figs: Figures, row: dict, reference: Optional[dict]) -> str:
    rows = [r for r in (reference, row) if r is not None]
    fig = figs.go.Figure()
    for part, colour in (("draft", "#f59e0b"), ("verify", "#2563eb"), ("host", "#9ca3af")):
        fig.add_bar(y=[r["method"] for r in rows], x=[r.get(f"{part}_ms_per_step") for r in rows], orientation="h",
                    name=part, marker_color=colour, hovertemplate=f"{part}: %{{x:.2f}} ms<extra></extra>")  # fmt: skip
    fig.update_layout(barmode="stack", title="Time per decode step", xaxis_title="ms per step",
                      legend=dict(orientation="h", y=-0.35, traceorder="normal"))  # fmt: skip
    return figs.div(fig, 300)


def per_sample_figure(figs: Figures, samples: pd.DataFrame) -> str:
    samples = samples.sort_values("speedup")
    fig = figs.go.Figure(figs.go.Bar(
        x=[str(s) for s in samples.label], y=samples.speedup,
        marker_color=[GAIN if s >= 1 else LOSS for s in samples.speedup],
        hovertemplate="%{x}: %{y:.2f}×<extra></extra>"))  # fmt: skip
    fig.add_hline(y=1.0, line_dash="dash", line_color="#9ca3af")
    fig.update_layout(title="Speedup per sample (green: gains, red: loses)", yaxis_title="speedup (×)",
                      xaxis=dict(type="category", showticklabels=len(samples) <= 24, tickangle=-45))  # fmt: skip
    return figs.div(fig, 300)


# ---- data for the panels ---------------------------------------------------------------------
def per_sample(runs: Runs, method: str, task: str) -> pd.DataFrame:
    """One row per (run, sample, turn) of the method: its speedup over the reference and its record."""
    df = runs.records
    keys = ["run", "task", "sample_id", "turn"]
    mine = df[(df.method == method) & (df.task == task)]
    ref = df[(df.method == REFERENCE) & (df.task == task)][keys + ["tokens", "wall_time_s"]]
    both = mine.merge(ref, on=keys, suffixes=("", "_ref"))
    rate = both.tokens.map(len) / both.wall_time_s
    rate_ref = both.tokens_ref.map(len) / both.wall_time_s_ref
    label = both.sample_id.astype(str) + both.turn.map(lambda t: f" (turn {t})" if t else "")
    return both.assign(speedup=rate / rate_ref, label=label)


def viewer_data(runs: Runs, samples: pd.DataFrame) -> list[dict]:
    """What the sample viewer shows for each of a method's samples (see the page's script)."""
    texts = [RunDir(p).texts() for p in runs.paths]
    out = []
    for r in samples.sort_values("speedup", ascending=False).itertuples():
        text = texts[r.run].get((str(r.sample_id), int(r.turn)), {})
        out.append({"label": r.label, "speedup": r.speedup, "status": r.status, "prompt": text.get("prompt"),
                    "pieces": text.get("pieces"), "text": r.text, "steps": list(r.accepted_per_step),
                    "first_diff": None if r.first_diff != r.first_diff else r.first_diff,
                    "tokens": len(r.tokens), "stop": r.stop_reason})  # fmt: skip
    return out


# ---- the page -------------------------------------------------------------------------------
def leaderboard_html(rows: list[dict], by: Optional[str]) -> str:
    heads = ['<th data-sort="text" title="method">Method</th>']
    if by:
        heads.append(f'<th data-sort="text">{html.escape(by.replace("_", " ").capitalize())}</th>')
    heads += [f'<th data-sort="num" title="{html.escape(c.tip)}">{html.escape(c.title)}</th>' for c in COLUMNS]
    has_pass = any(r.get("pass@1_judged") == r.get("pass@1_judged") and r.get("pass@1_judged") for r in rows)
    if has_pass:
        heads.append('<th data-sort="num" title="pass@1 of the completions, judged in the sandbox">pass@1</th>')
    body = []
    for r in rows:
        k = kind(r)
        cells = [f'<td data-v="{html.escape(r["method"])}"><a href="#m-{anchor(r)}">{html.escape(r["method"])}</a>'
                 f' <span class="badge {k}">{k}</span></td>']  # fmt: skip
        if by:
            cells.append(f"<td>{html.escape(str(r.get(by)))}</td>")
        for c in COLUMNS:
            cells.append(f'<td data-v="{html.escape(str(c.key(r)))}">{c.text(r)}</td>')
        if has_pass:
            cells.append(f'<td data-v="{r.get("pass@1", -1)}">{html.escape(pass_at_1_label(r))}</td>')
        body.append(f'<tr class="{k}">' + "".join(cells) + "</tr>")
    return f'<table id="board"><thead><tr>{"".join(heads)}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def anchor(row: dict) -> str:
    return "-".join(str(row.get(k, "")) for k in ("method", "task", "_group")).strip("-").replace(" ", "_")


def panel_html(figs: Figures, runs: Runs, row: dict, reference: Optional[dict], by: Optional[str]) -> str:
    samples = per_sample(runs, row["method"], row["task"])
    if by:  # the panel of one language / category / run directory
        samples = samples[samples[by].astype(str) == row["_group"]]
    k = kind(row)
    facts = (f"speedup {fmt(row['speedup'], 2, '×')}, limit {fmt(row.get('limit_speedup'), 2, '×')}, "
             f"{fmt(row.get('accepted_pooled'))} tokens per step, exact match {fmt(row['exact_match'] * 100, 0, '%')}")
    plots = [time_figure(figs, row, reference)]
    if row.get("accepted_histogram"):
        plots.insert(0, histogram_figure(figs, row))
    if row.get("acceptance_joint"):
        plots.insert(1, position_figure(figs, row))
    if len(samples):
        plots.append(per_sample_figure(figs, samples))
    grid = "".join(f'<div class="plot">{p}</div>' for p in plots)
    data = json.dumps(viewer_data(runs, samples), default=str).replace("</", "<\\/")
    return f"""<article class="panel {k}" id="m-{anchor(row)}">
<h3>{html.escape(row['method'] + (f" · {row['_group']}" if row["_group"] else ""))} <span class="badge {k}">{k}</span> <span class="facts">{html.escape(facts)}</span></h3>
<div class="grid">{grid}</div>
<div class="viewer"><label>Sample <select class="pick"></select></label>
<p class="legend">One shade per decode step: <span class="seg s0">a step's tokens</span><span class="seg s1">the
next step's</span>; <span class="own">underlined</span>: the target's own token, the rest were drafted and accepted;
<span class="diverged">red</span>: where the output leaves greedy decoding.</p>
<div class="cols"><div><h4>Prompt</h4><pre class="prompt"></pre></div><div><h4>Output, step by step</h4>
<pre class="output"></pre></div></div><script type="application/json" class="data">{data}</script></div>
</article>"""


def render_page(runs: Runs, table: pd.DataFrame, by: Optional[str], title: str, note: str) -> str:
    """The whole page for the ``table`` of ``harness.report.metrics``."""
    figs = Figures()
    rows = table.to_dict("records")
    for r in rows:
        r["_group"] = str(r.get(by)) if by else ""
    methods = [r for r in rows if r["method"] != REFERENCE]
    reference = {(r["task"], r["_group"]): r for r in rows if r["method"] == REFERENCE}
    overview = ""
    if methods:
        overview = (f'<div class="grid two"><div class="plot">{speedup_figure(figs, methods)}</div>'
                    f'<div class="plot">{accepted_figure(figs, methods)}</div></div>')  # fmt: skip
    panels = "\n".join(panel_html(figs, runs, r, reference.get((r["task"], r["_group"])), by) for r in methods)
    prov = provenance(runs)
    chips = "".join(f"<span>{html.escape(part)}</span>" for part in header(runs).split(" | "))
    stamp = f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    warn = "" if prov["tree"] == "clean" else f'<p class="warn">{html.escape(title)}</p>'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>spec-harness report</title><style>{CSS}</style></head>
<body><main>
<header><h1>spec-harness report</h1><p class="sub">Lossless decoding acceleration against greedy autoregressive
decoding of the same model, on the same samples, in the same run.</p>{warn}
<div class="chips">{chips}<span>{stamp}</span></div></header>
<section><h2>Leaderboard</h2>
<p class="keys"><span class="badge lossless">lossless</span> output checked equal to greedy decoding
<span class="badge copy-based">copy-based</span> drafts copy text already seen: gains grow with repetition
<span class="badge lossy">lossy</span> a lossy mode or a mismatch <span class="badge unchecked">unchecked</span>
sampled, not compared token for token <span class="badge reference">reference</span>
autoregressive. Click a header to sort; hover it for its meaning.</p>
{leaderboard_html(rows, by)}
<details><summary>How these figures are computed</summary><p class="note">{html.escape(note)}</p></details>
</section>
<section><h2>Overview</h2>{overview}</section>
<section><h2>Methods</h2>{panels}</section>
</main><script>{SCRIPT}</script></body></html>
"""


CSS = """
*{box-sizing:border-box} body{margin:0;background:#f8fafc;color:#111827;font:14px/1.45 system-ui,-apple-system,
Segoe UI,Roboto,sans-serif} main{max-width:1400px;margin:0 auto;padding:20px 24px}
h1{font-size:24px;margin:0 0 4px} h2{font-size:19px;margin:28px 0 10px} h3{font-size:16px;margin:0 0 8px}
h4{font-size:13px;margin:6px 0;color:#374151} .sub{margin:0 0 10px;color:#4b5563}
.chips{display:flex;flex-wrap:wrap;gap:6px} .chips span{background:#e5e7eb;border-radius:4px;padding:2px 8px;
font-size:12px} .warn{background:#fef3c7;border:1px solid #f59e0b;padding:6px 10px;border-radius:4px}
table{width:100%;border-collapse:collapse;background:#fff;font-size:13px;table-layout:auto}
th{background:#f1f5f9;text-align:right;padding:6px 6px;font-weight:600;cursor:pointer;vertical-align:bottom;
border-bottom:2px solid #cbd5e1;user-select:none} th:first-child,td:first-child{text-align:left}
th.asc::after{content:" ▲";font-size:10px} th.desc::after{content:" ▼";font-size:10px}
td{padding:5px 6px;text-align:right;border-bottom:1px solid #e5e7eb} td .ci,.nw{white-space:nowrap}
tr.lossless td:first-child{border-left:4px solid #2563eb} tr.copy-based td:first-child{border-left:4px solid #7c3aed}
tr.lossy td:first-child{border-left:4px solid #ea580c} tr.reference td:first-child{border-left:4px solid #6b7280}
tr.lossy{background:#fff7ed} .ci{color:#6b7280;font-size:12px} td a{color:inherit;font-weight:600}
.badge{font-size:11px;border-radius:3px;padding:1px 5px;color:#fff;white-space:nowrap;font-weight:500}
.badge.lossless{background:#2563eb} .badge.copy-based{background:#7c3aed} .badge.lossy{background:#ea580c}
.badge.reference{background:#6b7280} .badge.unchecked{background:#0d9488}
tr.unchecked td:first-child{border-left:4px solid #0d9488} .panel.unchecked{border-top-color:#0d9488} .keys{font-size:13px;color:#374151} .note{font-size:13px;color:#4b5563}
.grid{display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:12px} .plot{background:#fff;
border:1px solid #e5e7eb;border-radius:6px;padding:4px;min-width:0}
.panel{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:14px;margin:0 0 18px;
border-top:4px solid #2563eb} .panel.copy-based{border-top-color:#7c3aed} .panel.lossy{border-top-color:#ea580c}
.panel .plot{border:none}
.facts{font-weight:400;color:#4b5563;font-size:13px;margin-left:8px}
.viewer{margin-top:10px;border-top:1px solid #e5e7eb;padding-top:8px} .cols{display:grid;
grid-template-columns:minmax(0,2fr) minmax(0,3fr);gap:12px} pre{white-space:pre-wrap;overflow-wrap:anywhere;
background:#f8fafc;border:1px solid #e5e7eb;border-radius:4px;padding:8px;margin:0;max-height:320px;overflow-y:auto;
font:12px/1.5 ui-monospace,SFMono-Regular,Menlo,monospace} select{font:inherit;max-width:100%}
.seg.s0{background:#dbeafe} .seg.s1{background:#fef3c7} .own{border-bottom:2px solid #2563eb}
.diverged{background:#fee2e2} .legend{font-size:12px;color:#4b5563;margin:6px 0} .legend span{padding:0 4px}
details{margin-top:8px} summary{cursor:pointer;color:#374151}
"""

# sorting the leaderboard, and the sample viewers: a step's tokens share a background; the last
# token of a step (the target's own) is underlined; tokens from the first divergence on are red
SCRIPT = r"""
document.querySelectorAll('#board th').forEach((th, i) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0], asc = !th.classList.contains('asc');
  th.parentNode.querySelectorAll('th').forEach(h => h.classList.remove('asc', 'desc'));
  th.classList.add(asc ? 'asc' : 'desc');
  const value = tr => { const c = tr.cells[i], v = c.dataset.v ?? c.textContent, n = parseFloat(v);
                        return isNaN(n) ? v : n; };
  [...body.rows].sort((a, b) => { const x = value(a), y = value(b);
    return (x > y ? 1 : x < y ? -1 : 0) * (asc ? 1 : -1); }).forEach(r => body.appendChild(r));
}));
function esc(s) { const d = document.createElement('span'); d.textContent = s; return d.innerHTML; }
function show(view, s) {
  view.querySelector('.prompt').textContent = s.prompt ?? '(prompt not recorded in this run)';
  const out = view.querySelector('.output');
  if (!s.pieces) { out.textContent = s.text; return; }
  let html = '', at = 0, cut = s.first_diff ?? Infinity;
  const steps = s.steps.length ? s.steps : [s.tokens];
  for (const [k, n] of steps.entries()) {
    let seg = '';
    for (let j = 0; j < n && at < Math.min(s.tokens, cut, s.pieces.length); j++, at++)
      seg += j === n - 1 ? `<span class="own">${esc(s.pieces[at])}</span>` : esc(s.pieces[at]);
    html += `<span class="seg s${k % 2}" title="step ${k}: ${n} token(s)">${seg}</span>`;
    if (at >= cut) break;
  }
  if (s.first_diff !== null && s.first_diff !== undefined)
    html += `<span class="diverged">⟂ diverges here, at token ${s.first_diff} (${esc(s.status)})</span>` +
            `\n\n<b>This method's whole output:</b>\n` + esc(s.text);
  out.innerHTML = html;
}
document.querySelectorAll('.viewer').forEach(view => {
  const data = JSON.parse(view.querySelector('.data').textContent), pick = view.querySelector('.pick');
  data.forEach((s, i) => pick.add(new Option(`${s.label}: ${s.speedup.toFixed(2)}×, ${s.status}, ${s.tokens} tokens`, i)));
  pick.addEventListener('change', () => show(view, data[pick.value]));
  if (data.length) show(view, data[0]);
});
"""
