"""``harness list``: the catalogue of methods, tasks and models, generated from the registry.

Nothing here is a second list: a method's line comes from its class (the docstring's first
sentence, ``needs``, ``lossy_when``, ``main_settings``) and its config dataclass's defaults; a
task's from its docstring and its data (sizes and splits counted by loading it); a model's
from its preset, its ``config.json`` and the weights' header, and what pairs with it from the
method defaults and trained components (``training.json``'s ``base_model``) that point at it.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from harness.paths import resolve_repo_path
from harness.registry import METHODS, MODELS, TASKS

KINDS = ("methods", "tasks", "models")


@dataclass
class Entry:
    """One catalogue line, and what ``--verbose`` adds below it."""

    name: str  # registry name
    summary: str  # what it is, in one sentence
    facts: list[str]  # short "what it needs", "lossless", "164 samples" parts
    details: list[str] = field(default_factory=list)  # --verbose: one "key=value" per config field

    def line(self, width: int) -> str:
        return f"  {self.name:<{width}}  {self.summary} [{'; '.join(self.facts)}]"


def summary(cls: type) -> str:
    """The first sentence of ``cls``'s docstring, else of its module's."""
    text = cls.__dict__.get("__doc__") or inspect.getmodule(cls).__doc__ or ""
    first = " ".join(text.strip().split("\n\n")[0].split()).replace("``", "`")
    return first.split(". ")[0].rstrip(".") or "(no docstring)"


def settings(cfg: Any, names: Optional[tuple[str, ...]] = None) -> list[str]:
    """``field=default`` for ``names`` (all fields but ``name`` when None) of a config dataclass."""
    fields = [f.name for f in dataclasses.fields(cfg) if f.name != "name"] if names is None else list(names)
    return [f"{n}={getattr(cfg, n)}" for n in fields]


def method_entry(name: str) -> Entry:
    cls = METHODS.get(name)
    cfg = cls.config_class(name=name)
    from methods.base import NEEDS_TEXT

    needs = ", ".join(NEEDS_TEXT[kind] for kind in cls.needs) or "nothing"
    label = {"": "lossless", "always": "lossy (by design)"}.get(cls.lossy_when, f"lossless; lossy with {cls.lossy_when}")
    label += " (greedy only)" if cls.greedy_only else ""
    facts = [f"needs {needs}", label] + settings(cfg, tuple(cls.main_settings))
    return Entry(name, summary(cls), facts, settings(cfg))


def task_entry(name: str) -> Entry:
    from tasks.base import TaskDataError

    cls = TASKS.get(name)
    cfg = cls.config_class(name=name)
    try:
        task = cls(cfg)
        samples = task.load()
    except TaskDataError as exc:
        return Entry(name, summary(cls), [f"no data here: {exc}"], settings(cfg))
    tune = sum(task.tune_flags(samples))
    facts = [f"{len(samples)} samples", f"splits tune {tune}, report {len(samples) - tune}"]
    for what in ("language", "category"):
        counts = Counter(getattr(s, what) for s in samples if getattr(s, what))
        if len(counts) > 1:
            facts.append(f"{len(counts)} {what} labels: {', '.join(counts)}")
    return Entry(name, summary(cls), facts, settings(cfg))


def parameters(directory: Path) -> Optional[int]:
    """Parameters stored in ``directory``'s safetensors files (read from their headers), or None."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for path in files:
        with path.open("rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for key, tensor in header.items():
            if key != "__metadata__":
                count = 1
                for dim in tensor["shape"]:
                    count *= dim
                total += count
    return total


def architecture(directory: Path) -> str:
    """``llama, hidden 192, 6 layers, vocab 4096`` from ``directory/config.json`` ('' without one)."""
    path = directory / "config.json"
    if not path.is_file():
        return ""
    config = json.loads(path.read_text())
    parts = [config.get("model_type", "?")]
    for key, label in (("hidden_size", "hidden"), ("num_hidden_layers", "layers"), ("vocab_size", "vocab")):
        if key in config:
            parts.append(f"{label} {config[key]}" if label != "layers" else f"{config[key]} layers")
    return ", ".join(parts)


def pairings(model_path: str) -> list[str]:
    """Method defaults that point at a trained component whose ``training.json`` names ``model_path``
    as its base model: ``medusa (heads zoo/target-medusa)``."""
    found = []
    for name in METHODS.names():
        cfg = METHODS.get(name).config_class(name=name)
        for f in dataclasses.fields(cfg):
            value = getattr(cfg, f.name)
            if not isinstance(value, str) or not value.startswith("zoo/"):
                continue
            info = resolve_repo_path(value) / "training.json"
            if info.is_file() and json.loads(info.read_text()).get("base_model") == model_path:
                found.append(f"{name} ({f.name} {value})")
    return found


def model_entry(name: str) -> Entry:
    cfg = MODELS.get(name)
    directory = resolve_repo_path(cfg.path)
    facts = []
    count = None if cfg.random_init else parameters(directory)
    if count is not None:
        facts.append(f"{count / 1e6:.2f}M parameters")
    elif cfg.random_init:
        facts.append("random weights (untrained)")
    if arch := architecture(directory):
        facts.append(arch)
    info = directory / "training.json"
    if info.is_file() and (base := json.loads(info.read_text()).get("base_model")):
        facts.append(f"fine-tune of {base}")
    if cfg.draft:
        facts.append(f"draft {cfg.draft}")
    if paired := pairings(cfg.path):
        facts.append(f"pairs with {', '.join(paired)}")
    if not directory.exists():
        facts.append(f"not found at {cfg.path}")
    where = "random init from" if cfg.random_init else "weights at"
    return Entry(name, f"{where} {cfg.path}", facts, settings(cfg))


BUILDERS = {"methods": (METHODS, method_entry), "tasks": (TASKS, task_entry), "models": (MODELS, model_entry)}


def catalogue(kinds: tuple[str, ...] = KINDS, verbose: bool = False) -> str:
    """The catalogue of ``kinds`` (some of ``KINDS``), one line per entry (``verbose``: every setting too)."""
    lines: list[str] = []
    for kind in kinds:
        registry, build = BUILDERS[kind]
        entries = [build(name) for name in registry.names()]
        width = max((len(e.name) for e in entries), default=0)
        lines.append(f"{kind} ({len(entries)}):")
        for e in entries:
            lines.append(e.line(width))
            if verbose:
                lines += [f"  {'':<{width}}    {d}" for d in e.details]
    return "\n".join(lines)
