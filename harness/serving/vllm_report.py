"""The tables of a ``run.engine=vllm`` run, from its run directories only (never a model).

    harness leaderboard OUT            (OUT = the --out of `harness run --engine vllm`)

* load: per method and concurrency, output tokens/s (tokens / makespan), speedup over vLLM
  without speculation at that concurrency (paired per request, bootstrap 95% interval),
  TTFT, TPOT and inter-token latency percentiles, acceptance by draft position from vLLM's
  spec-decode counters, and exactness against the transformers reference and against
  vLLM's own greedy output;
* side by side: each method as the harness implements it (OUT/harness) and as vLLM does
  (the lowest concurrency), same weights and prompts;
* speedup-vs-concurrency.png: the load table's speedups as a plot.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from harness.report import REFERENCE, header, load_runs, metrics, provenance

PLOT = "speedup-vs-concurrency.png"
NOTE = (
    "tok/s: output tokens / makespan (all requests, `concurrency` in flight together); speedup: over vLLM without "
    "speculation at the same concurrency, paired per request (tokens / latency), bootstrap 95% interval; TTFT: "
    "submission to first token; TPOT: (latency - TTFT) / (tokens - 1); ITL: time between a request's successive "
    "engine steps (a step can bring several tokens); accepted by position: vLLM's spec-decode counters "
    "(accepted / drafts at draft position 1, 2, ...); exact: outputs equal to the harness's transformers float32 "
    "greedy reference token for token (ties: first difference at a near-zero logit margin); = vLLM greedy: outputs "
    "equal to vLLM's own non-speculative greedy output at the same concurrency."
)


def concurrency_dirs(out: Path) -> list[Path]:
    dirs = [p for p in out.glob("vllm-c*") if (p / "manifest.json").exists()]
    return sorted(dirs, key=lambda p: int(p.name.removeprefix("vllm-c")))


def is_vllm_run(path: Path) -> bool:
    """True for the --out of a ``run.engine=vllm`` run (no manifest of its own, vllm-c<N>/ inside)."""
    return not (path / "manifest.json").exists() and bool(concurrency_dirs(path))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def makespans(rundir: Path) -> dict[str, float]:
    """The last makespan recorded per method (a resumed run appends)."""
    path = rundir / "load.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
    return {r["method"]: r["makespan_s"] for r in rows}


def load_table(out: Path) -> pd.DataFrame:
    rows = []
    for rundir in concurrency_dirs(out):
        c = int(rundir.name.removeprefix("vllm-c"))
        records = load_runs([rundir], one_shard=True).records
        table = metrics(load_runs([rundir], one_shard=True)).set_index("method")
        spans = makespans(rundir)
        for method, g in records.groupby("method", sort=False):
            m = table.loc[method]
            extra = g.extra.tolist()
            itl = [x for e in extra for x in e.get("itl_s", [])]
            span = spans.get(method, float("nan"))
            rows.append({
                "method": method, "concurrency": c, "requests": len(g),
                "exact": f"{int((g.status == 'exact').sum())}/{len(g)}",
                "ties": int((g.status == "tie").sum()),
                "= vLLM greedy": f"{sum(e.get('vs_vllm_greedy') == 'exact' for e in extra)}/{len(g)}",
                "tok/s": m.new_tokens / span if span == span and span else float("nan"),
                "speedup": m.speedup if method != REFERENCE else 1.0,
                "speedup_low": m.speedup_low, "speedup_high": m.speedup_high,
                "mean_accepted_tokens": m.mean_accepted_tokens,
                "accepted by position": " / ".join(f"{a:.2f}" for a in m.acceptance_by_position),
                "ttft_p50_ms": 1000 * percentile([e["ttft_s"] for e in extra if e.get("ttft_s") is not None], 50),
                "tpot_p50_ms": 1000 * percentile([e["tpot_s"] for e in extra if e.get("tpot_s") is not None], 50),
                "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p90_ms": 1000 * percentile(itl, 90),
                "itl_p99_ms": 1000 * percentile(itl, 99),
            })  # fmt: skip
    return pd.DataFrame(rows)


def side_by_side(out: Path) -> pd.DataFrame:
    """Each method on both engines: mean accepted tokens, speedup, exact share (lowest concurrency for vLLM)."""
    dirs = concurrency_dirs(out)
    ours = metrics(load_runs([out / "harness"], one_shard=True)).set_index("method")
    theirs = metrics(load_runs([dirs[0]], one_shard=True)).set_index("method")
    rows = []
    for method in theirs.index:
        h = ours.loc[method] if method in ours.index else None
        v = theirs.loc[method]
        rows.append({
            "method": method,
            "accepted (harness)": h.mean_accepted_tokens if h is not None else float("nan"),
            f"accepted (vLLM, c={dirs[0].name.removeprefix('vllm-c')})": v.mean_accepted_tokens,
            "speedup (harness)": h.speedup if h is not None else float("nan"),
            "speedup (vLLM)": v.speedup,
            "exact (harness)": h.exact_match if h is not None else float("nan"),
            "exact (vLLM)": v.exact_match,
        })  # fmt: skip
    return pd.DataFrame(rows)


def divergences(out: Path) -> str:
    """Every vLLM output that is not token-exact: where it first differs and the reference's margin there."""
    rows = []
    for rundir in concurrency_dirs(out):
        for r in load_runs([rundir], one_shard=True).records.itertuples():
            if r.status != "exact" or r.extra.get("vs_vllm_greedy") != "exact":
                rows.append({"method": r.method, "concurrency": r.extra.get("concurrency"), "sample": r.sample_id,
                             "vs transformers": r.status, "first index": r.first_diff, "top-1 - top-2 margin": r.margin,
                             "vs vLLM greedy": r.extra.get("vs_vllm_greedy")})  # fmt: skip
    if not rows:
        return "none: every output equals both references token for token"
    return tabulate(pd.DataFrame(rows), headers="keys", tablefmt="github", showindex=False, floatfmt=".4f")


