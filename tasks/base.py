"""The task interface: a task turns a data file into a list of Samples.

Tasks never import methods or models. Prompt text is built here (``render_prompt``);
tokenisation and timing belong to the runner.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from harness.errors import HarnessError
from harness.paths import DATA_ENV


SPLITS = ("all", "tune", "report")  # task.split values
TOO_LONG = ("error", "drop")  # task.too_long values


class TaskDataError(HarnessError):
    """Missing or malformed task data; the message says where we looked and what to do."""


@dataclass
class TaskConfig:
    name: str = "?"  # registry name of the task
    limit: Optional[int] = None  # at most this many samples (per language for humaneval-x)
    shard: int = 0  # run only shard `shard` of `num_shards` (samples shard, shard+N, ...; after limit)
    num_shards: int = 1  # split the task into this many disjoint shards (merge with `harness leaderboard`)
    # all | tune (the samples settings are chosen on: `make tables`) | report (the rest: published
    # figures); applied before limit and shard, each task's rule in its ``tune_flags``
    split: str = "all"
    # generation also ends at the first of these strings in the output text (see harness/stops.py
    # StopStrings); None = the task's default (Task.default_stop), [] = no stop strings;
    # \n, \t, \r and \\ are read as escapes (a command line cannot easily hold a newline)
    stop: Optional[list[str]] = None
    # a prompt that does not fit the model's context with max_new_tokens: "error" refuses the run
    # before any work (one line naming the sample); "drop" leaves that sample (or that turn and the
    # ones after it) out, names it in the log and in the run's dropped.jsonl, and headers count it
    too_long: str = "error"


@dataclass
class Sample:
    id: str  # unique within the task, stable across runs
    turns: list[str]  # user turns; single-turn tasks have exactly one
    chat: bool = False  # format turns with the tokenizer's chat template
    language: Optional[str] = None  # programming language, when the task has one
    category: Optional[str] = None  # category label (Spec-Bench), when the task has one
    reference: Optional[str] = None  # a text given with the sample to copy drafts from (reference-lookup)
    meta: dict[str, Any] = field(default_factory=dict)  # tests, entry point, reference...


class Task:
    """Base class: subclasses set ``config_class`` and implement ``load()``."""

    config_class: type[TaskConfig] = TaskConfig

    def __init__(self, cfg: TaskConfig):
        self.cfg = cfg
        if cfg.stop is not None and any(not isinstance(s, str) or not s for s in cfg.stop):
            raise TaskDataError(f"task.stop={list(cfg.stop)!r} holds an empty string; drop it (task.stop=[] for none)")
        if cfg.too_long not in TOO_LONG:
            raise TaskDataError(f"task.too_long={cfg.too_long!r}: use error (refuse the run) or drop (leave such prompts out)")

    def load(self) -> list[Sample]:
        """All samples of the task, filters applied, before ``limit``."""
        raise NotImplementedError

    def samples(self) -> list[Sample]:
        """The samples to run: filters, then the split, then ``limit``, then this run's shard."""
        n, i = self.cfg.num_shards, self.cfg.shard
        if n < 1 or not 0 <= i < n:
            raise TaskDataError(f"task.shard={i} task.num_shards={n}: need num_shards >= 1 and 0 <= shard < num_shards")
        if self.cfg.limit is not None and self.cfg.limit < 1:  # a negative limit would slice from the end
            raise TaskDataError(f"--limit {self.cfg.limit} (task.limit): a limit must be at least 1 sample; "
                                "leave --limit out to run every sample")  # fmt: skip
        return self.apply_limit(self.apply_split(self.load()))[i::n]

    def apply_split(self, samples: list[Sample]) -> list[Sample]:
        """The samples of ``task.split`` (all | tune | report), in their order."""
        split = self.cfg.split
        if split not in SPLITS:
            raise TaskDataError(
                f"task.split={split!r}: use all, tune (the samples settings are chosen on) or report (the rest)"
            )
        if split == "all":
            return samples
        tune = self.tune_flags(samples)
        return [s for s, is_tune in zip(samples, tune) if is_tune == (split == "tune")]

    def tune_flags(self, samples: list[Sample]) -> list[bool]:
        """Which of ``samples`` (the whole task, filters applied) form the tuning split.

        Default: the first quarter (rounded up) in file order. Tasks with problem numbers or
        groups override it, so that a sample's split never depends on the filters.
        """
        quarter = math.ceil(len(samples) / 4)
        return [i < quarter for i in range(len(samples))]

    def apply_limit(self, samples: list[Sample]) -> list[Sample]:
        return samples if self.cfg.limit is None else samples[: self.cfg.limit]

    def stop_strings(self, sample: Sample) -> tuple[str, ...]:
        """The stop strings for ``sample``: ``task.stop`` when set (``[]``: none), else the default."""
        return self.default_stop(sample) if self.cfg.stop is None else tuple(unescape(s) for s in self.cfg.stop)

    def default_stop(self, sample: Sample) -> tuple[str, ...]:
        """Stop strings when ``task.stop`` is not set; none unless a task says otherwise."""
        return ()


ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def unescape(text: str) -> str:
    """``text`` with the escapes ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` replaced; other backslashes kept."""
    return re.sub(r"\\(.)", lambda m: ESCAPES.get(m.group(1), m.group(0)), text, flags=re.S)


def data_not_found(
    what: str, looked: str | os.PathLike, key: str, env: bool = True
) -> TaskDataError:
    """The one-line error for missing data: where we looked and how to point elsewhere.

    ``key`` is the config override (e.g. ``task.data_dir``); ``env`` adds the data-dir
    environment variable as a second way out when the default location applies.
    """
    hint = f"pass {key}=<path>"
    if env:
        hint += f" or set {DATA_ENV} to the directory that holds the shared datasets"
    return TaskDataError(f"{what} not found at {looked}; {hint}")


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """The rows of a JSON-lines file (``.gz`` too) via ``datasets``, offline and cached."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # read at import: set before it
    import datasets

    quiet = not datasets.are_progress_bars_disabled()
    if quiet:
        datasets.disable_progress_bars()
    try:
        ds = datasets.load_dataset("json", data_files=[str(path)], split="train")
    except Exception as e:  # malformed JSON, unreadable file, cache trouble...
        raise TaskDataError(f"could not read {path}: {type(e).__name__}: {e}") from e
    finally:
        if quiet:
            datasets.enable_progress_bars()
    return ds.to_list()


def iter_json_lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` for each non-blank line of a JSON-lines file (``.gz`` too)."""
    opener: Any = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise TaskDataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                kind = type(row).__name__
                raise TaskDataError(f"{path}:{lineno}: expected a JSON object, got {kind}")
            yield lineno, row


VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def render_prompt(sample: Sample, turn: int, replies: list[str], tokenizer: Any) -> str:
    """The text fed to the model for ``turn`` (0-based), given the earlier ``replies``.

    Plain samples are used as they are. Chat samples use the tokenizer's chat template
    when it has one, else the Vicuna v1.1 format that Spec-Bench uses.
    """
    if not sample.chat:
        return sample.turns[turn]
    messages: list[dict[str, str]] = []
    for i in range(turn + 1):
        messages.append({"role": "user", "content": sample.turns[i]})
        if i < turn:
            messages.append({"role": "assistant", "content": replies[i]})
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = VICUNA_SYSTEM + " "
    for m in messages:
        if m["role"] == "user":
            text += f"USER: {m['content']} ASSISTANT:"
        else:
            text += f" {m['content']}</s>"
    return text
