"""The README and docs/: every figure their tables quote comes from a published file in results/,
the README fits a screen, and what it tells a newcomer to run does run."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess

import pytest

from harness.cli import main
from harness.paths import REPO_ROOT
from harness.publish import BEGIN, BLOCKS, END, LEADERBOARDS, PublishError, documents, job_label, render_readme, two_decimals
from harness.report import load_runs, metrics

README = REPO_ROOT / "README.md"
RESULTS = REPO_ROOT / "results"


def outside_blocks(text: str) -> str:
    """The README without its generated blocks and code blocks."""
    text = re.sub(r"<!-- results-table: [\w-]+ -->.*?<!-- /results-table -->", "", text, flags=re.S)
    return re.sub(r"```.*?```", "", text, flags=re.S)


def test_readme_and_docs_tables_equal_the_results_files():
    names = set()
    for path in documents():
        text = path.read_text()
        found = BEGIN.findall(text)
        assert text.count(END) == len(found), path
        assert render_readme(text, RESULTS) == text, f"{path.name}'s result tables differ from results/*.md: run `make readme`"
        names |= set(found)
    assert "headline" in BEGIN.findall(README.read_text())
    assert {"leaderboard", "medusa-trees", "space-k", "modes"} <= names


def test_no_measured_figure_in_a_table_outside_the_generated_blocks():
    """A table row with a decimal figure (a speedup, a rate) may only sit in a generated block."""
    for path in documents():
        rows = [line for line in outside_blocks(path.read_text()).splitlines() if line.startswith("|")]
        quoted = [line for line in rows if re.search(r"\d\.\d", line)]
        assert not quoted, f"hand-written figures in {path.name}'s tables: {quoted}"


def test_readme_fits_a_screen_and_links_only_what_exists():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and all((REPO_ROOT / link).exists() for link in links), links
    assert not re.search(r"\bissue \d+", text, flags=re.I)  # no tracker history in the front door


def test_a_block_follows_its_file(tmp_path):
    """Edit one figure of a copy of results/: the rendered README changes in exactly that cell."""
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    text = "".join(path.read_text() for path in documents())
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
    changed = [line for line in new.splitlines() if line.startswith("| prompt-lookup") and "7.13" in line]
    # three blocks read leaderboard.md (the README's excerpt, the results table, the eager column of the modes table)
    assert len(changed) == 3 and all("| 7.13 [" in line for line in changed)  # half up, two decimals
    board.unlink()
    with pytest.raises(PublishError, match="leaderboard.md is missing"):
        render_readme(text, results)


def test_phase_blocks_follow_their_files(tmp_path):
    """docs/performance.md's per-phase tables: one figure edited in a copy of the stored profile
    changes that cell only; the header names the commit and the tree; a missing file is refused."""
    import json

    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    text = (REPO_ROOT / "docs" / "performance.md").read_text()
    assert {"profile-phases", "profile-phases-before"} <= set(BEGIN.findall(text))
    path = results / "profile-phases.json"
    data = json.loads(path.read_text())
    data["rows"][0]["ms_per_step"]["verify"] = 123.456
    path.write_text(json.dumps(data))
    new = render_readme(text, results)
    changed = [line for line in new.splitlines() if line.startswith(f"| {data['rows'][0]['method']} ") and "| 123.46 |" in line]
    assert len(changed) == 1 and "(clean tree)" in new
    path.unlink()
    with pytest.raises(PublishError, match="profile-phases.json is missing"):
        render_readme(text, results)


def test_the_readme_phase_table_sets_before_beside_after(tmp_path):
    """The README's per-phase block: each cell is ``before -> after`` from the two stored profiles;
    a method profiled only after shows ``-`` before; both commits are named."""
    import json

    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    assert "phases" in BEGIN.findall(README.read_text())
    after = results / "profile-phases.json"
    data = json.loads(after.read_text())
    row = data["rows"][0]
    row["ms_per_step"]["tree"] = 9.87
    data["rows"].append({**row, "method": "only-after"})
    after.write_text(json.dumps(data))
    before = json.loads((results / "profile-phases-before.json").read_text())
    old_tree = next(r for r in before["rows"] if r["method"] == row["method"])["ms_per_step"]["tree"]
    new = render_readme(README.read_text(), results)
    line = next(x for x in new.splitlines() if x.startswith(f"| {row['method']} |"))
    assert line.split(" | ")[4] == f"{old_tree:.2f} → 9.87"  # method, tokens, draft, verify, tree
    added = next(x for x in new.splitlines() if x.startswith("| only-after |"))
    assert added.split(" | ")[2].startswith("- → ")
    assert new.count("(clean tree)") >= 2 and "Before: `results/profile-phases-before.json`" in new
    # an older commit's profile names the mode `execution` (make profile-phases-before runs that commit's code)
    for key, mode in (("forward_mode", "compiled"), ("execution", "compiled")):
        old = {k: v for k, v in before.items() if k not in ("forward_mode", "execution")} | {key: mode}
        (results / "profile-phases-before.json").write_text(json.dumps(old))
        first = render_readme(README.read_text(), results).split("Before: ", 1)[1].splitlines()[0]
        assert ", compiled, " in first, (key, first)
    (results / "profile-phases-before.json").unlink()
    with pytest.raises(PublishError, match="profile-phases-before.json is missing"):
        render_readme(README.read_text(), results)


def test_blocks_carry_the_repetition_column_and_the_commit_of_a_fresh_leaderboard(model_dir, tmp_path):
    """End to end: a run, its leaderboard written as results/ would hold it, the README block."""
    import json

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"x{i} = "}) + "\n" for i in range(3)))
    run = tmp_path / "run"
    assert main(["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "8",
                 "--methods", "autoregressive,hf-generate", "--out", str(run), "run.progress=false"]) == 0  # fmt: skip
    results = tmp_path / "results"
    for name in LEADERBOARDS:  # every per-model leaderboard the README reads
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


def readme_code(language: str) -> list[str]:
    """The README's fenced code blocks in ``language``."""
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_method_example_is_a_working_lossless_method(model_dir, tmp_path):
    """The "Adding a method" block, executed as written, then run and checked by the harness."""
    from harness.registry import METHODS

    (block,) = readme_code("python")
    namespace: dict = {}
    try:
        exec(compile(block, "README.md", "exec"), namespace)  # registers "repeat-last"
        out = tmp_path / "run"
        assert main(["run", "--model", str(model_dir), "--task", "humaneval", "--limit", "2", "--max-new-tokens", "12",
                     "--methods", "autoregressive,repeat-last", "--out", str(out), "run.progress=false"]) == 0  # fmt: skip
        records = [r for r in map(__import__("json").loads, (out / "samples.jsonl").read_text().splitlines())
                   if r["method"] == "repeat-last"]  # fmt: skip
        assert len(records) == 2 and all(r["status"] == "exact" for r in records)
    finally:
        METHODS.remove("repeat-last")


