"""Paired rounds: vLLM without speculation and a method's engine timed alternately, in the same stretch of time.

Both engines stay alive together (two worker processes). For each concurrency the run
times ``rounds`` rounds, each one batch of the baseline (every prompt, plain vLLM greedy)
and one batch of the method (the same prompts), the order alternating: round 0 runs the
baseline first, round 1 the method first, and so on, so a drift of the machine's load
weighs on both sides alike. A round's two makespans form one pair; the speedup at that
concurrency is the ratio of the paired rounds' throughputs (``harness.report``'s
ratio-of-sums speedup and bootstrap percentile interval, resampling rounds).

    one load.jsonl row per (method, concurrency, round): ``load_row``
    speedup per (method, concurrency) from those rows:     ``round_speedup``

Nothing here needs vLLM: a batch is any callable that returns a worker's ``generate`` reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pandas as pd

from harness.report import bootstrap_interval, ratio_speedup

BASELINE, METHOD = "baseline", "method"  # the two sides of a round

Batch = Callable[[int], dict]  # round index -> the worker's generate reply (its "wall_s" is the batch's makespan)


@dataclass
class Round:
    index: int  # 0, 1, ... within one (method, concurrency)
    order: tuple[str, str]  # which side ran first: (BASELINE, METHOD) on even rounds, (METHOD, BASELINE) on odd
    baseline: dict  # the baseline worker's generate reply in this round
    method: dict  # the method worker's generate reply in this round


@dataclass
class RoundSpeedup:
    speedup: float  # paired rounds' throughput ratio, ratio of sums: (method tokens / time) / (baseline tokens / time)
    low: float  # bootstrap 95% percentile interval over rounds (NaN with a single round)
    high: float
    rounds: int  # paired rounds it rests on
    tokens_per_s: float  # the method's throughput over its rounds: tokens / makespan, summed
    baseline_tokens_per_s: float  # the baseline's, over the same rounds


def round_order(index: int) -> tuple[str, str]:
    """Even rounds time the baseline first, odd rounds the method first."""
    return (BASELINE, METHOD) if index % 2 == 0 else (METHOD, BASELINE)


def paired_rounds(baseline: Batch, method: Batch, rounds: int) -> list[Round]:
    """``rounds`` rounds of one baseline batch and one method batch, the order alternating per round."""
    done = []
    for index in range(rounds):
        replies = {}
        for side in round_order(index):
            replies[side] = baseline(index) if side == BASELINE else method(index)
        done.append(Round(index, round_order(index), replies[BASELINE], replies[METHOD]))
    return done


def load_row(method: str, concurrency: int, round_: Round, tokens: int, baseline_tokens: int,
             exact: int, baseline_exact: int, equal: int, requests: int) -> dict:  # fmt: skip
    """The load.jsonl row of one round: both makespans, both token counts (cut by the harness's stop rules),
    how many requests were exact against the transformers reference (each side) and equal to the paired
    baseline output, and vLLM's spec-decode counter changes of the method's batch."""
    return {"method": method, "concurrency": concurrency, "round": round_.index, "first": round_.order[0],
            "requests": requests, "makespan_s": round_.method["wall_s"], "tokens": tokens,
            "baseline_makespan_s": round_.baseline["wall_s"], "baseline_tokens": baseline_tokens,
            "exact": exact, "baseline_exact": baseline_exact, "equal_to_baseline": equal,
            "spec": round_.method["spec"]}  # fmt: skip


def latest_rounds(rows: list[dict], method: str, concurrency: int) -> list[dict]:
    """The method's rounds at that concurrency, the last row of each round index (a resumed run appends)."""
    last = {r["round"]: r for r in rows if r["method"] == method and r["concurrency"] == concurrency and "round" in r}
    return [last[i] for i in sorted(last)]


def round_speedup(rows: list[dict]) -> RoundSpeedup:
    """The speedup over paired rounds (rows from ``latest_rounds``), with its bootstrap interval over rounds."""
    pairs = pd.DataFrame({"tokens": [r["tokens"] for r in rows], "wall": [r["makespan_s"] for r in rows],
                          "tokens_ref": [r["baseline_tokens"] for r in rows],
                          "wall_ref": [r["baseline_makespan_s"] for r in rows]})  # fmt: skip
    low, high = bootstrap_interval(pairs)
    rate = float(pairs.tokens.sum() / pairs.wall.sum()) if len(pairs) and pairs.wall.sum() else float("nan")
    base = float(pairs.tokens_ref.sum() / pairs.wall_ref.sum()) if len(pairs) and pairs.wall_ref.sum() else float("nan")
    return RoundSpeedup(ratio_speedup(pairs), low, high, len(rows), rate, base)
