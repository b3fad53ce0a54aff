"""Spec-Bench: 480 chat questions in 13 category labels (6 tasks), some multi-turn."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.paths import default_data_dir, resolve_repo_path
from tasks.base import Sample, Task, TaskConfig, TaskDataError, data_not_found, read_json_records

# The eight MT-bench categories form Spec-Bench's "multi-turn conversation" task; every
# other category label is a task of its own.
MT_BENCH = (
    "writing",
    "roleplay",
    "reasoning",
    "math",
    "coding",
    "extraction",
    "stem",
    "humanities",
)
OTHER_TASKS = ("translation", "summarization", "qa", "math_reasoning", "rag")
CATEGORIES = MT_BENCH + OTHER_TASKS


@dataclass
class SpecBenchConfig(TaskConfig):
    name: str = "spec-bench"  # registry name of the task
    path: Optional[str] = None  # question.jsonl; default <data dir>/spec_bench/question.jsonl
    categories: list[str] = field(default_factory=list)  # keep only these labels; empty = all


def spec_bench_task(category: str) -> str:
    """Spec-Bench's task for a category label: ``mt_bench`` or the label itself."""
    return "mt_bench" if category in MT_BENCH else category


class SpecBench(Task):
    config_class = SpecBenchConfig
    cfg: SpecBenchConfig

    def data_file(self) -> Path:
        if self.cfg.path:
            return resolve_repo_path(self.cfg.path)
        return default_data_dir() / "spec_bench" / "question.jsonl"

    def load(self) -> list[Sample]:
        path = self.data_file()
        if not path.is_file():
            raise data_not_found("Spec-Bench questions", path, "task.path", env=not self.cfg.path)
        rows = read_json_records(path)
        samples: list[Sample] = []
        for i, row in enumerate(rows):
            turns, category = row.get("turns"), row.get("category")
            if row.get("question_id") is None or not category or not turns:
                raise TaskDataError(f"{path}: row {i + 1} lacks question_id, category or turns")
            meta = {"question_id": row["question_id"], "task": spec_bench_task(category)}
            if row.get("reference") is not None:
                meta["reference"] = row["reference"]
            samples.append(
                Sample(
                    id=str(row["question_id"]),
                    turns=list(turns),
                    chat=True,
                    category=category,
                    meta=meta,
                )
            )
        if self.cfg.categories:
            present = list(dict.fromkeys(s.category for s in samples))  # file order
            unknown = [c for c in self.cfg.categories if c not in present]
            if unknown:
                raise TaskDataError(
                    f"unknown spec-bench categor{'y' if len(unknown) == 1 else 'ies'} "
                    f"{', '.join(map(repr, unknown))}; valid: {', '.join(present)}"
                )
            wanted = set(self.cfg.categories)
            samples = [s for s in samples if s.category in wanted]
        return samples

    def tune_flags(self, samples: list[Sample]) -> list[bool]:
        """The first quarter (rounded up) of every category in file order: 3 of each MT-bench
        category's 10 questions, 20 of each other task's 80 (124 of 480); the rest report."""
        size = Counter(s.category for s in samples)
        seen: Counter[Optional[str]] = Counter()
        flags = []
        for s in samples:
            flags.append(seen[s.category] < math.ceil(size[s.category] / 4))
            seen[s.category] += 1
        return flags
