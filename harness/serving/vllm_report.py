"""The tables of a ``run.engine=vllm`` run, from its run directories only (never a model).

    harness leaderboard OUT            (OUT = the --out of `harness run --engine vllm`)

* load: per method and concurrency, output tokens/s (tokens / makespan), speedup over vLLM
  without speculation at that concurrency (paired rounds timed alternately, bootstrap 95%
  interval over rounds: harness/serving/vllm_rounds.py),
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
from harness.serving.vllm_rounds import RoundSpeedup, latest_rounds, round_speedup

PLOT = "speedup-vs-concurrency.png"
NOTE = (
    "Timing: plain vLLM and each method's engine were alive together and timed in {rounds} paired rounds per "
    "concurrency, each round one batch of every prompt on each engine, the order alternating (plain first in rounds "
    "1, 3, ..., the method first in rounds 2, 4, ...). tok/s: output tokens / makespan over the rounds "
    "(`concurrency` requests in flight together); speedup: the method's tok/s over plain vLLM's in the same rounds "
    "(ratio of sums), bootstrap 95% interval over rounds (none from a single round); plain vLLM's row: its rounds "
    "beside every method. TTFT: submission to first token; TPOT: (latency - TTFT) / (tokens - 1); ITL: time "
    "between a request's successive engine steps (a step can bring several tokens); these three from the first "
    "round. Accepted by position: vLLM's spec-decode counters (accepted / drafts at draft position 1, 2, ...). "
    "exact (every round): outputs of every round equal to the harness's transformers float32 greedy reference "
    "token for token (ties: first difference at a near-zero logit margin); = vLLM greedy: prompts whose output "
    "equalled vLLM's own non-speculative greedy output of the same round in every round."
)


def concurrency_dirs(out: Path) -> list[Path]:
    dirs = [p for p in out.glob("vllm-c*") if (p / "manifest.json").exists()]
    return sorted(dirs, key=lambda p: int(p.name.removeprefix("vllm-c")))


def is_vllm_run(path: Path) -> bool:
    """True for the --out of a ``run.engine=vllm`` run (no manifest of its own, vllm-c<N>/ inside)."""
    return not (path / "manifest.json").exists() and bool(concurrency_dirs(path))


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def load_rows(rundir: Path) -> list[dict]:
    path = rundir / "load.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []


def share(count: int, total: int) -> str:
    return f"{count}/{total}"


def load_table(out: Path) -> pd.DataFrame:
    rows = []
    for rundir in concurrency_dirs(out):
        c = int(rundir.name.removeprefix("vllm-c"))
        runs = load_runs([rundir], one_shard=True)
        table = metrics(runs).set_index("method")
        logged = load_rows(rundir)
        methods = [m for m in runs.records.method.unique() if m != REFERENCE]
        rounds = {m: latest_rounds(logged, m, c) for m in methods}
        every = [r for m in methods for r in rounds[m]]  # plain vLLM ran in every method's rounds
        for method, g in runs.records.groupby("method", sort=False):
            m = table.loc[method]
            extra = g.extra.tolist()
            itl = [x for e in extra for x in e.get("itl_s", [])]
            if method == REFERENCE:
                requests = sum(r["requests"] for r in every)
                exact = share(sum(r["baseline_exact"] for r in every), requests)
                spans = sum(r["baseline_makespan_s"] for r in every)
                rate = sum(r["baseline_tokens"] for r in every) / spans if spans else float("nan")
                speedup = RoundSpeedup(1.0, float("nan"), float("nan"), len(every), rate, rate)
            else:
                speedup = round_speedup(rounds[method])
                exact = share(sum(r["exact"] for r in rounds[method]), sum(r["requests"] for r in rounds[method]))
            rows.append({
                "method": method, "concurrency": c, "requests": len(g), "rounds": speedup.rounds,
                "exact (every round)": exact, "ties": int((g.status == "tie").sum()),
                "= vLLM greedy": share(sum(e.get("vs_vllm_greedy") == "exact" for e in extra), len(g)),
                "tok/s": speedup.tokens_per_s,
                "speedup": speedup.speedup, "speedup_low": speedup.low, "speedup_high": speedup.high,
                "mean_accepted_tokens": m.mean_accepted_tokens,
                "accepted by position": " / ".join(f"{a:.2f}" for a in m.acceptance_by_position),
                "ttft_p50_ms": 1000 * percentile([e["ttft_s"] for e in extra if e.get("ttft_s") is not None], 50),
                "tpot_p50_ms": 1000 * percentile([e["tpot_s"] for e in extra if e.get("tpot_s") is not None], 50),
                "itl_p50_ms": 1000 * percentile(itl, 50), "itl_p90_ms": 1000 * percentile(itl, 90),
                "itl_p99_ms": 1000 * percentile(itl, 99),
            })  # fmt: skip
    return pd.DataFrame(rows)


def closing_table(load: pd.DataFrame) -> pd.DataFrame:
    """The load table as ``harness run`` closes with it (``harness.leaderboard.brief``): a row per method and
    concurrency, its exact share over every round."""
    exact = [int(n) / int(d) if int(d) else float("nan") for n, d in (x.split("/") for x in load["exact (every round)"])]
    return load.assign(method=[f"{m} c={c}" for m, c in zip(load.method, load.concurrency)], exact_match=exact)


def side_by_side(out: Path, load: pd.DataFrame) -> pd.DataFrame:
    """Each method on both engines: mean accepted tokens, speedup, exact share (lowest concurrency for vLLM,
    its speedup from the paired rounds of the load table)."""
    dirs = concurrency_dirs(out)
    lowest = int(dirs[0].name.removeprefix("vllm-c"))
    ours = metrics(load_runs([out / "harness"], one_shard=True)).set_index("method")
    theirs = metrics(load_runs([dirs[0]], one_shard=True)).set_index("method")
    paired = load[load.concurrency == lowest].set_index("method").speedup
    rows = []
    for method in theirs.index:
        h = ours.loc[method] if method in ours.index else None
        v = theirs.loc[method]
        rows.append({
            "method": method,
            "accepted (harness)": h.mean_accepted_tokens if h is not None else float("nan"),
            f"accepted (vLLM, c={lowest})": v.mean_accepted_tokens,
            "speedup (harness)": h.speedup if h is not None else float("nan"),
            f"speedup (vLLM, c={lowest}, paired rounds)": paired.get(method, float("nan")),
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


def rounds_of(out: Path) -> str:
    """The rounds the run's manifests name (one number, or each concurrency's)."""
    found = sorted({json.loads((d / "manifest.json").read_text())["engine"].get("rounds") for d in concurrency_dirs(out)},
                   key=str)  # fmt: skip
    return " / ".join(str(r) for r in found)


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
        f"# {title}", header(runs), NOTE.format(rounds=rounds_of(out)),
        "## Load\n\n" + tabulate(shown, headers="keys", tablefmt="github", showindex=False, floatfmt=".2f"),
        "## Speedup vs concurrency\n\n" + tabulate(pivot, headers="keys", tablefmt="github", showindex=False,
                                                    floatfmt=".2f") + f"\n\n![speedup vs concurrency]({plot_name})",
        "## Divergences (a tie: first difference at a reference margin below run.tie_margin)\n\n" + divergences(out),
        "## Side by side (same weights and prompts: the harness's implementation vs vLLM's)\n\n"
        + tabulate(side_by_side(out, table), headers="keys", tablefmt="github", showindex=False, floatfmt=".2f"),
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
