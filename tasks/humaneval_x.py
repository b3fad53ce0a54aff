"""HumanEval-X: the 164 HumanEval problems in Python, C++, Java, JavaScript and Go."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from harness.paths import default_data_dir, resolve_repo_path
from tasks.base import (
    Sample,
    Task,
    TaskConfig,
    TaskDataError,
    data_not_found,
    read_json_records,
)
from tasks.humaneval import CODEX_STOP, TUNE_PROBLEMS, problem_number

LANGUAGES = ("python", "cpp", "java", "js", "go")  # file suffixes: humaneval_<lang>.jsonl.gz
ALIASES = {"py": "python", "c++": "cpp", "javascript": "js", "golang": "go"}
SUBDIR = "humaneval-x"
# Default stop strings per language. CodeGeeX's HumanEval-X generation stops a C++, Java,
# JavaScript or Go completion once its braces close the function (one more "}" than "{"),
# and Python at the Codex stops. As strings, for code laid out like the prompts: C++, JS and
# Go functions start at column 0, so the "}" that closes one is the first "}" at column 0;
# the Java method sits in `class Solution` indented by 4, so it closes with "    }" (the
# sandbox appends the class's "}", see harness/sandbox/cutting.py).
STOP = {
    "python": CODEX_STOP,
    "cpp": ("\n}",),
    "java": ("\n    }",),
    "js": ("\n}",),
    "go": ("\n}",),
}


@dataclass
class HumanEvalXConfig(TaskConfig):
    name: str = "humaneval-x"  # registry name of the task
    data_dir: Optional[str] = None  # holds humaneval_<lang>.jsonl.gz; default <data>/humaneval-x
    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))  # subset, in this order


def normalise_languages(names: list[str]) -> list[str]:
    """Lower-cased, aliases resolved, duplicates dropped; unknown names raise."""
    out: list[str] = []
    for name in names:
        lang = ALIASES.get(str(name).strip().lower(), str(name).strip().lower())
        if lang not in LANGUAGES:
            raise TaskDataError(
                f"unknown humaneval-x language '{name}'; valid: {', '.join(LANGUAGES)}"
            )
        if lang not in out:
            out.append(lang)
    return out


class HumanEvalX(Task):
    config_class = HumanEvalXConfig
    cfg: HumanEvalXConfig

    def data_dir(self) -> Path:
        if self.cfg.data_dir:
            return resolve_repo_path(self.cfg.data_dir)
        return default_data_dir() / SUBDIR

    def languages(self) -> list[str]:
        return normalise_languages(list(self.cfg.languages or LANGUAGES))

    def load(self) -> list[Sample]:
        langs = self.languages()
        root = self.data_dir()
        env = not self.cfg.data_dir  # the environment variable only moves the default
        if not root.is_dir():
            raise data_not_found("HumanEval-X directory", root, "task.data_dir", env=env)
        samples: list[Sample] = []
        for lang in langs:
            path = root / f"humaneval_{lang}.jsonl.gz"
            if not path.is_file():
                raise data_not_found(f"HumanEval-X {lang} file", path, "task.data_dir", env=env)
            for i, row in enumerate(read_json_records(path)):
                if not row.get("task_id") or row.get("prompt") is None:
                    raise TaskDataError(f"{path}: row {i + 1} lacks task_id or prompt")
                meta = {
                    k: v
                    for k, v in row.items()
                    if k not in ("task_id", "prompt") and v is not None
                }
                if not meta.get("example_test"):  # six problems per language have none
                    meta.pop("example_test", None)
                samples.append(
                    Sample(
                        id=str(row["task_id"]),
                        turns=[row["prompt"]],
                        chat=False,
                        language=lang,
                        meta=meta,
                    )
                )
        return samples

    def default_stop(self, sample: Sample) -> tuple[str, ...]:
        return STOP.get(sample.language or "", ())

    def tune_flags(self, samples: list[Sample]) -> list[bool]:
        """As HumanEval, in every language: problems 0-39 tune, 40-163 report (the same problems)."""
        seen: Counter[Optional[str]] = Counter()
        flags = []
        for s in samples:
            flags.append(problem_number(s.id, seen[s.language]) < TUNE_PROBLEMS)
            seen[s.language] += 1
        return flags

    def apply_limit(self, samples: list[Sample]) -> list[Sample]:
        """``limit`` counts per language."""
        if self.cfg.limit is None:
            return samples
        seen: dict[Optional[str], int] = {}
        kept = []
        for s in samples:
            seen[s.language] = seen.get(s.language, 0) + 1
            if seen[s.language] <= self.cfg.limit:
                kept.append(s)
        return kept
