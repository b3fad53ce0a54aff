"""Leaderboards, plots and the regression gate, on runs made here with a tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.cli import main
from harness.gate import check, load_baseline, make_baseline, save_baseline
from harness.report import bootstrap_interval, load_runs, metrics, paired_speedups
from harness.results import RunDirError


def make_run(model_dir, tmp_path, name, n=10, limit=4) -> Path:
    prompts = tmp_path / "prompts.jsonl"
    if not prompts.exists():
        lines = [{"id": f"p{i}", "prompt": f"def f{i}(x):", "language": ["py", "js"][i % 2]} for i in range(6)]
        prompts.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / name
    args = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", str(n),
            "--limit", str(limit), "--out", str(out), "--methods", "autoregressive,hf-generate", "run.progress=false"]  # fmt: skip
    assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def run_dir(model_dir, tmp_path_factory) -> Path:
    return make_run(model_dir, tmp_path_factory.mktemp("runs"), "base")


def edit_records(src: Path, dst: Path, method: str, change) -> Path:
    shutil.copytree(src, dst)
    lines = []
    for line in (dst / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["method"] == method:
            change(r)
        lines.append(json.dumps(r))
    (dst / "samples.jsonl").write_text("\n".join(lines) + "\n")
    return dst


def test_metrics_columns_and_reference_row(run_dir):
    table = metrics(load_runs([run_dir]))
    ar = table[table.method == "autoregressive"].iloc[0]
    assert ar.speedup == pytest.approx(1.0) and ar.efficiency == pytest.approx(1.0)
    assert ar.mean_accepted_tokens == 1.0 and ar.exact_match == 1.0 and ar.samples == 4
    assert ar.latency_p90_s >= ar.latency_p50_s > 0 and ar.prefill_ms > 0
    hf = table[table.method == "hf-generate"].iloc[0]
    assert hf.speedup_low <= hf.speedup <= hf.speedup_high


def test_step_cost_and_efficiency_by_hand(run_dir, tmp_path):
    """1-token steps of 10 ms for the reference; the other method: 3 steps of 25 ms each."""

    def plain(r):
        r.update(prefill_time_s=0.005, forward_time_s=0.005 + (r["target_forwards"] - 1) * 0.010)

    def three_steps(r):
        r.update(prefill_time_s=0.005, target_forwards=4, forward_time_s=0.005 + 3 * 0.025)

    edited = edit_records(run_dir, tmp_path / "ar", "autoregressive", plain)
    edited = edit_records(edited, tmp_path / "both", "hf-generate", three_steps)
    runs = load_runs([edited])
    table = metrics(runs)
    ar, other = (table[table.method == m].iloc[0] for m in ("autoregressive", "hf-generate"))
    assert ar.step_cost == pytest.approx(1.0)
    assert other.step_cost == pytest.approx(2.5)
    records = runs.records
    tokens_per_step = (records[records.method == "hf-generate"].tokens.map(len) - 1).sum() / (3 * other.samples)
    ref = records[records.method == "autoregressive"]
    prompt, decode = 0.005 * len(ref), float((ref.target_forwards - 1).sum()) * 0.010  # the reference's forwards
    whole = (prompt + decode) / (prompt + decode / (tokens_per_step / 2.5))  # the prompt's forward is not sped up
    assert other.efficiency == pytest.approx(other.speedup / whole)


def test_paired_speedup_and_interval_by_hand():
    import pandas as pd

    pairs = pd.DataFrame({"tokens": [10, 10], "wall": [1.0, 1.0], "tokens_ref": [10, 10], "wall_ref": [2.0, 2.0]})
    assert bootstrap_interval(pairs) == (pytest.approx(2.0), pytest.approx(2.0))


def test_leaderboard_formats_and_plots(run_dir, tmp_path, capsys):
    for fmt in ("markdown", "csv", "json"):
        assert main(["leaderboard", str(run_dir), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert "hf-generate" in out
    report = tmp_path / "report.html"
    plots = tmp_path / "plots"
    assert main(["leaderboard", str(run_dir), "--format", "html", "--out", str(report), "--plots", str(plots),
                 "--by", "language"]) == 0  # fmt: skip
    html = report.read_text()
    assert html.count('class="plotly-graph-div"') >= 2 and "float32" in html and "<script src=" not in html
    assert {"speedup.png", "accepted_vs_speedup.png", "speedup_by_language.png"} <= {p.name for p in plots.iterdir()}


def test_merge_refuses_different_settings(model_dir, run_dir, tmp_path, capsys):
    other = make_run(model_dir, tmp_path, "other", n=6)
    assert main(["leaderboard", str(run_dir), str(other)]) == 2
    assert "runs differ in max_new_tokens" in capsys.readouterr().err
    assert main(["leaderboard", str(run_dir), str(other), "--allow-mixed"]) == 0
    with pytest.raises(RunDirError):
        load_runs([tmp_path])  # not a run directory


def test_gate_passes_on_unchanged_run(run_dir, tmp_path, capsys):
    base = tmp_path / "base.json"
    assert main(["baseline", str(run_dir), "--out", str(base)]) == 0
    capsys.readouterr()
    assert main(["check", str(run_dir), "--baseline", str(base)]) == 0
    assert "check passed" in capsys.readouterr().out


@pytest.mark.parametrize(
    "figure, change",
    [
        ("exact_match", lambda r: r.update(status="mismatch", first_diff=0, margin=3.0)),
        ("mean_accepted_tokens", lambda r: r.update(target_forwards=max(1, r["target_forwards"] // 2))),
        ("tokens_hash", lambda r: r.update(tokens=r["tokens"][:-1] + [(r["tokens"][-1] + 1) % 300])),
        ("speedup", lambda r: r.update(wall_time_s=r["wall_time_s"] * 3)),
    ],
)
def test_gate_fails_on_each_planted_regression(run_dir, tmp_path, figure, change):
    baseline = make_baseline([str(run_dir)])
    save_baseline(baseline, tmp_path / "b.json")
    bad = edit_records(run_dir, tmp_path / "bad", "hf-generate", change)
    verdict = check([str(bad)], load_baseline(tmp_path / "b.json"))
    assert not verdict.ok
    assert figure in set(verdict.problems.figure)


def test_speedup_not_compared_across_machines(run_dir, tmp_path):
    baseline = make_baseline([str(run_dir)])
    baseline.machine = {"device_name": "some other CPU", "threads": 64}
    slow = edit_records(run_dir, tmp_path / "slow", "hf-generate", lambda r: r.update(wall_time_s=r["wall_time_s"] * 3))
    verdict = check([str(slow)], baseline)
    assert verdict.ok and "speedups not compared" in verdict.notes[0]


def test_paired_speedups_pair_within_a_run(run_dir):
    runs = load_runs([run_dir, run_dir])  # the same directory twice: pairs must not cross runs
    assert len(paired_speedups(runs.records, "hf-generate", "jsonl")) == 8


def test_execute_reports_pass_at_1(model_dir, tmp_path):
    """run.execute=true judges completions in the sandbox: a method that writes the
    canonical solution passes, the random model's text does not."""
    from harness.config import MethodConfig
    from harness.registry import METHODS
    from methods.base import Generation, Method
    from tasks.humaneval import HumanEval, HumanEvalConfig

    solutions = {s.turns[0]: s.meta["canonical_solution"] for s in HumanEval(HumanEvalConfig(limit=2)).samples()}

    class Oracle(Method):
        config_class = MethodConfig

        def generate(self, prompt_ids, stop, seed=0):
            prompt = self.engine.tokenizer.decode(prompt_ids, skip_special_tokens=True)
            return Generation(tokens=self.engine.tokenizer(solutions[prompt], add_special_tokens=False).input_ids,
                              target_forwards=1)  # fmt: skip

    METHODS.add("oracle-solution", Oracle)
    out = tmp_path / "exec"
    args = ["run", "--model", str(model_dir), "--task", "humaneval", "--limit", "2", "--max-new-tokens", "8",
            "--methods", "oracle-solution", "--out", str(out), "run.progress=false", "run.execute=true"]  # fmt: skip
    from harness.sandbox import isolation

    expected = isolation().level  # full where bubblewrap works (CI); else accepted as weak, and marked so
    if expected != "full":
        args.append("run.execute_isolation=weak")
    try:
        assert main(args) == 0
    finally:
        METHODS._targets.pop("oracle-solution")
    table = metrics(load_runs([out])).set_index("method")
    assert table.loc["oracle-solution", "pass@1"] == 1.0
    assert table.loc["autoregressive", "pass@1"] == 0.0
    import pandas as pd

    summary = pd.read_csv(out / "summary.csv").set_index("method")
    assert summary.loc["oracle-solution", "pass@1"] == 1.0
    # the denominators and the isolation level, in every output
    level = json.loads((out / "manifest.json").read_text())["execution_isolation"]["level"]
    assert level == expected and {json.loads(line)["isolation"] for line in (out / "execution.jsonl").open()} == {level}
    row = summary.loc["oracle-solution"]
    assert (row["pass@1_judged"], row["pass@1_skipped"], row["pass@1_isolation"]) == (2, 0, level)
    label = "1.000 (2 judged, 0 skipped)" + ("" if level == "full" else ", WEAK isolation")
    assert f"| {label} |" in (out / "leaderboard.md").read_text()


