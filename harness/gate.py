"""The regression gate CI runs.

    harness baseline RUN_DIR --out results/baselines/NAME.json
    harness check RUN_DIR --baseline results/baselines/NAME.json

A baseline stores, per method x task, the deterministic figures (exact-match rate,
mean accepted tokens, target forwards, a hash of every output's token ids) and the
speedup, with tolerances. ``check`` fails (exit 1, with a table of what changed) when a
lossless method has a mismatch, loses exact-match, changes its ``lossless`` label or checks
fewer records, when a deterministic figure moves beyond its tolerance, or when a speedup
falls below the baseline's by more than its tolerance; a NaN never passes (see ``check``).
Speedups are compared only between runs on the same kind of machine (same device name
and thread count): a speedup measured elsewhere is reported as not compared.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from harness.report import header, load_runs, metrics
from harness.paths import load_json_file
from harness.errors import HarnessError


class BaselineError(HarnessError):
    """A baseline file that cannot be read; the message names the file, the problem and the fix."""


@dataclass
class Tolerances:
    mean_accepted_tokens: float = 0.02  # relative change allowed
    target_forwards: float = 0.02  # relative change allowed
    tokens_hash: bool = True  # require identical output ids
    speedup: float = 0.25  # allowed relative drop below the baseline speedup (same machine kind only)


@dataclass
class Baseline:
    created: str
    machine: dict  # device name and threads: speedups compare only on the same kind
    header: str
    tolerances: Tolerances
    rows: list[dict] = field(default_factory=list)  # per method x task figures


def machine_of(manifests: list[dict]) -> dict:
    envs = {(m["environment"].get("device_name"), m["environment"].get("threads")) for m in manifests}
    name, threads = sorted(envs, key=str)[0]
    return {"device_name": name, "threads": threads}


FIGURES = ["method", "task", "samples", "checked", "exact_match", "mismatches", "lossless", "mean_accepted_tokens",
           "target_forwards", "tokens_hash", "speedup"]  # fmt: skip


def make_baseline(run_dirs: list[str], tolerances: Tolerances | None = None) -> Baseline:
    runs = load_runs(run_dirs)
    table = metrics(runs)
    rows = table[FIGURES].to_dict(orient="records")
    return Baseline(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        machine=machine_of(runs.manifests),
        header=header(runs),
        tolerances=tolerances or Tolerances(),
        rows=rows,
    )


def save_baseline(baseline: Baseline, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(asdict(baseline), indent=2, default=str) + "\n")


def load_baseline(path: str | Path) -> Baseline:
    """A baseline file. Files written before ``checked`` and ``mismatches`` were stored get
    them from what the runner guarantees: every record of a ``checked`` method was compared
    (the reference runs for every sample), and a baseline is taken from a passing run."""
    fix = "re-create it with `harness baseline RUN_DIR --out FILE` (or restore it from git)"
    data = load_json_file(path, "baseline", fix, error=BaselineError)

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise BaselineError(f"baseline {path} {what}; {fix}")

    expected = {f.name for f in fields(Baseline)}
    need(set(data) == expected, f"has keys {sorted(data)}, expected {sorted(expected)}")
    need(isinstance(data["tolerances"], dict) and set(data["tolerances"]) <= {f.name for f in fields(Tolerances)},
         f"has bad tolerances {data['tolerances']!r}")  # fmt: skip
    need(isinstance(data["machine"], dict), "has no `machine` object")
    rows = data["rows"]
    need(isinstance(rows, list) and all(isinstance(r, dict) for r in rows), "has no list of `rows` objects")
    for number, row in enumerate(data["rows"]):
        missing = [k for k in FIGURES if k not in ("checked", "mismatches") and k not in row]
        need(not missing, f"row {number} lacks {', '.join(missing)}")
        row.setdefault("checked", row["samples"] if row.get("lossless") == "checked" else 0)
        row.setdefault("mismatches", 0)
    data["tolerances"] = Tolerances(**data["tolerances"])
    return Baseline(**data)


@dataclass
class Verdict:
    ok: bool
    problems: pd.DataFrame  # method, task, figure, baseline, now, verdict
    notes: list[str]


def is_nan(value) -> bool:
    """NaN or missing: a value no comparison may pass on."""
    try:
        return value is None or math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def check(run_dirs: list[str], baseline: Baseline) -> Verdict:
    """Compare the runs' figures with the baseline's, per method x task. Fails on:

    - a baseline method or task missing from the runs;
    - a changed ``lossless`` label (e.g. ``checked`` -> ``not checked`` or ``lossy mode``);
    - for a method that was ``checked`` in the baseline: any ``mismatch``, an exact-match rate
      below the baseline's or NaN, or fewer checked records than the baseline's;
    - mean accepted tokens or target forwards beyond their relative tolerance, a changed
      hash of the output ids, a speedup below the baseline's by more than its tolerance
      (same kind of machine only).

    A comparison with a NaN (or missing) value on either side fails: NaN never passes.
    """
    runs = load_runs(run_dirs)
    now = metrics(runs).set_index(["method", "task"])
    tol = baseline.tolerances
    same_machine = machine_of(runs.manifests) == baseline.machine
    notes = list(runs.notices)
    if not same_machine:
        notes.append(
            f"speedups not compared: baseline machine {baseline.machine}, this run {machine_of(runs.manifests)} "
            "(speedups only compare on the same kind of machine)"
        )
    gated = {(b["method"], b["task"]) for b in baseline.rows}
    for method, task in now.index:
        if (method, task) not in gated:
            notes.append(f"{method} on {task} is not in the baseline: not gated (rebaseline to gate it)")
    rows = []

    def add(method, task, figure, old, new, verdict="FAIL"):
        if is_nan(old) or is_nan(new):
            verdict = "FAIL (NaN)"
        rows.append({"method": method, "task": task, "figure": figure, "baseline": old, "now": new, "verdict": verdict})

    for b in baseline.rows:
        key = (b["method"], b["task"])
        if key not in now.index:
            add(*key, "present", "yes", "missing")
            continue
        n = now.loc[key]
        if n.lossless != b["lossless"]:
            add(*key, "lossless", b["lossless"], n.lossless)
        if b["lossless"] == "checked":
            if n.mismatches > 0:
                add(*key, "mismatches", b["mismatches"], int(n.mismatches))
            if is_nan(n.exact_match) or is_nan(b["exact_match"]) or n.exact_match < b["exact_match"]:
                add(*key, "exact_match", b["exact_match"], n.exact_match)
            if n.checked < b["checked"]:
                add(*key, "checked", b["checked"], int(n.checked))
        for figure in ("mean_accepted_tokens", "target_forwards"):
            old, new = b[figure], n[figure]
            if is_nan(old) or is_nan(new):
                add(*key, figure, old, new)
                continue
            old, new = float(old), float(new)
            change = abs(new - old) / old if old else (0.0 if new == old else float("inf"))  # relative
            if change > getattr(tol, figure):
                add(*key, figure, old, new)
        if tol.tokens_hash and b["tokens_hash"] != n.tokens_hash:
            add(*key, "tokens_hash", b["tokens_hash"], n.tokens_hash)
        if b["method"] != "autoregressive" and same_machine:
            if is_nan(b["speedup"]) or is_nan(n.speedup):
                add(*key, "speedup", b["speedup"], n.speedup)
            elif n.speedup < (floor := b["speedup"] * (1 - tol.speedup)):
                add(*key, "speedup", round(b["speedup"], 3), round(float(n.speedup), 3), f"FAIL (< {floor:.3f})")
    problems = pd.DataFrame(rows, columns=["method", "task", "figure", "baseline", "now", "verdict"])
    return Verdict(ok=problems.empty, problems=problems, notes=notes)


def render_verdict(verdict: Verdict) -> str:
    lines = list(verdict.notes)
    if verdict.ok:
        lines.append("check passed: no regression against the baseline")
    else:
        lines.append("check FAILED:")
        lines.append(tabulate(verdict.problems, headers="keys", tablefmt="github", showindex=False))
    return "\n".join(lines)
