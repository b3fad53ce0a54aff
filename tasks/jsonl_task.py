"""Your own prompts: a JSON-lines file, one object a line with an id and a prompt.

    {"id": "q1", "prompt": "Write a haiku about caches."}
    {"id": "q2", "turns": ["Name a prime.", "And the next one?"], "category": "math"}
    {"id": "q3", "prompt": "Summarise: ...", "reference": "text the answer may quote"}

A line with ``turns`` (a list of user turns) is a chat sample; one with ``prompt`` is
plain text unless ``chat=true``. An optional ``reference`` string is ``Sample.reference``
(the text ``reference-lookup`` copies drafts from). Fields other than id, prompt/turns,
language, category and reference go to ``Sample.meta``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from harness.paths import resolve_repo_path
from tasks.base import Sample, Task, TaskConfig, TaskDataError, data_not_found, iter_json_lines


@dataclass
class JsonlTaskConfig(TaskConfig):
    name: str = "jsonl"  # registry name of the task
    path: Optional[str] = None  # the .jsonl (or .jsonl.gz) file; required
    id_field: str = "id"  # key of the sample id (string or integer, unique)
    prompt_field: str = "prompt"  # key of a single prompt string
    turns_field: str = "turns"  # key of a list of user turns, used instead of the prompt
    language_field: str = "language"  # optional key of a programming-language label
    category_field: str = "category"  # optional key of a category label
    reference_field: str = "reference"  # optional key of a reference text (Sample.reference)
    chat: Optional[bool] = None  # use the chat template; None: only for lines with turns


class JsonlTask(Task):
    config_class = JsonlTaskConfig
    cfg: JsonlTaskConfig

    def load(self) -> list[Sample]:
        cfg = self.cfg
        if not cfg.path:
            raise TaskDataError("the jsonl task needs a file: pass task.path=<file.jsonl>")
        path = resolve_repo_path(cfg.path)
        if not path.is_file():
            raise data_not_found("jsonl task file", path, "task.path", env=False)
        samples: list[Sample] = []
        first_line: dict[str, int] = {}
        for lineno, row in iter_json_lines(path):

            def bad(problem: str, lineno: int = lineno) -> TaskDataError:
                return TaskDataError(f"{path}:{lineno}: {problem}")

            sid = row.get(cfg.id_field)
            if sid is None:
                raise bad(f"missing id field '{cfg.id_field}'")
            if isinstance(sid, bool) or not isinstance(sid, (str, int)):
                raise bad(f"id field '{cfg.id_field}' must be a string or integer")
            sid = str(sid)
            if sid in first_line:
                raise bad(f"duplicate id '{sid}' (first on line {first_line[sid]})")
            first_line[sid] = lineno

            has_turns, has_prompt = cfg.turns_field in row, cfg.prompt_field in row
            if has_turns and has_prompt:
                raise bad(f"has both '{cfg.prompt_field}' and '{cfg.turns_field}'; keep one")
            if has_turns:
                turns = row[cfg.turns_field]
                if not isinstance(turns, list) or not turns:
                    raise bad(f"'{cfg.turns_field}' must be a non-empty list of strings")
                if not all(isinstance(t, str) and t for t in turns):
                    raise bad(f"'{cfg.turns_field}' must hold only non-empty strings")
            elif has_prompt:
                prompt = row[cfg.prompt_field]
                if not isinstance(prompt, str) or not prompt:
                    raise bad(f"'{cfg.prompt_field}' must be a non-empty string")
                turns = [prompt]
            else:
                raise bad(f"missing prompt field '{cfg.prompt_field}' (or '{cfg.turns_field}')")

            labels: dict[str, Optional[str]] = {}
            for key in (cfg.language_field, cfg.category_field):
                value = row.get(key)
                if value is not None and not isinstance(value, str):
                    raise bad(f"'{key}' must be a string")
                labels[key] = value
            reference = row.get(cfg.reference_field)
            if reference is not None and not isinstance(reference, str):
                raise bad(f"'{cfg.reference_field}' must be a string")
            used = {cfg.id_field, cfg.prompt_field, cfg.turns_field}
            used |= {cfg.language_field, cfg.category_field, cfg.reference_field}
            meta: dict[str, Any] = {k: v for k, v in row.items() if k not in used}
            samples.append(
                Sample(
                    id=sid,
                    turns=list(turns),
                    chat=has_turns if cfg.chat is None else bool(cfg.chat),
                    language=labels[cfg.language_field],
                    category=labels[cfg.category_field],
                    reference=reference,
                    meta=meta,
                )
            )
        if not samples:
            raise TaskDataError(f"{path}: no samples (the file is empty)")
        return samples
