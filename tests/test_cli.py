"""End to end through the command line: outputs, resume, kill -9, and every bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from harness.cli import main
from harness.detail import DETAIL_COLUMNS
from harness.results import SUMMARY_COLUMNS

PROMPTS = ["def add(a, b):", "for i in range", "class Foo:", "int main() {", "function f(x) {", "x = 1"]


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def base_args(model_dir, prompts, out, n=12) -> list[str]:
    return ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", str(n),
            "--out", str(out), "run.progress=false"]  # fmt: skip


def read_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_run_writes_all_outputs(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(model_dir, prompts, out) + ["--methods", "autoregressive,hf-generate"]) == 0
    printed = capsys.readouterr().out
    assert "| autoregressive" in printed and "| hf-generate" in printed
    for name in ("manifest.json", "samples.jsonl", "summary.csv", "summary.json", "leaderboard.md", "texts.jsonl"):
        assert (out / name).exists(), name
    records = read_records(out)
    assert len(records) == 2 * len(PROMPTS)
    assert all(r["status"] == "exact" for r in records)  # hf-generate agrees with the baseline
    # time to first token: from the generation's start to the end of the prompt's forward (the forward timer)
    assert all(r["prefill_time_s"] <= r["first_token_s"] <= r["wall_time_s"] for r in records)
    texts = [json.loads(line) for line in (out / "texts.jsonl").read_text().splitlines()]
    assert sorted(t["sample_id"] for t in texts) == sorted(f"p{i}" for i in range(len(PROMPTS)))
    reference = {r["sample_id"]: r for r in records if r["method"] == "autoregressive"}
    assert all(len(t["pieces"]) == len(reference[t["sample_id"]]["tokens"]) for t in texts)
    summary = pd.read_csv(out / "summary.csv")
    assert list(summary.columns) == SUMMARY_COLUMNS + DETAIL_COLUMNS
    ar = summary[summary.method == "autoregressive"].iloc[0]
    assert ar.speedup == 1.0 and ar.mean_accepted_tokens == 1.0 and ar.exact_match == 1.0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["dtype"] == "float32" and manifest["config"]["methods"] == ["autoregressive", "hf-generate"]
    assert {"torch", "transformers"} <= set(manifest["packages"]) and manifest["environment"]["threads"] >= 1


def test_reference_runs_even_when_not_requested(model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    assert main(base_args(model_dir, prompts, out) + ["--methods", "hf-generate", "--limit", "2"]) == 0
    assert sorted({r["method"] for r in read_records(out)}) == ["autoregressive", "hf-generate"]


def test_resume_skips_finished_pairs(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(model_dir, prompts, out) + ["--limit", "2"]) == 0
    assert len(read_records(out)) == 2
    capsys.readouterr()
    assert main(base_args(model_dir, prompts, out) + ["--limit", "4"]) == 0  # raising limit extends the run
    assert "2 of 4 (method, sample, turn) records already done" in capsys.readouterr().out
    assert [r["sample_id"] for r in read_records(out)] == ["p0", "p1", "p2", "p3"]


def test_reference_rotates_with_the_others_and_every_record_is_compared(model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    args = base_args(model_dir, prompts, out) + ["--methods", "hf-generate,prompt-lookup", "--limit", "4"]
    assert main(args) == 0
    records = read_records(out)
    methods = ["autoregressive", "hf-generate", "prompt-lookup"]
    for r in records:  # sample i runs the methods rotated by i, the reference included
        i = int(r["sample_id"][1:])
        assert r["run_order"] == (methods.index(r["method"]) - i) % 3
    assert [r["run_order"] for r in records if r["method"] == "autoregressive"] == [0, 2, 1, 0]
    # records that ran before the reference (p1: both, p2: prompt-lookup) were compared once it
    # existed (not-checked otherwise), and written after it
    assert all(r["status"] == "exact" for r in records)
    # transformers' generate is timed per forward too (hooks): a prefill, then one token a forward
    hf = [r for r in records if r["method"] == "hf-generate"]
    assert all(r["prefill_time_s"] > 0 and r["verify_tokens"] == len(r["tokens"]) - 1 for r in hf)
    for sample in ("p0", "p1", "p2", "p3"):
        assert [r["method"] for r in records if r["sample_id"] == sample][0] == "autoregressive"
    # resume where a sample's reference is missing: only it runs again, the others are kept
    lines = (out / "samples.jsonl").read_text().splitlines()
    dropped = [line for line in lines if '"sample_id": "p2"' in line and '"method": "autoregressive"' in line]
    assert len(dropped) == 1
    (out / "samples.jsonl").write_text("\n".join(line for line in lines if line not in dropped) + "\n")
    assert main(args) == 0
    again = read_records(out)
    assert len(again) == 12 and again[:-1] == [r for r in records if r["sample_id"] != "p2" or r["method"] != "autoregressive"]
    assert again[-1]["method"] == "autoregressive" and again[-1]["sample_id"] == "p2" and again[-1]["status"] == "exact"


def test_split_is_a_task_option_recorded_in_the_manifest(model_dir, prompts, tmp_path):
    out = tmp_path / "run"
    assert main(base_args(model_dir, prompts, out, n=4) + ["task.split=report", "--limit", "3"]) == 0
    assert [r["sample_id"] for r in read_records(out)] == ["p2", "p3", "p4"]  # p0, p1: the tuning quarter
    assert json.loads((out / "manifest.json").read_text())["config"]["task"]["split"] == "report"
    assert main(base_args(model_dir, prompts, out, n=4) + ["task.split=tune"]) == 2  # another config: refused


def test_refuses_other_config_unless_forced(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(model_dir, prompts, out, n=8) + ["--limit", "1"]) == 0
    assert main(base_args(model_dir, prompts, out, n=9) + ["--limit", "1"]) == 2
    assert "different config" in capsys.readouterr().err
    assert main(base_args(model_dir, prompts, out, n=9) + ["--limit", "1", "--force"]) == 0


def test_kill_9_loses_at_most_the_pair_in_flight(model_dir, tmp_path):
    prompts = tmp_path / "many.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": f"x = {i}"}) + "\n" for i in range(60)))
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "harness.cli"] + base_args(model_dir, prompts, out, n=48)
    cmd += ["--methods", "autoregressive,hf-generate"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    samples = out / "samples.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and (not samples.exists() or len(samples.read_text().splitlines()) < 5):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    survived = len(samples.read_text().splitlines())
    assert 5 <= survived < 120, "the run must be killed part-way"
    assert main(base_args(model_dir, prompts, out, n=48) + ["--methods", "autoregressive,hf-generate"]) == 0
    records = read_records(out)
    keys = [(r["method"], r["sample_id"]) for r in records]
    assert len(keys) == len(set(keys)) == 120
    assert all(r["status"] == "exact" for r in records)


def test_corrupt_line_is_named_and_can_be_moved_aside(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(base_args(model_dir, prompts, out) + ["--limit", "3"]) == 0
    lines = (out / "samples.jsonl").read_text().splitlines()
    lines[1] = lines[1][:20]  # a corrupt record in the middle
    (out / "samples.jsonl").write_text("\n".join(lines) + "\n")
    assert main(base_args(model_dir, prompts, out) + ["--limit", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2 is corrupt" in err and "--drop-corrupt" in err and len(err.splitlines()) == 1
    assert main(base_args(model_dir, prompts, out) + ["--limit", "3", "--drop-corrupt"]) == 0
    assert [r["sample_id"] for r in read_records(out)] == ["p0", "p2", "p1"]  # p1 re-run, the rest kept
    assert (out / "samples.corrupt.jsonl").exists()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--methods", "nope"], "unknown method 'nope'; valid methods: autoregressive"),
        (["--task", "nope"], "unknown task 'nope'; valid tasks:"),
        (["--max-new-tokens", "0"], "run.max_new_tokens=0 is not valid: must be >= 1"),
        (["--limit", "-3"], "--limit -3 (task.limit): a limit must be at least 1 sample"),  # not a slice from the end
        (["--limit", "0"], "--limit 0 (task.limit): a limit must be at least 1 sample"),
        (["task.limit=-1"], "--limit -1 (task.limit): a limit must be at least 1 sample"),
        (["no_such_key=1"], "bad config override"),
        (["task.no_such_field=1"], "bad config override"),
    ],
)
def test_bad_input_is_one_line(model_dir, prompts, tmp_path, capsys, extra, message):
    assert main(base_args(model_dir, prompts, tmp_path / "run") + extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_bad_model_is_one_line(prompts, tmp_path, capsys):
    assert main(base_args("nosuchmodel", prompts, tmp_path / "a")) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err
    assert main(base_args(tmp_path / "missing-dir", prompts, tmp_path / "b")) == 2
    err = capsys.readouterr().err.strip()
    assert f"model path '{tmp_path / 'missing-dir'}' does not exist" in err and len(err.splitlines()) == 1
    assert "zoo-target" in err and "random-tiny" in err and "repo id" not in err  # the presets, not the hub's rule


@pytest.mark.parametrize("override", ["model.draft=/no/such/dir", "method.speculative.draft=/no/such/dir"])
def test_missing_draft_path_is_named_with_the_presets(model_dir, prompts, tmp_path, capsys, override):
    args = base_args(model_dir, prompts, tmp_path / "run") + ["--methods", "speculative", "--limit", "1", override]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "model path '/no/such/dir' does not exist" in err and len(err.splitlines()) == 1
    assert "zoo-draft" in err and "Traceback" not in err


def test_prompt_longer_than_context(model_dir, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "big", "prompt": "x = 1\n" * 400}) + "\n")
    assert main(base_args(model_dir, long, tmp_path / "run")) == 2
    err = capsys.readouterr().err.strip()
    assert "sample big" in err and "exceeds the model's context of 512" in err


def test_too_long_prompts_dropped_on_request(model_dir, prompts, tmp_path, capsys):
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(prompts.read_text() + json.dumps({"id": "big", "prompt": "x = 1\n" * 400}) + "\n")
    out = tmp_path / "run"
    assert main(base_args(model_dir, mixed, out) + ["--methods", "prompt-lookup", "task.too_long=drop"]) == 0
    captured = capsys.readouterr()
    assert "dropped sample big" in captured.out + captured.err
    records = read_records(out)
    assert {r["sample_id"] for r in records} == {f"p{i}" for i in range(len(PROMPTS))}  # the rest all ran
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [(d["sample_id"], d["turn"], d["context"]) for d in dropped] == [("big", 0, 512)]
    assert dropped[0]["prompt_tokens"] > 500
    assert "dropped as longer than the context: 1 (big)" in (out / "leaderboard.md").read_text()
    assert main(["leaderboard", str(out), "--format", "json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "dropped as longer than the context: 1 (big)" in doc["header"] and doc["dropped"][0]["sample_id"] == "big"
    # resuming the finished run keeps one entry per dropped prompt
    assert main(base_args(model_dir, mixed, out) + ["--methods", "prompt-lookup", "task.too_long=drop"]) == 0
    assert len((out / "dropped.jsonl").read_text().splitlines()) == 1


def test_too_long_later_turn_dropped_with_the_turns_after_it(model_dir, tmp_path, capsys):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"id": "c", "turns": ["def f():", "x = 1\n" * 300, "and again"]}) + "\n"
                    + json.dumps({"id": "d", "prompt": "def g():"}) + "\n")
    out = tmp_path / "run"
    assert main(base_args(model_dir, chat, out) + ["--methods", "prompt-lookup", "task.too_long=drop"]) == 0
    assert "dropped sample c from turn 1" in "".join(capsys.readouterr())
    assert sorted((r["sample_id"], r["turn"]) for r in read_records(out)) == [("c", 0), ("c", 0), ("d", 0), ("d", 0)]
    dropped = [json.loads(line) for line in (out / "dropped.jsonl").read_text().splitlines()]
    assert [(d["sample_id"], d["turn"]) for d in dropped] == [("c", 1)]
    assert "dropped as longer than the context: 1 (c (turn 1))" in (out / "leaderboard.md").read_text()


def test_too_long_everything_dropped_or_bad_value_is_one_line(model_dir, tmp_path, capsys):
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"id": "big", "prompt": "x = 1\n" * 400}) + "\n")
    assert main(base_args(model_dir, long, tmp_path / "a") + ["task.too_long=drop"]) == 2
    err = capsys.readouterr().err.strip()
    assert "every one of the 1 prompts is longer" in err and len(err.splitlines()) == 1
    assert main(base_args(model_dir, long, tmp_path / "b") + ["task.too_long=skip"]) == 2
    err = capsys.readouterr().err.strip()
    assert "task.too_long='skip': use error" in err and len(err.splitlines()) == 1


def test_missing_data_is_one_line(model_dir, tmp_path, capsys):
    args = base_args(model_dir, tmp_path / "nope.jsonl", tmp_path / "run")
    assert main(args) == 2
    assert "nope.jsonl" in capsys.readouterr().err


def test_list_and_help(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "autoregressive" in out and "humaneval-x" in out and "random-tiny" in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "lossy (by design)" in lines["llm-to-slm"] and "lossy with mode=relaxed" in lines["nest"]
    assert "lossy with acceptance=typical" in lines["medusa"] and "lossy" not in lines["autoregressive"]
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "task.languages" in capsys.readouterr().out


def test_multirun_sweep_one_directory_per_job_and_resumes(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["run", "-m", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--limit", "2",
            "--max-new-tokens", "6", "--methods", "autoregressive,hf-generate", "--out", str(out),
            "run.progress=false", "run.seed=0,1", "run.warmup=0,1"]  # fmt: skip
    assert main(args) == 0
    jobs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert jobs == ["run.seed-0+run.warmup-0", "run.seed-0+run.warmup-1", "run.seed-1+run.warmup-0",
                    "run.seed-1+run.warmup-1"]  # fmt: skip
    assert all(len(read_records(out / j)) == 4 for j in jobs)
    assert "4 of 4 jobs done" in capsys.readouterr().out
    assert main(args) == 0  # a re-run resumes job by job
    assert capsys.readouterr().out.count("4 of 4 (method, sample, turn) records already done") == 4
    assert main(["leaderboard", *[str(out / j) for j in jobs], "--by", "run_dir", "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("hf-generate") == 4


def test_profile_reports_phases_and_forward_counts(model_dir, prompts, capsys):
    args = ["profile", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--limit", "2",
            "--max-new-tokens", "5", "--methods", "autoregressive"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    import re

    # autoregressive: one target forward per token (the prefill gives the first), whatever the timings
    tokens, forwards = re.search(r"2 samples, (\d+) tokens.*; (\d+) target forwards", out).groups()
    assert tokens == forwards and 2 <= int(tokens) <= 10
    assert "harness/engine.py" in out and "methods/autoregressive.py" in out
    assert main(["profile", "--model", str(model_dir), "--methods", "autoregressive,hf-generate"]) == 2
    assert "one method at a time" in capsys.readouterr().err


def test_profile_phases_writes_a_table_per_method(model_dir, prompts, tmp_path, capsys):
    """--phases: one row per method, step counts from the generations (autoregressive: one step
    per token after the first), the phases and the prompt's forward adding up to the wall time,
    the provenance header; a JSON path that is not .json is refused in one line."""
    import json

    out = tmp_path / "phases.json"
    args = ["profile", "--phases", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--limit", "2",
            "--max-new-tokens", "5", "--methods", "autoregressive,prompt-lookup", "--json", str(out)]  # fmt: skip
    assert main(args) == 0
    data = json.loads(out.read_text())
    assert [r["method"] for r in data["rows"]] == ["autoregressive", "prompt-lookup"]
    ar = data["rows"][0]
    assert ar["steps"] == ar["tokens"] - data["samples"] and ar["samples"] == 2
    assert ar["ms_per_step"]["draft"] == ar["ms_per_step"]["tree"] == 0.0
    for row in data["rows"]:
        total = sum(row["ms_per_step"].values()) + row["prefill_ms_per_step"]
        assert abs(total - row["wall_ms_per_step"]) < 1e-6 * max(1.0, row["wall_ms_per_step"])
    assert {"git", "device_name", "threads", "load_average_1min"} <= set(data)
    assert "| autoregressive" in capsys.readouterr().out
    assert main([*args[:-1], str(tmp_path / "phases.txt")]) == 2
    assert "name a .json file" in capsys.readouterr().err


def test_quiet_turns_the_progress_bar_off():
    from harness.cli import flag_overrides, run_parser

    assert "run.progress=false" in flag_overrides(run_parser().parse_args(["--quiet"]), [])
    assert "run.progress=false" not in flag_overrides(run_parser().parse_args([]), [])
