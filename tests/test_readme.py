"""Every figure the README's tables quote comes from a published file in results/ (issue 13 part 4)."""

from __future__ import annotations

import re
import shutil

import pytest

from harness.cli import main
from harness.paths import REPO_ROOT
from harness.publish import BEGIN, BLOCKS, END, PublishError, job_label, render_readme, two_decimals
from harness.report import load_runs, metrics

README = REPO_ROOT / "README.md"
RESULTS = REPO_ROOT / "results"


def outside_blocks(text: str) -> str:
    """The README without its generated blocks and code blocks."""
    text = re.sub(r"<!-- results-table: [\w-]+ -->.*?<!-- /results-table -->", "", text, flags=re.S)
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_readme_tables_equal_the_results_files():
    text = README.read_text()
    names = BEGIN.findall(text)
    assert {"leaderboard", "medusa-trees", "space-k"} <= set(names)
    assert text.count(END) == len(names)
    assert render_readme(text, RESULTS) == text, "README result tables differ from results/*.md: run `make readme`"


def test_no_measured_figure_in_a_readme_table_outside_the_generated_blocks():
    """A table row with a decimal figure (a speedup, a rate) may only sit in a generated block."""
    rows = [line for line in outside_blocks(README.read_text()).splitlines() if line.startswith("|")]
    quoted = [line for line in rows if re.search(r"\d\.\d", line)]
    assert not quoted, f"hand-written figures in README tables: {quoted}"


def test_a_block_follows_its_file(tmp_path):
    """Edit one figure of a copy of results/: the rendered README changes in exactly that cell."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    text = README.read_text()
    board = results / "leaderboard.md"
    lines = board.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.startswith("| prompt-lookup"))
    cells = lines[row].split("|")
    column = [c.strip() for c in lines[next(i for i, line in enumerate(lines) if line.startswith("| method"))]
              .split("|")].index("speedup")  # fmt: skip
    cells[column] = " 7.125 "
    lines[row] = "|".join(cells)
    board.write_text("\n".join(lines) + "\n")
    new = render_readme(text, results)
    assert new != text
    changed = [line for line in new.splitlines() if line.startswith("| prompt-lookup")]
    # two blocks read leaderboard.md (the results table and the eager column of the modes table)
    assert len(changed) == 2 and all("| 7.13 [" in line for line in changed)  # half up, two decimals
    board.unlink()
    with pytest.raises(PublishError, match="leaderboard.md is missing"):
        render_readme(text, results)


def test_blocks_carry_the_repetition_column_and_the_commit_of_a_fresh_leaderboard(model_dir, tmp_path):
    """End to end: a run, its leaderboard written as results/ would hold it, the README block."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"x{i} = "}) + "\n" for i in range(3)))
    run = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "8",
                 "--methods", "autoregressive,hf-generate", "--out", str(run), "run.progress=false"]) == 0  # fmt: skip
    results = tmp_path / "results"
    for name in ("leaderboard.md", "leaderboard-space.md"):
        assert main(["leaderboard", str(run), "--out", str(results / name)]) == 0
    table = metrics(load_runs([run])).set_index("method")
    block = render_readme("<!-- results-table: leaderboard -->\n<!-- /results-table -->\n", results)
    row = next(line for line in block.splitlines() if line.startswith("| hf-generate"))
    cells = [c.strip() for c in row.split("|")]
    assert cells[-3] == two_decimals(f"{table.loc['hf-generate', 'repetition']:.3f}")
    assert cells[-2] == table.loc["hf-generate", "stop_reasons"]
    assert "commit: " in block and " tree)" in block  # the commit and the tree's state of the source


def test_unknown_or_unclosed_block_is_refused():
    with pytest.raises(PublishError, match="unknown"):
        render_readme("<!-- results-table: nope -->\n<!-- /results-table -->\n", RESULTS)
    with pytest.raises(PublishError, match="no closing"):
        render_readme("<!-- results-table: leaderboard -->\n", RESULTS)
    assert set(BLOCKS) >= {"leaderboard", "medusa-trees", "space-k"}


def test_cells_and_job_labels():
    assert [two_decimals(c) for c in ("0.845", "1.824", "nan", None, "12")] == ["0.85", "1.82", "-", "-", "12.00"]
    assert job_label("method.medusa.tree-chain") == ("tree", "chain")
    assert job_label("method.space.k-1+run.seed-0") == ("k, seed", "1, 0")
