"""`harness list`: the catalogue is generated from the registry, the classes and their configs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from harness.catalogue import catalogue, method_entry, model_entry, task_entry
from harness.cli import main
from harness.config import MethodConfig
from harness.registry import METHODS, TASKS
from methods.base import Method
from tasks.base import Sample, Task, TaskConfig


@dataclass
class ToyConfig(MethodConfig):
    name: str = "toy"
    steps: int = 3  # a setting shown on the method's line
    mode: str = "exact"  # a setting shown only with --verbose


class Toy(Method):
    """Toy decoding: an oracle guesses. Nothing else of this docstring is listed."""

    config_class = ToyConfig
    needs = ("datastore",)
    lossy_when = "mode=guess"
    main_settings = ("steps",)

    def generate(self, prompt_ids, stop, seed=0):  # listed here, never run
        raise NotImplementedError


@dataclass
class ToyTaskConfig(TaskConfig):
    name: str = "toy-task"


class ToyTask(Task):
    """Eight toy prompts in two languages."""

    config_class = ToyTaskConfig

    def load(self) -> list[Sample]:
        return [Sample(id=str(i), turns=["x"], language="ab"[i % 2]) for i in range(8)]


@pytest.fixture
def toys(monkeypatch):
    monkeypatch.setitem(METHODS._targets, "toy", Toy)
    monkeypatch.setitem(TASKS._targets, "toy-task", ToyTask)


def test_a_registered_method_is_listed_with_its_needs_label_and_settings(toys):
    text = catalogue(("methods",))
    line = next(line for line in text.splitlines() if line.split()[:1] == ["toy"])
    assert line.split(None, 1)[1] == "Toy decoding: an oracle guesses [needs a datastore (harness datastore build); lossless; lossy with mode=guess; steps=3]"
    assert text.startswith(f"methods ({len(METHODS.names())}):")
    verbose = catalogue(("methods",), verbose=True).splitlines()
    below = verbose[verbose.index(line) + 1 : verbose.index(line) + 3]
    assert [d.strip() for d in below] == ["steps=3", "mode=exact"]


def test_every_registered_method_says_what_it_is_needs_and_whether_lossless():
    for name in METHODS.names():
        entry = method_entry(name)
        assert entry.summary and entry.summary != "(no docstring)", name
        assert entry.facts[0].startswith("needs ") and entry.facts[1].startswith(("lossless", "lossy (by design)")), name
    assert method_entry("speculative").facts[:2] == ["needs a draft model", "lossless"]
    assert method_entry("medusa").facts[1] == "lossless; lossy with acceptance=typical"


def test_a_task_is_listed_with_its_size_and_splits(toys):
    entry = task_entry("toy-task")
    assert entry.summary == "Eight toy prompts in two languages"
    assert entry.facts == ["8 samples", "splits tune 2, report 6", "2 language labels: a, b"]


def test_a_task_without_data_says_what_it_needs():
    assert task_entry("jsonl").facts == ["no data here: the jsonl task needs a file: pass task.path=<file.jsonl>"]


def test_a_model_is_listed_with_its_size_and_what_pairs_with_it():
    facts = model_entry("zoo-target").facts
    assert facts[0].endswith("M parameters") and "draft zoo-draft" in facts
    assert any(f.startswith("pairs with ") and "medusa (heads zoo/target-medusa)" in f for f in facts)
    assert model_entry("random-tiny").facts[0] == "random weights (untrained)"


def test_list_kinds_and_a_bad_kind(capsys, toys):
    assert main(["list", "methods"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("methods (") and "tasks (" not in out and "    steps=3" in out
    assert main(["list", "widgets"]) == 2
    assert capsys.readouterr().err.strip() == "error: harness list widgets: list one of methods, tasks, models (or nothing for all)"