def test_execute_below_full_isolation_refuses_unless_accepted(model_dir, tmp_path, monkeypatch, capsys):
    """On a machine without full sandbox isolation, run.execute=true stops before generating
    anything with one line saying what is missing; run.execute_isolation=weak runs, marked weak."""
    import dataclasses

    from harness.sandbox import isolation, jail

    weak = dataclasses.replace(isolation(), bwrap=None, seccomp=False)
    monkeypatch.setattr(jail, "_iso_cache", weak)
    args = ["run", "--model", str(model_dir), "--task", "humaneval", "--limit", "1", "--max-new-tokens", "4",
            "run.progress=false", "run.execute=true"]  # fmt: skip
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "refused")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bubblewrap" in err and "run.execute_isolation=weak" in err, err
    assert not (tmp_path / "refused" / "samples.jsonl").exists()

    out = tmp_path / "weak"
    assert main([*args, "--out", str(out), "run.execute_isolation=weak"]) == 0
    assert json.loads((out / "manifest.json").read_text())["execution_isolation"]["level"] == "weak"
    assert "WEAK isolation" in (out / "leaderboard.md").read_text()
    capsys.readouterr()
    assert main(["leaderboard", str(out)]) == 0
    assert "(1 judged, 0 skipped), WEAK isolation" in capsys.readouterr().out


