"""Leaderboards (markdown, csv, html, json) and plots from run directories.

    harness leaderboard RUN_DIR... [--format markdown|csv|html|json] [--by language|category]
                                   [--out FILE] [--plots DIR] [--allow-mixed]

The HTML report (harness/page.py) is one self-contained page with interactive plots;
``--plots DIR`` also writes static PNG plots.
"""

from __future__ import annotations

import io
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import pandas as pd
from tabulate import tabulate

from harness.report import (REFERENCE, REPETITION_NOTE, STOP_NOTE, Runs, dropped_note, forward_mode, header, metrics,
                            pass_at_1_label, provenance)
from harness.results import commit_of


SHOWN = [
    "method", "task", "samples", "exact_match", "ties", "mismatches", "mean_accepted_tokens", "tokens_per_s",
    "speedup", "speedup_ci", "efficiency", "step_cost", "limit_speedup", "best_setting", "repetition", "stop_reasons", "latency_p50_s", "latency_p90_s", "prefill_ms",
    "peak_memory_mb",
]  # fmt: skip
NOTE = (
    "speedup: tokens/s over `autoregressive`, paired per sample within each run, with a bootstrap 95% interval; "
    "mean_accepted_tokens: new tokens per target forward; exact_match: share of outputs equal to greedy "
    "`autoregressive` of the same model token for token (ties = first difference at a near-zero logit margin); "
    "efficiency: speedup / (accepted tokens per step / step_cost), that bound taken over whole generations as "
    "limit_speedup is, i.e. how much of what the acceptance allows at the measured forward costs the "
    "implementation delivers; step_cost: t(step forwards) / "
    "t(1-token forward), what one decoding step's forwards (tree, chunk, draft + verify; a draft head's forwards count as draft) cost "
    "against one plain step; "
    "limit_speedup: the speedup the measured acceptance allows at the measured forward costs (per decode step: "
    "Leviathan et al. for a chain with a gamma, tokens per step / step_cost otherwise; over a whole generation "
    "with the prompt's forward, which no method shortens: 1 / (s + (1 - s) / that), s = the prompt forwards' "
    "share of the reference's forward time; harness/detail.py); best_setting: the gamma those "
    "figures imply (the one that ran: the run_dir or the config); "
    + REPETITION_NOTE
    + " " + STOP_NOTE
)


LOSSY_SHOWN = ["agreement", "equal_share", "first_divergence"]
LOSSY_NOTE = (
    "Lossy methods: their output is not greedy `autoregressive`'s by design, so they are never ranked with the "
    "lossless ones; quality beside speed: agreement = tokens equal at the same position over the longer output "
    "(pooled), equal_share = outputs equal token for token, first_divergence = median index of the first differing "
    "token among the outputs that differ."
)


def display_table(table: pd.DataFrame, by: Optional[str], lossy: bool = False) -> pd.DataFrame:
    """The shown columns; ``lossy``: the lossy-mode rows with their quality columns (labelled
    ``(lossy)``), else the others."""
    t = table.copy()
    is_lossy = t.lossless == "lossy mode" if "lossless" in t.columns else pd.Series(False, index=t.index)
    t = t[is_lossy] if lossy else t[~is_lossy]
    t["method"] = [f"{m} (lossy)" for m in t.method] if lossy else t.method
    t["speedup_ci"] = [f"[{lo:.2f}, {hi:.2f}]" if lo == lo else "" for lo, hi in zip(t.speedup_low, t.speedup_high)]
    cols = SHOWN[:2] + ([by] if by else []) + SHOWN[2:]
    if lossy:  # no token-for-token check to show; their closeness to it instead
        cols = [c for c in cols if c not in ("exact_match", "ties", "mismatches")] + LOSSY_SHOWN
    if "pass@1" in t.columns:  # the figure with its denominators and any isolation below full
        t["pass@1"] = [pass_at_1_label(r) for r in t.to_dict("records")]
        cols.append("pass@1")
    return t[cols]


def title(runs: Runs) -> str:
    """The heading of every format: marks figures made from a dirty (or unknown) tree."""
    tree = provenance(runs)["tree"]
    if tree == "clean":
        return "Leaderboard"
    return f"Leaderboard ({tree} tree: these figures cannot be reproduced from the commit alone)"


