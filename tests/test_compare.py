"""harness compare: two runs of the synthetic run of test_detail, one of them edited."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_detail import synthetic_run

from harness.cli import main
from harness.compare import compare, judged
from harness.report import load_runs


def edited(src: Path, dst: Path, method: str, change) -> Path:
    shutil.copytree(src, dst)
    rows = [json.loads(line) for line in (dst / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        if r["method"] == method:
            change(r)
    (dst / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return dst


def slower(r: dict) -> None:
    """Twice the wall time and twice the time to the first token; the same tokens and steps."""
    r.update(wall_time_s=2 * r["wall_time_s"], first_token_s=2 * r["first_token_s"])


@pytest.fixture
def runs(tmp_path):
    a = synthetic_run(tmp_path / "a")
    b = edited(a, tmp_path / "b", "speculative", slower)
    return a, b


def verdicts(a: Path, b: Path) -> dict[tuple[str, str], str]:
    return {(f.method, f.figure): f.verdict for f in compare(load_runs([a]), load_runs([b]))}


def test_moved_figures_are_marked(runs):
    v = verdicts(*runs)
    # speedup: A's per-sample ratios 0.97, 0.92 -> interval [0.92, 0.97]; B halves both
    assert v["speculative", "speedup"] == "moved down"
    assert v["speculative", "TTFT, median"] == "moved up"  # [15, 17] ms -> [30, 34] ms
    assert v["speculative", "per-token latency, median"] == "moved up"
    assert v["speculative", "tokens per step"] == "same" and v["speculative", "exact match"] == "same"
    assert v["medusa", "speedup"] == "within intervals"  # the same records
    assert ("autoregressive", "speedup") not in v  # the reference's speedup is 1 by definition


def test_changed_acceptance_is_a_change(runs, tmp_path):
    a, _ = runs
    b = edited(a, tmp_path / "c", "medusa", lambda r: r.update(accepted_per_step=[1] * len(r["tokens"]),
                                                               target_forwards=len(r["tokens"])))  # fmt: skip
    assert verdicts(a, b)["medusa", "tokens per step"] == "changed"


def test_interval_rule():
    assert judged((1.0, 1.2), (1.3, 1.5), 1.1, 1.4) == "moved up"
    assert judged((1.0, 1.2), (1.1, 1.5), 1.1, 1.3) == "within intervals"
    assert judged((1.0, 1.2), (0.5, 0.9), 1.1, 0.7) == "moved down"


def test_cli_markdown_and_html(runs, tmp_path, capsys):
    a, b = runs
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "▼ moved down" in out and f"run A: {a}" in out
    page = tmp_path / "compare.html"
    assert main(["compare", str(a), str(b), "--format", "html", "--out", str(page)]) == 0
    assert "▼ moved down" in page.read_text() and "plotly-graph-div" in page.read_text()
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
    assert "is not a run directory" in capsys.readouterr().err
