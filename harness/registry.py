"""Name -> implementation registries for methods, tasks and models.

Adding one is one line: ``METHODS.add("name", "package.module:Attr")``. Entries are
imported lazily, so listing names costs nothing. Out-of-tree packages register through
the entry-point groups ``harness.methods``, ``harness.tasks`` and ``harness.models``
(see pyproject.toml); the entry point's value uses the same ``module:attr`` form.
A name registered twice is refused, and so is a method class that does not implement the
interface (``methods.base.check_method``, run when the class is first resolved).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from harness.errors import HarnessError


class UnknownName(HarnessError, KeyError):
    """An unknown registry name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError quotes its message; we want plain text
        return str(self.args[0])


class RegistryError(TypeError):
    """A registration the registry refuses (a name taken twice, a class that does not fit)."""


def _load(target: str) -> object:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class Registry:
    kind: str  # "method", "task" or "model": used in messages
    group: str  # entry-point group for plugins
    # "module:attr" of a function (name, implementation) that raises when the implementation
    # does not fit the interface; run when an entry is first resolved ("": no check)
    check: str = ""

    def __post_init__(self) -> None:
        self._targets: dict[str, object] = {}
        self._plugins_loaded = False

    def add(self, name: str, target: object) -> None:
        """Register ``target`` (an object, or a lazy ``"module:attr"`` string) as ``name``;
        a name already taken is refused."""
        if name in self._targets:
            raise RegistryError(f"{self.kind} '{name}' is already registered ({self._targets[name]!r}); "
                                f"register {target!r} under another name")  # fmt: skip
        if self.check and not isinstance(target, str):
            _load(self.check)(name, target)
        self._targets[name] = target

    def remove(self, name: str) -> None:
        """Forget ``name`` (a test that registered a toy cleans up with it)."""
        self._targets.pop(name, None)

    def _load_plugins(self) -> None:
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            if self._targets.get(ep.name, ep.value) != ep.value:
                raise RegistryError(f"plugin {self.kind} '{ep.name}' ({ep.value}) takes a name already registered "
                                    f"({self._targets[ep.name]!r}); rename its entry point")  # fmt: skip
            self._targets[ep.name] = ep.value

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
            target = _load(target)
            self._targets[name] = target
        if self.check:
            _load(self.check)(name, target)
        return target


METHODS = Registry("method", "harness.methods", check="methods.base:check_method")
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
METHODS.add("hidden-transfer", "methods.hidden_transfer:HiddenTransfer")
METHODS.add("firp", "methods.hidden_transfer:Firp")
METHODS.add("nest", "methods.nest:Nest")
METHODS.add("chimera", "methods.chimera:Chimera")
METHODS.add("llm-to-slm", "methods.llm_to_slm:LlmToSlm")
METHODS.add("coral", "methods.coral:Coral")

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
MODELS.add("zoo-coral", "harness.models:ZOO_CORAL")