def plot(table: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in table[table.method != REFERENCE].groupby("method", sort=False):
        low = (g.speedup - g.speedup_low).clip(lower=0).fillna(0)
        high = (g.speedup_high - g.speedup).clip(lower=0).fillna(0)
        ax.errorbar(g.concurrency, g.speedup, yerr=[low, high], marker="o", capsize=3, label=method)
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (requests in flight)")
    ax.set_ylabel("speedup over vLLM without speculation")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def render(out: Path, plot_name: str = PLOT) -> tuple[str, pd.DataFrame]:
    """The markdown of a vLLM run's tables (the plot linked as ``plot_name``), and the load table."""
    runs = load_runs(concurrency_dirs(out) + [out / "harness"], allow_mixed=True, one_shard=True)
    table = load_table(out)
    shown = table.assign(speedup=[f"{s:.2f} [{lo:.2f}, {hi:.2f}]" if lo == lo else f"{s:.2f}"
                                  for s, lo, hi in zip(table.speedup, table.speedup_low, table.speedup_high)])
    shown = shown.drop(columns=["speedup_low", "speedup_high"])
    pivot = table.pivot(index="method", columns="concurrency", values="speedup").reset_index()
    pivot.columns = ["method"] + [f"c={c}" for c in pivot.columns[1:]]
    tree = provenance(runs)["tree"]
    title = "vLLM engine" + ("" if tree == "clean" else f" ({tree} tree: these figures cannot be reproduced from the commit alone)")
    text = "\n\n".join([
        f"# {title}", header(runs), NOTE,
        "## Load\n\n" + tabulate(shown, headers="keys", tablefmt="github", showindex=False, floatfmt=".2f"),
        "## Speedup vs concurrency\n\n" + tabulate(pivot, headers="keys", tablefmt="github", showindex=False,
                                                    floatfmt=".2f") + f"\n\n![speedup vs concurrency]({plot_name})",
        "## Divergences (a tie: first difference at a reference margin below run.tie_margin)\n\n" + divergences(out),
        "## Side by side (same weights and prompts: the harness's implementation vs vLLM's)\n\n"
        + tabulate(side_by_side(out), headers="keys", tablefmt="github", showindex=False, floatfmt=".2f"),
    ])  # fmt: skip
    return text + "\n", table


def write_report(out: Path, target: Path | None = None) -> pd.DataFrame:
    """Write the tables to ``target`` (default OUT/leaderboard.md) and the plot beside it."""
    target = target or out / "leaderboard.md"
    plot_name = PLOT if target.name == "leaderboard.md" else f"{target.stem}-speedup.png"
    text, table = render(out, plot_name)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text)
    plot(table, target.parent / plot_name)
    return table
