"""One meaning per word. ``decode`` is the tokenizer's (ids to text), never a generation step;
"execution" is the sandbox's (running generated code for pass@1), never how forwards ran (the
manifest's ``forward_mode``, shown as ``forwards: eager|compiled``) nor the engine; a method's
``loop`` always ends in a ``LoopEnd``. Runs stored before the renames still load and pass the gate."""

from __future__ import annotations

import ast
import json
import re
import shutil
from pathlib import Path

import pytest
from test_report import make_run

from harness.cli import main
from harness.gate import check, load_baseline, make_baseline
from harness.leaderboard import run_leaderboard
from harness.paths import REPO_ROOT
from harness.report import OLD_FORWARD_MODE_KEY, forward_mode, load_runs, metrics

SOURCES = [p for d in ("harness", "methods", "tasks") for p in sorted((REPO_ROOT / d).rglob("*.py"))]


def functions(path: Path):
    return [n for n in ast.walk(ast.parse(path.read_text(), str(path))) if isinstance(n, ast.FunctionDef)]


def test_a_function_named_decode_turns_ids_or_bytes_into_text():
    found = {f"{p.relative_to(REPO_ROOT)}:{f.name}": ast.unparse(f.returns) if f.returns else None
             for p in SOURCES for f in functions(p) if "decode" in f.name.split("_")}  # fmt: skip
    assert found, "no decode function found: the check would pass vacuously"
    wrong = {where: returns for where, returns in found.items() if returns is None or "str" not in returns}
    assert not wrong, f"these decode functions do not return text (name a generation step generate/step/loop): {wrong}"


def test_every_method_loop_ends_in_a_loop_end():
    loops = {f"{p.name}:{f.lineno}": ast.unparse(f.returns) if f.returns else None
             for p in sorted((REPO_ROOT / "methods").glob("*.py")) for f in functions(p) if f.name == "loop"}  # fmt: skip
    assert len(loops) >= 10
    assert {returns for returns in loops.values()} == {"LoopEnd"}, loops


def test_execution_is_the_sandboxs_word_only():
    text = {p: p.read_text() for p in [*SOURCES, *(REPO_ROOT / "docs").rglob("*.md"), REPO_ROOT / "README.md"]}
    layer = [str(p.relative_to(REPO_ROOT)) for p, t in text.items() if re.search(r"execution layer", t, re.I)]
    assert not layer, f"'execution layer' is the engine (harness/engine.py): {layer}"
    runner = (REPO_ROOT / "harness" / "runner.py").read_text()
    assert '"forward_mode": forward_mode_record(engine)' in runner and '"execution":' not in runner


def test_forward_mode_reads_new_and_old_manifests():
    assert forward_mode({"forward_mode": {"mode": "compiled"}}) == "compiled"
    assert forward_mode({OLD_FORWARD_MODE_KEY: {"mode": "compiled"}}) == "compiled"  # a run stored before the rename
    assert forward_mode({}) == "eager"  # before the compiled mode existed
    head = run_leaderboard(metrics_stub(), {OLD_FORWARD_MODE_KEY: {"mode": "compiled"}})
    assert "| forwards: compiled |" in head and "execution" not in head


def metrics_stub():
    import pandas as pd

    columns = ["method", "task", "samples", "exact_match", "mean_accepted_tokens", "tokens_per_s", "speedup", "ties",
               "mismatches", "lossless", "repetition", "stop_reasons"]  # fmt: skip
    return pd.DataFrame([dict.fromkeys(columns, 0)])


@pytest.fixture(scope="module")
def runs(model_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A run as written now, and the same run as stored before the rename (``execution`` in its manifest)."""
    root = tmp_path_factory.mktemp("words")
    new = make_run(model_dir, root, "new", n=6, limit=2)
    old = root / "old"
    shutil.copytree(new, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest["forward_mode"] == {"mode": "eager"} and OLD_FORWARD_MODE_KEY not in manifest
    manifest[OLD_FORWARD_MODE_KEY] = manifest.pop("forward_mode")
    (old / "manifest.json").write_text(json.dumps(manifest))
    return new, old


def test_runs_stored_before_the_rename_load_merge_and_pass_the_gate(runs, tmp_path, capsys):
    new, old = runs
    assert len(metrics(load_runs([new, old], one_shard=False))) > 0  # the same forward mode: they merge
    baseline = tmp_path / "base.json"
    assert main(["baseline", str(new), "--out", str(baseline)]) == 0
    assert main(["check", str(old), "--baseline", str(baseline)]) == 0
    assert "check passed" in capsys.readouterr().out
    assert check([str(old)], load_baseline(baseline)).ok
    assert make_baseline([str(old)]).header == make_baseline([str(new)]).header


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO_ROOT / "results" / "baselines").glob("*.json")))
def test_the_shipped_baselines_still_load(name):
    assert load_baseline(REPO_ROOT / "results" / "baselines" / name).rows
