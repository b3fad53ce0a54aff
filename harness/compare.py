"""Two runs side by side: the same methods, and which figures moved beyond their intervals.

    harness compare RUN_A RUN_B [--format markdown|html] [--out FILE]

Two commits, two machines, eager against compiled, two models: each run is read on its own
(its speedups are paired within it), then every method both ran is compared figure by figure:

- measured figures with a 95% interval (speedup: the paired bootstrap of ``harness.report``;
  median TTFT and median per-token latency: a bootstrap over the run's requests) *moved* when
  the two intervals do not overlap, and are *within intervals* otherwise;
- deterministic figures (tokens per step, exact match) *changed* whenever they differ at all:
  the outputs or the acceptance are not the same.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
from tabulate import tabulate

from harness.detail import request_latencies_ms
from harness.report import REFERENCE, Runs, header, load_runs, metrics

ROUNDS = 1000  # bootstrap rounds of the latency intervals


@dataclass
class Figure:
    """One figure of one method in both runs, and the verdict."""

    method: str
    task: str
    figure: str  # what is compared, as a reader reads it
    a: float
    b: float
    a_interval: Optional[tuple[float, float]]  # 95% interval; None for a deterministic figure
    b_interval: Optional[tuple[float, float]]
    verdict: str  # moved up | moved down | within intervals | changed | same | not measured
    unit: str = ""  # "×" or " ms"
    digits: int = 2


def median_interval(values: pd.Series, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the median, resampling the values (NaN for fewer than 2)."""
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    data = values.to_numpy(dtype=float)
    medians = np.median(data[rng.integers(0, len(data), size=(ROUNDS, len(data)))], axis=1)
    return float(np.percentile(medians, 2.5)), float(np.percentile(medians, 97.5))


def judged(a_interval, b_interval, a: float, b: float) -> str:
    """moved up / moved down when the intervals do not overlap, else within intervals."""
    if any(v != v for v in (*a_interval, *b_interval)):
        return "not measured" if a != a or b != b else "no interval"
    if b_interval[0] > a_interval[1]:
        return "moved up"
    if b_interval[1] < a_interval[0]:
        return "moved down"
    return "within intervals"


def exact(a: float, b: float) -> str:
    if a != a or b != b:
        return "not measured"
    return "same" if abs(a - b) < 1e-9 else "changed"


def latency_figures(method: str, task: str, ga: pd.DataFrame, gb: pd.DataFrame) -> list[Figure]:
    out = []
    for index, name in ((0, "TTFT, median"), (1, "per-token latency, median")):
        va, vb = request_latencies_ms(ga)[index], request_latencies_ms(gb)[index]
        a = float(va.median()) if len(va) else float("nan")
        b = float(vb.median()) if len(vb) else float("nan")
        ia, ib = median_interval(va), median_interval(vb)
        out.append(Figure(method, task, name, a, b, ia, ib, judged(ia, ib, a, b), " ms", 1))
    return out


def compare(a: Runs, b: Runs) -> list[Figure]:
    """Every figure of every (method, task) both runs hold, in run A's order."""
    ta, tb = metrics(a).set_index(["method", "task"]), metrics(b).set_index(["method", "task"])
    figures = []
    for key in [k for k in ta.index if k in tb.index]:
        ra, rb = ta.loc[key], tb.loc[key]
        method, task = key
        ia, ib = (ra.speedup_low, ra.speedup_high), (rb.speedup_low, rb.speedup_high)
        if method != REFERENCE:
            figures.append(Figure(method, task, "speedup", ra.speedup, rb.speedup, ia, ib,
                                  judged(ia, ib, ra.speedup, rb.speedup), "×"))  # fmt: skip
        for name, column in (("tokens per step", "accepted_pooled"), ("exact match", "exact_match")):
            figures.append(Figure(method, task, name, ra[column], rb[column], None, None, exact(ra[column], rb[column])))
        ga = a.records[(a.records.method == method) & (a.records.task == task)]
        gb = b.records[(b.records.method == method) & (b.records.task == task)]
        figures += latency_figures(method, task, ga, gb)
    return figures


def cell(value: float, interval: Optional[tuple[float, float]], unit: str, digits: int) -> str:
    if value != value:
        return "–"
    text = f"{value:.{digits}f}{unit}"
    if interval is not None and interval[0] == interval[0]:
        text += f" [{interval[0]:.{digits}f}–{interval[1]:.{digits}f}]"
    return text


