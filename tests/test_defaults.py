"""One place for tuned defaults: each method's config default is the setting its table in
results/ measured fastest, and the Makefile passes a tuned setting only when the user sets one."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.paths import REPO_ROOT
from harness.publish import job_label, read_leaderboard
from harness.registry import METHODS


@dataclass
class Tuned:
    """A sweep table of results/ and the config fields its jobs vary."""

    table: str  # file under results/ (written by make tables-*)
    method: str  # the row's method (registry name)
    fields: dict[str, str]  # job label key (job_label) -> the method config's field


TUNED = [
    Tuned("speculative-gamma.md", "speculative", {"gamma": "gamma"}),
    Tuned("space-k.md", "space", {"k": "k"}),
    Tuned("medusa-trees.md", "medusa", {"tree": "tree"}),
    Tuned("lookahead-wng.md", "lookahead",
          {"window": "window", "ngram": "ngram", "candidates": "candidates", "context_pool": "context_pool"}),
    Tuned("eagle2-trees.md", "eagle2",
          {"depth": "depth", "top_k": "top_k", "total_tokens": "total_tokens", "stop_below": "stop_below"}),
    Tuned("speculative-tree.md", "speculative-tree", {"draft_tokens": "max_nodes"}),
]


def chosen(tuned: Tuned, results: Path = REPO_ROOT / "results") -> dict[str, str]:
    """The settings of the table's fastest job for the method: config field -> value as written."""
    rows = [r for r in read_leaderboard(results / tuned.table).rows if r["method"] == tuned.method]
    assert rows, f"{tuned.table} has no {tuned.method} rows"
    best = max(rows, key=lambda r: float(r["speedup"]))
    keys, values = job_label(best["run_dir"])
    return {tuned.fields[k]: v for k, v in zip(keys.split(", "), values.split(", "))}


def as_written(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@pytest.mark.parametrize("tuned", TUNED, ids=lambda t: t.table)
def test_the_config_default_is_the_tables_choice(tuned):
    cls = METHODS.get(tuned.method)
    default = cls.config_class(name=tuned.method)
    for name, value in chosen(tuned).items():
        assert as_written(getattr(default, name)) == value, (
            f"{tuned.method}.{name} defaults to {getattr(default, name)!r} but {tuned.table} chose {value}: "
            "set the config default to the table's choice"
        )


def test_chosen_reads_the_fastest_job(tmp_path):
    """The control: a table whose fastest job is another setting gives that setting."""
    rows = ["| method | task | run_dir | speedup |", "|---|---|---|---|",
            "| speculative | humaneval | method.speculative.gamma-1 | 0.90 |",
            "| speculative | humaneval | method.speculative.gamma-3 | 1.10 |"]  # fmt: skip
    (tmp_path / "t.md").write_text("model: x | device: y\n\n" + "\n".join(rows) + "\n")
    assert chosen(Tuned("t.md", "speculative", {"gamma": "gamma"}), tmp_path) == {"gamma": "3"}


def make_dry_run(*variables: str) -> str:
    out = subprocess.run(["make", "-n", "-C", str(REPO_ROOT), "bench", *variables],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return out.stdout


def test_make_bench_passes_tuned_settings_only_when_set():
    plain = make_dry_run()
    assert "harness run" in plain
    assert "method.speculative.gamma" not in plain and "method.space.k" not in plain
    assert "num_assistant_tokens" not in plain
    chosen_run = make_dry_run("GAMMA=3", "SPACE_K=2")
    assert "method.speculative.gamma=3" in chosen_run and "method.hf-assisted.num_assistant_tokens=3" in chosen_run
    assert "method.space.k=2" in chosen_run


def test_hf_assisted_drafts_as_many_tokens_as_speculative():
    assert METHODS.get("hf-assisted").config_class().num_assistant_tokens == METHODS.get("speculative").config_class().gamma
