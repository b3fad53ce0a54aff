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
    assert other.efficiency == pytest.approx(other.speedup / (tokens_per_step / 2.5))


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
    assert html.count("data:image/png;base64,") >= 2 and "float32" in html
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
