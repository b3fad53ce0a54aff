"""Run directories: the manifest, the per-sample records and what is derived from them.

A run directory holds ``manifest.json`` (the resolved config and the environment),
``samples.jsonl`` (one record per method x sample x turn, appended and fsynced as soon
as it exists) and the derived ``summary.csv`` and ``leaderboard.md``. Everything but
the first two is rebuilt from them and never hand-edited.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import platform
import subprocess
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from harness.detail import DETAIL_COLUMNS, csv_cell
from harness.errors import HarnessError
from harness.paths import REPO_ROOT, load_json_file

MANIFEST, SAMPLES, SUMMARY, LEADERBOARD = "manifest.json", "samples.jsonl", "summary.csv", "leaderboard.md"
SUMMARY_JSON = "summary.json"  # summary.csv's rows as JSON, lists and dicts as they are
EXECUTION = "execution.jsonl"  # sandboxed test results per record (opt-in: run.execute=true)
TEXTS = "texts.jsonl"  # per (sample, turn): the prompt and the reference's output token by token, for viewers
DROPPED = "dropped.jsonl"  # prompts left out because they do not fit the context (task.too_long=drop)
# with execution: pass@1, completions judged, completions skipped (toolchain missing: not judged),
# isolation of the sandbox (full | weak | unrecorded, see harness/sandbox/__init__.py)
PASS_AT_1_COLUMNS = ["pass@1", "pass@1_judged", "pass@1_skipped", "pass@1_isolation"]
SUMMARY_COLUMNS = [
    "method", "task", "samples", "exact_match", "mean_accepted_tokens", "tokens_per_s", "speedup",
    "target_forwards", "draft_forwards", "new_tokens", "wall_time_s", "forward_share", "ties", "mismatches",
    "lossless", "repetition", "stop_reasons", "model",
]  # fmt: skip


LOCK = "writer.lock"  # held (fcntl.flock) by the one `harness run` writing the directory; holds "PID host"


class RunDirError(HarnessError):
    """A run directory that cannot be used as asked; the message says what to do."""


def jsonl_lines(path: Path) -> tuple[list[tuple[int, bytes, Optional[dict]]], bool]:
    """The non-blank lines of a JSON-lines file as (line number, raw bytes, the object or None
    when the line is not a UTF-8 JSON object), and whether the file ends with a newline.
    Never raises on content: binary, NUL-padded or torn lines come back with None."""
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip(b" \t\r\x00"):
            if line:  # NUL padding (a file extended by a crash) is a torn line, not a blank one
                out.append((number, line, None))
            continue
        try:
            value = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            value = None
        out.append((number, line, value if isinstance(value, dict) else None))
    return out, raw.endswith(b"\n") or not raw


def read_jsonl(path: Path, what: str) -> list[dict]:
    """The objects of a JSON-lines file the harness wrote whole (not appended record by record);
    a bad line raises RunDirError naming the file and the line."""
    if not path.exists():
        return []
    lines, _ = jsonl_lines(path)
    for number, line, value in lines:
        if value is None:
            raise RunDirError(f"{path} line {number} is not a JSON object ({what}); delete the file and re-run "
                              "`harness run` with the same --out to rewrite it")
    return [value for _, _, value in lines]


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
    forward_time_s: float  # time inside model forwards (target and draft, through the engine), within wall_time_s
    prefill_time_s: Optional[float]  # the first target forward (the prompt); None if no forward was timed
    draft_forward_time_s: float  # time inside draft forwards (a draft model's, or a method's own draft heads)
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
    # what ended the generation: eos | stop:<the stop string> | max_new_tokens (harness/stops.py
    # Committer); None for a record written before it existed
    stop_reason: Optional[str] = None
    # share of the generated tokens inside a 4-gram already seen in prompt + output
    # (harness/repetition.py); None for an empty output or a record written before it existed
    repetition: Optional[float] = None
    # place of this method in the sample's run order (0 = ran first; the order rotates from
    # sample to sample, the reference included); None for a record written before it existed
    run_order: Optional[int] = None
    # seconds from the start of the generation to the end of the first target forward (the prompt's,
    # which yields the first token): time to first token; None for a record written before it existed
    first_token_s: Optional[float] = None
    extra: dict[str, Any] = field(default_factory=dict)
    engine: str = "harness"  # what ran the method: harness (this project's engine, harness/engine.py) | vllm

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


# published outputs (tables, baselines, the README and docs quoting them): editing them cannot change
# a figure, so they do not make a tree dirty; anything else uncommitted (or untracked) does
PUBLISHED = ("results", "README.md", "docs")


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
        self._lock = None  # the open writer.lock while this process is the directory's writer (``lock``)

    # ---- manifest ---------------------------------------------------------------
    def check(self, resume_key: str, force: bool) -> bool:
        """True when the directory holds a run that may be resumed with this config. A manifest
        without any complete record is a run that never started: any config may take it over
        (``started`` says so), and then this is False."""
        existing = self.path / MANIFEST
        if not existing.exists():
            return False
        old = self.manifest()
        if not self.started():
            return False
        if old.get("resume_key") != resume_key and not force:
            raise RunDirError(
                f"{self.path} holds a run made with a different config; use another --out, or --force to append anyway"
            )
        return True

    def has_manifest(self) -> bool:
        return (self.path / MANIFEST).exists()

    def take_over(self) -> None:
        """Clear what a run that never started left (its prompts left out as too long); its
        manifest is rewritten by ``create``, a torn first line moved aside by ``records``."""
        (self.path / DROPPED).unlink(missing_ok=True)

    def started(self) -> bool:
        """Whether ``samples.jsonl`` holds at least one complete record."""
        path = self.path / SAMPLES
        return path.exists() and any(value is not None for _, _, value in jsonl_lines(path)[0])

    def lock(self) -> None:
        """Become the directory's one writer until this process ends: an exclusive ``flock`` on
        ``writer.lock`` (the kernel releases it when the process dies, ``kill -9`` included),
        which then holds this process's PID and host. Another holder: RunDirError naming them."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / LOCK, "a+", encoding="utf-8")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            handle.seek(0)
            holder = handle.read().split() or ["?", "?"]
            handle.close()
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise RunDirError(
                f"{self.path} is being written by another `harness run` (PID {holder[0]} on host {holder[-1]}); "
                "wait for it to end (or stop it), or give another --out"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} {platform.node()}\n")
        handle.flush()
        self._lock = handle  # kept open: closing it would release the lock

    def check_writable(self) -> None:
        """Refuse, before any work, a directory (or the nearest existing parent of a new one) or
        a run file this process cannot write: nothing computed afterwards could be saved."""
        if self.path.exists() and not self.path.is_dir():
            raise RunDirError(f"--out {self.path} is a file, not a directory; give a directory (new or a run's)")
        probe = self.path
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        try:
            with tempfile.TemporaryFile(dir=probe):
                pass
            for name in (MANIFEST, SAMPLES):
                if (self.path / name).exists():
                    open(self.path / name, "a").close()
        except OSError as exc:
            where = exc.filename or probe
            message = f"cannot write to {where} ({exc.strerror}); make it writable or give another --out"
            raise RunDirError(message) from None

    def create(self, manifest: dict, resume_key: str) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self._write_atomic(MANIFEST, json.dumps({**manifest, "resume_key": resume_key}, indent=2, default=str))

    def manifest(self) -> dict:
        """manifest.json, validated: a JSON object with the sections every reader uses."""
        path = self.path / MANIFEST
        fix = "it is written by `harness run`: restore it, or delete the run directory and run again"
        data = load_json_file(path, "run manifest", fix, error=RunDirError)
        for key in ("config", "environment", "model"):
            if not isinstance(data.get(key), dict):
                raise RunDirError(f"run manifest {path} has no `{key}` object; {fix}")
        return data

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
        lines, ends_with_newline = jsonl_lines(path)
        good: list[Record] = []
        bad: list[tuple[int, bytes]] = []
        for index, (number, line, value) in enumerate(lines):
            try:
                if value is None:
                    raise ValueError("not a UTF-8 JSON object")
                good.append(Record(**value))
            except (ValueError, TypeError) as exc:
                torn_tail = index == len(lines) - 1 and not ends_with_newline
                if not torn_tail and not (repair and drop_corrupt):
                    raise RunDirError(
                        f"{path} line {number} is corrupt ({exc}); fix or delete that line, "
                        "or resume the run with --drop-corrupt to move it aside and keep the other records"
                    ) from None
                bad.append((number, line))
        notices = []
        where = ", ".join(str(n) for n, _ in bad)
        if bad and repair:
            with open(self.path / "samples.corrupt.jsonl", "ab") as f:  # the bytes as they were
                f.writelines(line + b"\n" for _, line in bad)
            self._write_atomic(SAMPLES, "".join(json.dumps(r.__dict__, default=str) + "\n" for r in good))
            notices.append(f"moved corrupt line(s) {where} of samples.jsonl to samples.corrupt.jsonl")
        elif bad:
            notices.append(f"{path}: skipped the torn last line (line {where}: a run killed mid-write; left as it is, "
                           "`harness run` with the same --out repairs it)")  # fmt: skip
        return good, notices

    # ---- derived files ------------------------------------------------------------
    def write_execution(self, results: list[dict], isolation: Optional[dict] = None) -> None:
        """execution.jsonl, and the sandbox's ``isolation`` (``harness.sandbox.Isolation.as_dict``)
        as the manifest's ``execution_isolation``."""
        self._write_atomic(EXECUTION, "".join(json.dumps(r, default=str) + "\n" for r in results))
        if isolation is not None:
            manifest = {**self.manifest(), "execution_isolation": isolation}
            self._write_atomic(MANIFEST, json.dumps(manifest, indent=2, default=str))

    def append_dropped(self, entry: dict) -> None:
        """One prompt left out (task.too_long=drop): sample, turn, its tokens and the context."""
        with open(self.path / DROPPED, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def append_text(self, entry: dict) -> None:
        """One (sample, turn)'s prompt and reference pieces (``runner.sample_text``) for the report."""
        with open(self.path / TEXTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")

    def texts(self) -> dict[tuple[str, int], dict]:
        """The entries of texts.jsonl by (sample_id, turn); empty for a run made before it existed."""
        path = self.path / TEXTS
        if not path.exists():
            return {}
        entries = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a torn last line: the viewer only loses that sample's text
                continue
            entries[(str(row["sample_id"]), int(row["turn"]))] = row
        return entries

    def dropped(self) -> list[dict]:
        return read_jsonl(self.path / DROPPED, "prompts left out as too long")

    def execution(self) -> list[dict]:
        return read_jsonl(self.path / EXECUTION, "sandboxed test results")

    def write_summary(self, table: pd.DataFrame) -> pd.DataFrame:
        """Write summary.csv and summary.json (the ``SUMMARY_COLUMNS`` and ``DETAIL_COLUMNS`` of
        ``report.metrics``); returns the table written."""
        columns = SUMMARY_COLUMNS + [c for c in PASS_AT_1_COLUMNS if c in table.columns]
        table = table.reindex(columns=columns + [c for c in DETAIL_COLUMNS if c in table.columns])
        table.map(csv_cell).to_csv(self.path / SUMMARY, index=False)
        self._write_atomic(SUMMARY_JSON, table.to_json(orient="records", indent=2))
        return table

    def write_leaderboard(self, text: str) -> None:
        """Write leaderboard.md (``harness.leaderboard.run_leaderboard``)."""
        self._write_atomic(LEADERBOARD, text)
