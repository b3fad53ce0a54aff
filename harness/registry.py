"""Name -> implementation registries for methods, tasks and models.

Adding one is one line: ``METHODS.add("name", "package.module:Attr")``. Entries are
imported lazily, so listing names costs nothing. Out-of-tree packages register through
the entry-point groups ``harness.methods``, ``harness.tasks`` and ``harness.models``
(see pyproject.toml); the entry point's value uses the same ``module:attr`` form.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points


class UnknownName(KeyError):
    """An unknown registry name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


@dataclass
class Registry:
    kind: str  # "method", "task" or "model": used in messages
    group: str  # entry-point group for plugins

    def __post_init__(self) -> None:
        self._targets: dict[str, object] = {}
        self._plugins_loaded = False

    def add(self, name: str, target: object) -> None:
        """Register ``target`` (an object, or a lazy ``"module:attr"`` string) as ``name``."""
        self._targets[name] = target

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            self._targets.setdefault(ep.name, ep.value)

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._targets)

    def get(self, name: str) -> object:
        self._load_plugins()
        if name not in self._targets:
            valid = ", ".join(self.names())
            raise UnknownName(f"unknown {self.kind} '{name}'; valid {self.kind}s: {valid}")
        target = self._targets[name]
        if isinstance(target, str):
            module, _, attr = target.partition(":")
            target = getattr(importlib.import_module(module), attr)
            self._targets[name] = target
        return target


METHODS = Registry("method", "harness.methods")
TASKS = Registry("task", "harness.tasks")
MODELS = Registry("model", "harness.models")

# --- methods: one file each under methods/ ---
METHODS.add("autoregressive", "methods.autoregressive:Autoregressive")
METHODS.add("hf-generate", "methods.hf_generate:HFGenerate")
METHODS.add("speculative", "methods.speculative:Speculative")
METHODS.add("prompt-lookup", "methods.prompt_lookup:PromptLookup")
METHODS.add("reference-lookup", "methods.reference_lookup:ReferenceLookup")
METHODS.add("hf-assisted", "methods.hf_assisted:HFAssisted")
METHODS.add("hf-prompt-lookup", "methods.hf_prompt_lookup:HFPromptLookup")
METHODS.add("space", "methods.space:Space")
METHODS.add("medusa", "methods.medusa:Medusa")
METHODS.add("eagle", "methods.eagle:Eagle")
METHODS.add("eagle2", "methods.eagle2:Eagle2")
METHODS.add("eagle3", "methods.eagle3:Eagle3")
METHODS.add("lookahead", "methods.lookahead:Lookahead")
METHODS.add("swift", "methods.swift:Swift")
METHODS.add("recycling", "methods.recycling:Recycling")
METHODS.add("rest", "methods.rest:Rest")
METHODS.add("suffix", "methods.suffix:Suffix")
METHODS.add("speculative-tree", "methods.speculative_tree:SpeculativeTree")
METHODS.add("nest", "methods.nest:Nest")
METHODS.add("chimera", "methods.chimera:Chimera")
METHODS.add("llm-to-slm", "methods.llm_to_slm:LlmToSlm")

# --- tasks: one file each under tasks/ ---
TASKS.add("humaneval", "tasks.humaneval:HumanEval")
TASKS.add("humaneval-x", "tasks.humaneval_x:HumanEvalX")
TASKS.add("spec-bench", "tasks.spec_bench:SpecBench")
TASKS.add("jsonl", "tasks.jsonl_task:JsonlTask")

# --- models: a name -> ModelConfig preset (harness.config) ---
MODELS.add("random-tiny", "harness.models:RANDOM_TINY")
MODELS.add("zoo-target", "harness.models:ZOO_TARGET")
MODELS.add("zoo-draft", "harness.models:ZOO_DRAFT")
MODELS.add("zoo-space", "harness.models:ZOO_SPACE")