def test_a_sandbox_that_does_not_start_stops_the_run_keeping_the_generations(model_dir, tmp_path, monkeypatch, capsys):
    """When the sandbox itself fails to start a program, its "error" is not the completion's
    verdict: the run says so in one line and exits 2 instead of publishing pass@1 = 0, and the
    generations stay (a rerun with the same --out resumes)."""
    import harness.sandbox as sandbox

    def not_starting(samples_by_id, records, **kwargs):
        return [{"method": r.method, "task": r.task, "sample_id": r.sample_id, "language": "python", "status": "error",
                 "detail": f"{sandbox.SETUP_FAILED}: bwrap: execvp /x/.venv/bin/python: No such file or directory",
                 "seconds": 0.0, "isolation": "weak"} for r in records]  # fmt: skip

    monkeypatch.setattr(sandbox, "score_records", not_starting)
    out = tmp_path / "broken"
    args = ["run", "--model", str(model_dir), "--task", "humaneval", "--limit", "1", "--max-new-tokens", "4",
            "--out", str(out), "run.progress=false", "run.execute=true", "run.execute_isolation=weak"]  # fmt: skip
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the sandbox did not start for 1 of 1 completions" in err and "--out" in err, err
    assert len((out / "samples.jsonl").read_text().splitlines()) == 1
    assert not (out / "leaderboard.md").exists()


def test_two_shards_merged_equal_the_unsharded_run(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"s{i}", "prompt": f"x{i} = "}) + "\n" for i in range(5)))

    def run(out, *extra):
        args = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "10",
                "--methods", "autoregressive,hf-generate", "--out", str(tmp_path / out), "run.progress=false", *extra]  # fmt: skip
        assert main(args) == 0
        return tmp_path / out

    whole = run("whole")
    shards = [run(f"shard{i}", f"task.shard={i}", "task.num_shards=2") for i in range(2)]
    sizes = [len((s / "samples.jsonl").read_text().splitlines()) for s in shards]
    assert sizes == [6, 4]  # samples 0,2,4 and 1,3: disjoint, deterministic
    cols = ["method", "task", "samples", "exact_match", "mean_accepted_tokens", "target_forwards", "tokens_hash"]
    merged = metrics(load_runs(shards))[cols].sort_values("method").reset_index(drop=True)
    single = metrics(load_runs([whole]))[cols].sort_values("method").reset_index(drop=True)
    assert merged.equals(single)
    capsys.readouterr()
    assert main(["leaderboard", str(shards[0])]) == 2
    assert "shard(s) 1 of 2 missing" in capsys.readouterr().err
    other = run("other-shard1", "task.shard=1", "task.num_shards=2", "run.seed=5")
    assert main(["leaderboard", str(shards[0]), str(other)]) == 2
    assert "different configurations" in capsys.readouterr().err


