"""Each module on its floor: no import cycle, and no module imports a floor above its own or a
sibling beside it. Read statically (ast) from the source tree, every import counted, the ones
inside functions too, so a lazy import cannot hide a crossing."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT

PACKAGES = ("harness", "methods", "tasks")

# Floors, lowest first. A module may import its own group and any group on a lower floor; the
# groups of one floor (siblings) never import each other. A name covers that module; "x.*"
# covers package x and every module under it.
FLOORS: list[dict[str, tuple[str, ...]]] = [
    {"foundation": ("harness", "harness.errors", "harness.paths", "harness.config", "harness.registry",
                    "harness.models", "harness.stops", "harness.devices", "harness.repetition", "harness.progress")},
    {"engine": ("harness.kvcache", "harness.compiled", "harness.engine", "harness.drafters.*",
                         "harness.lossless")},
    {"tasks and sandbox": ("tasks.*", "harness.sandbox.*")},
    {
        "methods": ("methods.*", "harness.datastore", "harness.neighbours"),
        "training": ("harness.train.*", "harness.zoo.*"),
        "results": ("harness.detail", "harness.results", "harness.report", "harness.page", "harness.leaderboard",
                    "harness.compare", "harness.gate", "harness.publish", "harness.browser"),
    },
    {"runner": ("harness.runner", "harness.profile", "harness.heldout", "harness.serving.*", "harness.engines", "harness.sweep",
                "harness.hydra_setup")},
    {"command line": ("harness.cli", "harness.cli_train", "harness.cli_zoo", "harness.cli_datastore",
                      "harness.catalogue")},
]  # fmt: skip


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``PACKAGES`` under ``root``."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(root: Path) -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in the file)."""
    known = modules(root)

    def owner(name: str) -> str | None:  # the module that ``name`` (a module or a module's attribute) lives in
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
                targets.add(base)
                targets.update(f"{base}.{a.name}" for a in node.names)
        graph[name] = {m for t in targets if (m := owner(t)) and m != name}
    return graph


def place(module: str) -> tuple[int, str] | None:
    """(floor, group) of ``module``, or None when no group names it."""
    for floor, groups in enumerate(FLOORS):
        for group, names in groups.items():
            for name in names:
                package = name.removesuffix(".*")
                if module == package or (name.endswith(".*") and module.startswith(package + ".")):
                    return floor, group
    return None


def crossings(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher floor or of a sibling group, and modules on no floor."""
    found = []
    for module, targets in sorted(graph.items()):
        here = place(module)
        if here is None:
            found.append(f"{module} is on no floor: add it to FLOORS in tests/test_layers.py")
            continue
        for target in sorted(targets):
            there = place(target)
            if there is not None and (there[0] > here[0] or (there[0] == here[0] and there[1] != here[1])):
                found.append(f"{module} ({here[1]}) imports {target} ({there[1]})")
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import cycles: strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(imports(REPO_ROOT)) == []


def test_no_module_imports_upward_or_sideways():
    assert crossings(imports(REPO_ROOT)) == []


def test_methods_reach_neither_the_runner_nor_training():
    graph = imports(REPO_ROOT)
    reached, todo = set(), [m for m in graph if m == "methods" or m.startswith("methods.")]
    while todo:
        for target in graph[todo.pop()] - reached:
            reached.add(target)
            todo.append(target)
    assert not {m for m in reached if m.startswith(("harness.runner", "harness.train", "harness.zoo", "harness.cli"))}


@pytest.fixture
def tree(tmp_path):
    """A small source tree: a method importing the stop rules, the runner importing the method."""

    def write(module: str, text: str = "") -> None:
        path = tmp_path / (module.replace(".", "/") + ".py")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    for package in PACKAGES:
        write(f"{package}.__init__")
    write("harness.stops")
    write("methods.toy", "from harness.stops import Committer\n")
    write("harness.runner", "import methods.toy\n")
    return tmp_path, write


def test_the_checks_see_an_upward_import_a_sibling_and_a_cycle(tree):
    """The controls: each check fails on a tree that has what it looks for."""
    root, write = tree
    assert crossings(imports(root)) == [] and cycles(imports(root)) == []
    write("methods.toy", "def f():\n    from harness.runner import run  # a lazy import counts too\n")
    assert crossings(imports(root)) == ["methods.toy (methods) imports harness.runner (runner)"]
    assert cycles(imports(root)) == [["harness.runner", "methods.toy"]]
    write("methods.toy", "from harness.train.lm import x\n")
    write("harness.train.__init__")
    write("harness.train.lm")
    assert crossings(imports(root)) == ["methods.toy (methods) imports harness.train.lm (training)"]
    write("methods.toy", "from ..harness import stops\n")  # relative imports resolve too
    write("tasks.fresh", "from . import base\n")
    write("harness.newcomer")
    assert crossings(imports(root)) == ["harness.newcomer is on no floor: add it to FLOORS in tests/test_layers.py"]