# The README's commands as a test runs them: a hub id or a placeholder path becomes a tiny local
# model, a GPU setting its CPU twin, and every run is cut to one sample of a few tokens.
SUBSTITUTE = {"model.device=cuda": "model.device=cpu", "model.dtype=bfloat16": "model.dtype=float32"}
PLACEHOLDER_MODELS = ("Qwen/Qwen2.5-1.5B", "Qwen/Qwen2.5-0.5B", "/path/to/local/model")


def readme_commands() -> list[list[str]]:
    commands = []
    for block in readme_code("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split("#", 1)[0].strip()
            if line:
                commands.append(shlex.split(line))
    return commands


def test_every_readme_command_runs(model_dir, tmp_path):
    """`harness ...` lines run in-process (small); `make ...` lines must name real targets (`make -n`):
    CI runs `make test` itself and `scripts/ci_bench.sh` runs the benchmark `make bench` runs."""
    commands = readme_commands()
    assert any(c[0] == "harness" for c in commands) and any(c[0] == "make" for c in commands)
    for command in commands:
        if command[0] == "make":
            dry = subprocess.run(["make", "-n", *command[1:]], cwd=REPO_ROOT, capture_output=True, text=True)
            assert dry.returncode == 0, f"{shlex.join(command)}: {dry.stderr}"
            continue
        assert command[0] == "harness", f"README command not covered by this test: {shlex.join(command)}"
        args = []
        for arg in command[1:]:
            arg = SUBSTITUTE.get(arg, arg)
            key, _, value = arg.rpartition("=")
            arg = (f"{key}=" if key else "") + str(model_dir) if value in PLACEHOLDER_MODELS else arg
            if arg.startswith("results/runs/") or arg.endswith(".html"):
                arg = str(tmp_path / arg.replace("/", "_"))
            args.append(arg)
        if args[0] == "run":
            if "--limit" in args:
                args[args.index("--limit") + 1] = "1"
            args += ["--max-new-tokens", "4", "run.progress=false"]
        assert main(args) == 0, shlex.join(command)


def test_a_leaderboards_lossy_section_is_not_read_as_its_ranked_table(tmp_path):
    """A leaderboard with a "Lossy methods" section (other columns) publishes its first table only."""
    from harness.publish import read_leaderboard

    board = tmp_path / "leaderboard.md"
    board.write_text("# Leaderboard\n\nmodel: m | commit: c (clean tree)\n\n| method | speedup |\n|---|---|\n"
                     "| autoregressive | 1.000 |\n| suffix | 1.400 |\n\n## Lossy methods\n\n"
                     "| method | mean_accepted_tokens | speedup |\n|---|---|---|\n| llm-to-slm (lossy) | 66.000 | 3.3 |\n")
    assert [(r["method"], r["speedup"]) for r in read_leaderboard(board).rows] == [("autoregressive", "1.000"), ("suffix", "1.400")]