MARK = {"moved up": "▲ moved up", "moved down": "▼ moved down", "changed": "≠ changed"}


def rows(figures: list[Figure]) -> list[dict]:
    return [{"method": f.method, "task": f.task, "figure": f.figure, "run A": cell(f.a, f.a_interval, f.unit, f.digits),
             "run B": cell(f.b, f.b_interval, f.unit, f.digits),
             "B / A": f"{f.b / f.a:.2f}" if f.a == f.a and f.b == f.b and f.a else "–",
             "verdict": MARK.get(f.verdict, f.verdict)} for f in figures]  # fmt: skip


NOTE = ("Each run's speedups are paired within that run. A figure with a 95% interval (speedup: paired bootstrap; "
        "latency medians: bootstrap over requests) moved when the two intervals do not overlap; tokens per step "
        "and exact match are deterministic, so any difference is a change.")  # fmt: skip


def render_markdown(a: Runs, b: Runs, figures: list[Figure]) -> str:
    moved = [f for f in figures if f.verdict in MARK]
    table = tabulate(pd.DataFrame(rows(figures)), headers="keys", tablefmt="github", showindex=False, disable_numparse=True)
    return (f"# Run A against run B\n\nrun A: {a.paths[0]} | {header(a)}\n\nrun B: {b.paths[0]} | {header(b)}\n\n"
            f"{len(moved)} of {len(figures)} figures moved or changed. {NOTE}\n\n{table}\n")  # fmt: skip


def render_html(a: Runs, b: Runs, figures: list[Figure]) -> str:
    from harness.page import CSS, Figures  # noqa: PLC0415 (plotly: the `plots` extra, only for html)

    figs = Figures()
    speed = [f for f in figures if f.figure == "speedup"]
    plot = ""
    if speed:
        fig = figs.go.Figure()
        for run, value, interval in (("run A", "a", "a_interval"), ("run B", "b", "b_interval")):
            x = [getattr(f, value) for f in speed]
            lo = [max(v - getattr(f, interval)[0], 0) if getattr(f, interval)[0] == getattr(f, interval)[0] else 0
                  for v, f in zip(x, speed)]  # fmt: skip
            hi = [max(getattr(f, interval)[1] - v, 0) if getattr(f, interval)[1] == getattr(f, interval)[1] else 0
                  for v, f in zip(x, speed)]  # fmt: skip
            fig.add_scatter(x=x, y=[f.method for f in speed], mode="markers", name=run, marker_size=12, orientation="h",
                            error_x=dict(type="data", symmetric=False, array=hi, arrayminus=lo))  # fmt: skip
        fig.add_vline(x=1.0, line_dash="dash", line_color="#9ca3af")
        fig.update_layout(title="Speedup in each run, with its 95% interval", xaxis_title="speedup (×)",
                          legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0), margin_t=70,
                          scattermode="group", scattergap=0.4)  # A above B on each method's row
        plot = f'<div class="plot">{figs.div(fig, max(260, 120 + 40 * len(speed)))}</div>'
    body = "".join(
        f'<tr class="{"lossy" if r["verdict"] in MARK.values() else ""}">'
        + "".join(f"<td>{html.escape(str(v))}</td>" for v in r.values()) + "</tr>"
        for r in rows(figures)
    )
    heads = "".join(f"<th>{html.escape(h)}</th>" for h in rows(figures)[0]) if figures else ""
    stamp = f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    chips = "".join(f"<p class='sub'><b>{name}</b> {html.escape(str(r.paths[0]))}: {html.escape(header(r))}</p>"
                    for name, r in (("run A", a), ("run B", b)))  # fmt: skip
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>spec-harness: run A against run B</title><style>{CSS}
td,th{{text-align:left}} tr.lossy td{{font-weight:600}}</style></head><body><main>
<header><h1>Run A against run B</h1>{chips}<div class="chips"><span>{stamp}</span></div></header>
<p class="note">{html.escape(NOTE)}</p>{plot}
<table><thead><tr>{heads}</tr></thead><tbody>{body}</tbody></table></main></body></html>
"""


RENDER: dict[str, Callable[[Runs, Runs, list[Figure]], str]] = {"markdown": render_markdown, "html": render_html}


def compare_dirs(run_a: str | Path, run_b: str | Path, fmt: str = "markdown") -> str:
    """The comparison of two run directories (each may be a set of shards merged by the caller)."""
    a, b = load_runs([run_a]), load_runs([run_b])
    return RENDER[fmt](a, b, compare(a, b))
