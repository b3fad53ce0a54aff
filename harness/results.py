"""Run directories: the manifest, the per-sample records and what is derived from them.

A run directory holds ``manifest.json`` (the resolved config and the environment),
``samples.jsonl`` (one record per method x sample x turn, appended and fsynced as soon
as it exists) and the derived ``summary.csv`` and ``leaderboard.md``. Everything but
the first two is rebuilt from them and never hand-edited.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from tabulate import tabulate

from harness.paths import REPO_ROOT

MANIFEST, SAMPLES, SUMMARY, LEADERBOARD = "manifest.json", "samples.jsonl", "summary.csv", "leaderboard.md"
EXECUTION = "execution.jsonl"  # sandboxed test results per record (opt-in: run.execute=true)
SUMMARY_COLUMNS = [
    "method", "task", "samples", "exact_match", "mean_accepted_tokens", "tokens_per_s", "speedup",
    "target_forwards", "draft_forwards", "new_tokens", "wall_time_s", "forward_share", "ties", "mismatches",
    "lossless", "model",
]  # fmt: skip


class RunDirError(Exception):
    """A run directory that cannot be used as asked; the message says what to do."""


@dataclass
class Record:
    """One method's output for one turn of one sample: the unit of ``samples.jsonl``."""

    method: str
    task: str
    sample_id: str
    turn: int
    model: str
    prompt_tokens: int
    tokens: list[int]
    text: str
    wall_time_s: float
    forward_time_s: float  # time inside model forwards (target and draft, execution layer), within wall_time_s
    prefill_time_s: Optional[float]  # the first target forward (the prompt); None if not on the execution layer
    draft_forward_time_s: float  # time inside draft-model forwards
    verify_tokens: int  # tokens fed to the target after prefill (sum of chunk sizes)
    peak_memory_bytes: Optional[int]  # peak CUDA allocation, or peak process RSS on CPU, during the generation
    target_forwards: int
    draft_forwards: int
    accepted_per_step: list[int]
    proposed_per_position: list[int]
    accepted_per_position: list[int]
    lossy: bool
    status: str  # exact | tie | mismatch | not-checked
    first_diff: Optional[int] = None
    margin: Optional[float] = None
    reference_token: Optional[int] = None
    method_token: Optional[int] = None
    language: Optional[str] = None
    category: Optional[str] = None
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.method, self.task, self.sample_id, self.turn)


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def resume_key(config: dict) -> str:
    """What must match to append to an existing run: all but limit and run-local flags."""
    stable = {k: v for k, v in config.items() if k != "run"}
    stable["task"] = {k: v for k, v in config.get("task", {}).items() if k != "limit"}
    run = config.get("run", {})
    stable["run"] = {k: run.get(k) for k in ("max_new_tokens", "seed")}
    return config_hash(stable)


def git_commit() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain"))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def package_versions() -> dict[str, Optional[str]]:
    names = ["spec-harness", "torch", "transformers", "tokenizers", "datasets", "hydra-core", "pandas", "numpy"]
    versions: dict[str, Optional[str]] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    # ---- manifest ---------------------------------------------------------------
    def check(self, resume_key: str, force: bool) -> bool:
        """True when the directory holds a run that may be resumed with this config."""
        existing = self.path / MANIFEST
        if not existing.exists():
            return False
        old = json.loads(existing.read_text())
        if old.get("resume_key") != resume_key and not force:
            raise RunDirError(
                f"{self.path} holds a run made with a different config; use another --out, or --force to append anyway"
            )
        return True

    def create(self, manifest: dict, resume_key: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_atomic(MANIFEST, json.dumps({**manifest, "resume_key": resume_key}, indent=2, default=str))

    def manifest(self) -> dict:
        return json.loads((self.path / MANIFEST).read_text())

    def _write_atomic(self, name: str, text: str) -> None:
        tmp = self.path / (name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path / name)

    # ---- records ------------------------------------------------------------------
    def append(self, record: Record) -> None:
        line = json.dumps(record.__dict__, default=str) + "\n"
        with open(self.path / SAMPLES, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def records(self, drop_corrupt: bool = False) -> tuple[list[Record], list[str]]:
        """All records; a corrupt line is an error unless ``drop_corrupt`` (then moved aside).

        A last line without its newline is the pair that was in flight when a run was
        killed: it is always moved aside. Returns (records, notices).
        """
        path = self.path / SAMPLES
        if not path.exists():
            return [], []
        raw = path.read_text(encoding="utf-8")
        lines = raw.split("\n")
        good: list[Record] = []
        bad: list[tuple[int, str]] = []
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                good.append(Record(**json.loads(line)))
            except (json.JSONDecodeError, TypeError) as exc:
                torn_tail = number == len(lines) and not raw.endswith("\n")
                if not torn_tail and not drop_corrupt:
                    raise RunDirError(
                        f"{path} line {number} is corrupt ({type(exc).__name__}); fix or delete that line, "
                        "or rerun with --drop-corrupt to move it aside and keep the other records"
                    ) from exc
                bad.append((number, line))
        notices = []
        if bad:
            with open(self.path / "samples.corrupt.jsonl", "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for _, line in bad)
            self._write_atomic(SAMPLES, "".join(json.dumps(r.__dict__, default=str) + "\n" for r in good))
            where = ", ".join(str(n) for n, _ in bad)
            notices.append(f"moved corrupt line(s) {where} of samples.jsonl to samples.corrupt.jsonl")
        return good, notices

    # ---- derived files ------------------------------------------------------------
    def write_execution(self, results: list[dict]) -> None:
        self._write_atomic(EXECUTION, "".join(json.dumps(r, default=str) + "\n" for r in results))

    def execution(self) -> list[dict]:
        path = self.path / EXECUTION
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, table: pd.DataFrame) -> pd.DataFrame:
        """Write summary.csv (the ``SUMMARY_COLUMNS`` of ``report.metrics``) and leaderboard.md."""
        table = table.reindex(columns=SUMMARY_COLUMNS + [c for c in ("pass@1",) if c in table.columns])
        table.to_csv(self.path / SUMMARY, index=False)
        self._write_atomic(LEADERBOARD, render_leaderboard(table, self.manifest()))
        return table


def pass_at_1(execution: list[dict], keys: list[str]) -> pd.DataFrame:
    """pass@1 (share of judged completions that passed; skipped ones left out) per ``keys``."""
    ex = pd.DataFrame(execution)
    ex = ex[ex.status != "skipped"]
    if ex.empty:
        return pd.DataFrame(columns=keys + ["pass@1"])
    return ex.groupby(keys).status.apply(lambda s: float((s == "passed").mean())).rename("pass@1").reset_index()


def render_leaderboard(table: pd.DataFrame, manifest: dict) -> str:
    shown = ["method", "task", "samples", "exact_match", "mean_accepted_tokens", "tokens_per_s", "speedup", "ties",
             "mismatches", "lossless"] + [c for c in ("pass@1",) if c in table.columns]  # fmt: skip
    env = manifest.get("environment", {})
    model = manifest.get("model", {})
    head = (
        f"# Leaderboard\n\nmodel: {model.get('label', '?')} | device: {env.get('device', '?')} "
        f"({env.get('device_name', '?')}) | dtype: {model.get('dtype', '?')} | "
        f"threads: {env.get('threads', '?')} | generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
        "speedup = tokens/s over `autoregressive` in this run; exact_match = share of outputs equal to greedy "
        "`autoregressive` token for token; mean_accepted_tokens = new tokens per target forward.\n\n"
    )
    body = tabulate(table[shown], headers="keys", tablefmt="github", showindex=False, floatfmt=".3f")
    return head + body + "\n"