# ---- repetition ----------------------------------------------------------
@pytest.mark.parametrize(
    "prompt, output, share",
    [
        ([1, 2, 3], [4, 5, 6, 7], 0.0),  # nothing repeats
        ([9], [1, 2, 3, 4, 1, 2, 3, 4, 1, 2], 0.6),  # a loop: the second pass onward is covered
        ([1, 2, 3, 4, 5], [1, 2, 3, 4], 1.0),  # a verbatim copy of the prompt
        ([1, 2, 3, 4, 7, 1, 2, 3], [4, 8], 0.5),  # a repeat that starts in the prompt covers only its output part
        ([], [5, 5, 5, 5, 5], 0.8),  # overlapping occurrences count
        ([], [1, 2, 3, 9, 1, 2, 3, 8], 0.0),  # a repeated 3-gram is not a 4-gram
        ([1, 2, 3], [], None),  # no output, nothing to measure
    ],
)
def test_repetition_share_by_hand(prompt, output, share):
    from harness.repetition import repetition_share

    assert repetition_share(prompt, output) == share


def test_repetition_column_in_summary_and_every_format(run_dir, capsys):
    import html

    import pandas as pd

    from harness.report import REPETITION_NOTE

    records = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert all(0.0 <= r["repetition"] <= 1.0 for r in records)
    summary = pd.read_csv(run_dir / "summary.csv").set_index("method")
    for method in ("autoregressive", "hf-generate"):
        mine = [r["repetition"] for r in records if r["method"] == method]
        assert summary.loc[method, "repetition"] == pytest.approx(sum(mine) / len(mine))
    assert "repetition" in (run_dir / "leaderboard.md").read_text()
    for fmt in ("markdown", "html", "csv", "json"):
        assert main(["leaderboard", str(run_dir), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert "repetition" in out
        if fmt in ("markdown", "html"):
            assert REPETITION_NOTE in html.unescape(out)  # the legend line
    table = json.loads((main(["leaderboard", str(run_dir), "--format", "json"]), capsys.readouterr().out)[1])
    hf = next(r for r in table["rows"] if r["method"] == "hf-generate")
    assert hf["repetition"] == pytest.approx(summary.loc["hf-generate", "repetition"])


# ---- provenance (part 4) --------------------------------------------------------------------
def with_git(src: Path, dst: Path, git: dict) -> Path:
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["git"] = git
    (dst / "manifest.json").write_text(json.dumps(manifest))
    return dst


@pytest.mark.parametrize("dirty, tree", [(False, "clean"), (True, "DIRTY"), (None, "unknown")])
def test_every_format_shows_commit_and_tree(run_dir, tmp_path, capsys, dirty, tree):
    import io

    import pandas as pd

    run = with_git(run_dir, tmp_path / "run", {"commit": "abcdef0123456789", "dirty": dirty})
    shown = {}
    for fmt in ("markdown", "html", "csv", "json"):
        assert main(["leaderboard", str(run), "--format", fmt]) == 0
        shown[fmt] = capsys.readouterr().out
    for fmt in ("markdown", "html"):
        assert f"commit: abcdef0123 ({tree} tree)" in shown[fmt]
        assert (f"{tree} tree: these figures cannot be reproduced" in shown[fmt]) == (tree != "clean")
    assert shown["markdown"].startswith("# Leaderboard\n" if tree == "clean" else f"# Leaderboard ({tree} tree")
    csv = pd.read_csv(io.StringIO(shown["csv"]))
    assert set(csv.commit) == {"abcdef0123"} and set(csv.tree) == {tree}
    assert json.loads(shown["json"])["provenance"] == {"commit": "abcdef0123", "tree": tree}


def test_run_directory_leaderboard_shows_commit(run_dir):
    from harness.results import commit_of

    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert {"commit", "dirty"} <= set(manifest["git"])
    assert f"commit: {commit_of(manifest)}" in (run_dir / "leaderboard.md").read_text()


def git_repo(path: Path) -> Path:
    import subprocess

    path.mkdir()
    (path / "code.py").write_text("x = 1\n")
    (path / "results").mkdir()
    (path / "results" / "table.md").write_text("| a |\n")
    for cmd in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c"]):
        subprocess.run(["git", *cmd], cwd=path, check=True, capture_output=True)
    return path


def test_git_commit_dirty_flag_and_the_clean_tree_guard(tmp_path):
    from harness.publish import PublishError, clean_tree
    from harness.results import git_commit

    repo = git_repo(tmp_path / "repo")
    assert git_commit(repo)["dirty"] is False and len(git_commit(repo)["commit"]) == 40
    assert clean_tree(allow_dirty=False, root=repo) == ""
    (repo / "results" / "table.md").write_text("| b |\n")  # a published output: not dirty
    (repo / "README.md").write_text("quoted figures\n")
    assert git_commit(repo)["dirty"] is False and clean_tree(False, repo) == ""
    (repo / "code.py").write_text("x = 2\n")  # code: dirty
    assert git_commit(repo)["dirty"] is True
    with pytest.raises(PublishError, match=r"uncommitted changes \(code.py\).*ALLOW_DIRTY=1"):
        clean_tree(allow_dirty=False, root=repo)
    assert "marked DIRTY" in clean_tree(allow_dirty=True, root=repo)
    (repo / "code.py").write_text("x = 1\n")
    (repo / "new.py").write_text("")  # an untracked file is dirty too
    assert git_commit(repo)["dirty"] is True
    assert git_commit(tmp_path) == {"commit": None, "dirty": None}  # not a repository: unknown, not clean


def test_make_leaderboard_and_tables_check_the_tree_first_and_write_the_readme_last():
    import subprocess

    from harness.paths import REPO_ROOT

    for target in ("leaderboard", "tables"):
        done = subprocess.run(["make", "-n", target], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
        lines = [line for line in done.stdout.splitlines() if "harness" in line]
        guard = next(i for i, line in enumerate(lines) if "harness.publish clean-tree" in line)
        first_work = next(i for i, line in enumerate(lines) if "harness run" in line or "harness leaderboard" in line)
        assert guard < first_work, target
        assert "harness.publish readme" in lines[-1], target


@pytest.mark.parametrize("mode", ["eager", "compiled"])
def test_make_bench_overrides_only_benched_methods_and_compiled_mode_leaves_out_eager_only_ones(mode):
    """`make bench MODE=...` must start: an override of a method not in the run, or a method that
    refuses model.compile=true (llm-to-slm, the hf-* wrappers) in a compiled run, fails it at once."""
    import re
    import subprocess

    from harness.paths import REPO_ROOT

    done = subprocess.run(["make", "-n", "bench", f"MODE={mode}"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    runs = [line for line in done.stdout.splitlines() if "harness run" in line]
    assert len(runs) == 3  # the zoo target's methods, then SPACE and COrAL each on its own fine-tune
    for line in runs:
        methods = set(re.search(r"--methods (\S+)", line).group(1).split(","))
        overridden = set(re.findall(r"method\.([a-z0-9-]+)\.", line))
        assert overridden <= methods, (overridden - methods, line)
        assert ("model.compile=true" in line) == (mode == "compiled")
        if mode == "compiled":
            assert not methods & {"llm-to-slm", "hf-assisted", "hf-prompt-lookup"}, line
    first = set(re.search(r"--methods (\S+)", runs[0]).group(1).split(","))
    assert {"speculative", "medusa", "eagle2", "eagle3", "swift"} <= first  # eagle3 and swift run compiled too


# ---- the gate cannot be fooled (part 5) ----------------------------------------------------------
def only_p0(change):
    return lambda r: change(r) if r["sample_id"] == "p0" else None


@pytest.mark.parametrize(
    "rule, change, failing",
    [
        ("any mismatch", only_p0(lambda r: r.update(status="mismatch", first_diff=0, margin=3.0)), {"mismatches"}),
        ("exact-match NaN", lambda r: r.update(status="not-checked"), {"exact_match"}),
        ("lossless label changed", lambda r: r.update(lossy=True), {"lossless"}),
        ("fewer checked records", only_p0(lambda r: r.update(status="not-checked")), {"checked"}),
        ("NaN speedup", lambda r: r.update(wall_time_s=0.0), {"speedup"}),
    ],
)
def test_gate_rule_fails_on_edited_records(run_dir, tmp_path, rule, change, failing):
    baseline = make_baseline([str(run_dir)])
    assert check([str(run_dir)], baseline).ok  # unedited: passes
    bad = edit_records(run_dir, tmp_path / "bad", "hf-generate", change)
    verdict = check([str(bad)], baseline)
    assert not verdict.ok, rule
    assert failing <= set(verdict.problems.figure), (rule, verdict.problems)
    if "NaN" in rule:
        rows = verdict.problems[verdict.problems.figure.isin(failing)]
        assert set(rows.verdict) == {"FAIL (NaN)"}


def test_fewer_checked_records_is_the_only_failure_it_causes(run_dir, tmp_path):
    """The rule stands on its own: exact-match (3 of 3), the label and the counts still pass."""
    bad = edit_records(run_dir, tmp_path / "bad", "hf-generate", only_p0(lambda r: r.update(status="not-checked")))
    verdict = check([str(bad)], make_baseline([str(run_dir)]))
    assert set(verdict.problems.figure) == {"checked"}


def test_gate_fails_on_a_changed_label_or_nan_in_the_baseline(run_dir):
    baseline = make_baseline([str(run_dir)])
    row = next(r for r in baseline.rows if r["method"] == "hf-generate")
    row["lossless"] = "not checked"
    verdict = check([str(run_dir)], baseline)
    assert set(verdict.problems.figure) == {"lossless"}
    row["lossless"], row["speedup"] = "checked", float("nan")
    verdict = check([str(run_dir)], baseline)
    assert set(verdict.problems.figure) == {"speedup"} and set(verdict.problems.verdict) == {"FAIL (NaN)"}


def test_gate_reads_baselines_written_before_checked_was_stored(run_dir, tmp_path):
    baseline = make_baseline([str(run_dir)])
    save_baseline(baseline, tmp_path / "b.json")
    data = json.loads((tmp_path / "b.json").read_text())
    for row in data["rows"]:
        del row["checked"], row["mismatches"]
    (tmp_path / "b.json").write_text(json.dumps(data))
    assert check([str(run_dir)], load_baseline(tmp_path / "b.json")).ok
    fewer = edit_records(run_dir, tmp_path / "fewer", "hf-generate", only_p0(lambda r: r.update(status="not-checked")))
    assert set(check([str(fewer)], load_baseline(tmp_path / "b.json")).problems.figure) == {"checked"}


# ---- read-only stays read-only (part 7) -------------------------------------------------------
def test_torn_last_line_is_left_as_it_is_by_every_reader(run_dir, tmp_path, capsys):
    from harness.results import RunDir

    run = tmp_path / "torn"
    shutil.copytree(run_dir, run)
    samples = run / "samples.jsonl"
    whole = samples.read_text()
    samples.write_text(whole + whole.splitlines()[0][:40])  # a run killed mid-write
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    base = tmp_path / "base.json"
    assert main(["leaderboard", str(run)]) == 0
    assert "skipped the torn last line" in capsys.readouterr().err
    assert main(["leaderboard", str(run), "--format", "html", "--out", str(tmp_path / "r.html")]) == 0
    assert main(["baseline", str(run), "--out", str(base)]) == 0
    assert main(["check", str(run), "--baseline", str(base)]) == 0
    assert "skipped the torn last line" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # byte for byte, nothing added
    records, notices = RunDir(run).records(repair=True)  # what `harness run` does before appending
    assert len(records) == len(whole.splitlines()) and samples.read_text() == whole
    assert (run / "samples.corrupt.jsonl").read_text() == whole.splitlines()[0][:40] + "\n"


# ---- stop reasons in every table -----------------------------------------


def test_stop_reasons_counted_by_kind():
    import pandas as pd

    from harness.report import stop_reasons

    g = pd.DataFrame({"stop_reason": ["eos", "stop:\ndef", "stop:\n#", "max_new_tokens", "max_new_tokens"]})
    assert stop_reasons(g) == "eos 1, stop 2, max 2"
    assert stop_reasons(pd.DataFrame({"stop_reason": ["max_new_tokens"]})) == "max 1"


def test_stop_reasons_column_in_summary_and_leaderboard(run_dir, capsys):
    records = [json.loads(x) for x in (run_dir / "samples.jsonl").read_text().splitlines()]
    import pandas as pd

    summary = pd.read_csv(run_dir / "summary.csv").set_index("method")
    for method in ("autoregressive", "hf-generate"):
        ends = [r["stop_reason"] for r in records if r["method"] == method]
        expected = ", ".join(
            f"{k} {n}"
            for k, n in (
                ("eos", ends.count("eos")),
                ("stop", sum(e.startswith("stop:") for e in ends)),
                ("max", ends.count("max_new_tokens")),
            )
            if n
        )
        assert summary.loc[method, "stop_reasons"] == expected
    assert "stop_reasons" in (run_dir / "leaderboard.md").read_text()
    assert main(["leaderboard", str(run_dir)]) == 0
    assert "stop_reasons" in capsys.readouterr().out