def render(runs: Runs, table: pd.DataFrame, fmt: str, by: Optional[str] = None) -> str:
    """The table in one format; every format carries the commit and the tree's state (provenance):
    markdown and html in the header, json as ``provenance``, csv as ``commit`` and ``tree`` columns."""
    if fmt == "json":
        doc = {"title": title(runs), "header": header(runs), "provenance": provenance(runs),
               "dropped": runs.dropped, "rows": table.to_dict(orient="records")}  # fmt: skip
        return json.dumps(doc, indent=2, default=str)
    if fmt == "csv":
        return table.assign(**provenance(runs)).to_csv(index=False)
    shown, lossy = display_table(table, by), display_table(table, by, lossy=True)
    if fmt == "markdown":
        body = tabulate(shown, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f")
        if not lossy.empty:
            rows = tabulate(lossy, headers="keys", tablefmt="github", showindex=False, floatfmt=".3f")
            body += f"\n\n## Lossy methods\n\n{LOSSY_NOTE}\n\n{rows}"
        return f"# {title(runs)}\n\n{header(runs)}\n\n{NOTE}\n\n{body}\n"
    if fmt == "html":
        from harness.page import render_page  # noqa: PLC0415 (plotly: the `plots` extra, only for html)

        return render_page(runs, table, by, title(runs), NOTE)
    raise ValueError(f"unknown format '{fmt}'; use markdown, csv, html or json")


def brief(table: pd.DataFrame) -> str:
    """One line per method of a run's summary: what to read first, on one screen."""
    lines = []
    for r in table.to_dict("records"):
        pooled = r.get("accepted_pooled", float("nan"))
        per_step = pooled if pooled == pooled else r.get("mean_accepted_tokens", float("nan"))  # wrappers: no steps
        setting = r.get("best_setting")
        best = f", best {setting} (ran {r['setting_run']})" if isinstance(setting, str) and setting else ""
        limit = r.get("limit_speedup", float("nan"))
        limit_text = f"  limit {limit:.2f}x" if limit == limit else ""  # none where forwards are not timed (vLLM)
        lines.append(f"{r['method']:>18}  {r['speedup']:.2f}x  {per_step:.2f} tokens/step  "
                     f"exact {r['exact_match']:.0%}{limit_text}{best}")  # fmt: skip
    return "\n".join(lines)


def make_plots(runs: Runs, table: pd.DataFrame, by: Optional[str] = None) -> dict[str, bytes]:
    """PNG bytes by name: speedup with intervals, accepted tokens vs speedup, acceptance by position,
    and speedup per language or category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def png(fig) -> bytes:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=110)
        plt.close(fig)
        return buf.getvalue()

    out: dict[str, bytes] = {}
    base = table if not by else metrics(runs)
    base = base[base.method != REFERENCE].reset_index(drop=True)
    if base.empty:
        return out
    labels = [f"{m}\n{t}" for m, t in zip(base.method, base.task)]

    fig, ax = plt.subplots(figsize=(max(5, 1.1 * len(base)), 3.8))
    err = [(base.speedup - base.speedup_low).clip(lower=0), (base.speedup_high - base.speedup).clip(lower=0)]
    ax.bar(labels, base.speedup, yerr=err, capsize=4, color="#4C72B0")
    ax.axhline(1.0, color="gray", lw=1, ls="--")
    ax.set_ylabel("speedup over autoregressive")
    ax.set_title("Speedup (bootstrap 95% interval)")
    ax.tick_params(axis="x", labelsize=8)
    out["speedup.png"] = png(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    ax.scatter(base.mean_accepted_tokens, base.speedup, color="#DD8452")
    for x, y, name in zip(base.mean_accepted_tokens, base.speedup, base.method):
        ax.annotate(name, (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    top = max(base.mean_accepted_tokens.max(), base.speedup.max(), 1.0) * 1.1
    ax.plot([1, top], [1, top], color="gray", lw=1, ls="--", label="speedup = accepted tokens")
    ax.set_xlabel("mean accepted tokens per target forward")
    ax.set_ylabel("speedup")
    ax.legend(fontsize=8)
    ax.set_title("Accepted tokens vs speedup")
    out["accepted_vs_speedup.png"] = png(fig)

    rates = [(m, t, r) for m, t, r in zip(base.method, base.task, base.acceptance_by_position) if len(r)]
    if rates:
        fig, ax = plt.subplots(figsize=(5, 4))
        for m, t, r in rates:
            ax.plot(range(1, len(r) + 1), r, marker="o", label=f"{m} ({t})")
        ax.set_xlabel("draft position / tree depth")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.05)
        ax.legend(fontsize=8)
        ax.set_title("Acceptance by position")
        out["acceptance_by_position.png"] = png(fig)

    if by:
        sub = table[table.method != REFERENCE]
        pivot = sub.pivot_table(index=by, columns="method", values="speedup")
        if not pivot.empty:
            fig, ax = plt.subplots(figsize=(max(5, 0.9 * len(pivot)), 4))
            pivot.plot.bar(ax=ax)
            ax.axhline(1.0, color="gray", lw=1, ls="--")
            ax.set_ylabel("speedup over autoregressive")
            ax.set_title(f"Speedup per {by}")
            out[f"speedup_by_{by}.png"] = png(fig)
    return out


def write_plots(plots: dict[str, bytes], directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in plots.items():
        (directory / name).write_bytes(data)
        paths.append(directory / name)
    return paths


def run_leaderboard(table: pd.DataFrame, manifest: dict, dropped: Optional[list[dict]] = None) -> str:
    """A run directory's leaderboard.md: its summary table (``RunDir.write_summary``) with the run's header."""
    shown = ["method", "task", "samples", "exact_match", "mean_accepted_tokens", "tokens_per_s", "speedup", "ties",
             "mismatches", "lossless", "repetition", "stop_reasons"] + [c for c in ("pass@1",) if c in table.columns]  # fmt: skip
    env = manifest.get("environment", {})
    model = manifest.get("model", {})
    head = (
        f"# Leaderboard\n\nmodel: {model.get('label', '?')} | device: {env.get('device', '?')} "
        f"({env.get('device_name', '?')}) | dtype: {model.get('dtype', '?')} | "
        f"forwards: {forward_mode(manifest)} | "
        f"threads: {env.get('threads', '?')} | commit: {commit_of(manifest)} | "
        f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
        "speedup = tokens/s over `autoregressive` in this run; exact_match = share of outputs equal to greedy "
        "`autoregressive` token for token; mean_accepted_tokens = new tokens per target forward; "
        f"{REPETITION_NOTE} {STOP_NOTE}\n\n"
    )
    if dropped:
        head += dropped_note(dropped) + " (task.too_long=drop).\n\n"
    if "pass@1" in table.columns:
        table = table.assign(**{"pass@1": [pass_at_1_label(r) for r in table.to_dict("records")]})
    body = tabulate(table[shown], headers="keys", tablefmt="github", showindex=False, floatfmt=".3f")
    return head + body + "\n"
