"""Sweeps on Hydra's launcher plugins (joblib, a local Ray cluster, submitit's local
executor), the missing-extra error, and one GPU per job."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
from test_progress import Terminal

from harness import sweep
from harness.cli import main
from harness.devices import claim_device

PROMPTS = ["def add(a, b):", "for i in range", "class Foo:"]


@pytest.fixture()
def prompts(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def need_extra(module: str, extra: str) -> None:
    """Skip where the extra is not installed, except under ``make test`` (CI), where it fails."""
    import importlib.util

    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # its parent package (hydra_plugins) is missing too
        found = False
    if not found:
        message = f"extra '{extra}' not installed (pip install -e '.[{extra}]')"
        if os.environ.get("HARNESS_REQUIRE_EXTRAS"):
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture
def launchable(monkeypatch):
    """A launcher hands Hydra's singletons (the ConfigStore, with every registered method's config)
    to its worker processes: methods that tests registered (the conformance toys) must import there
    too, so the workers see the tests directory as pytest does."""
    tests = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))


def sweep_args(model_dir, prompts, out, *extra) -> list[str]:
    return ["run", "-m", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens",
            "8", "--out", str(out), "run.progress=false", "run.threads=1", "methods=[hf-generate],[prompt-lookup]",
            *extra]  # fmt: skip


def job_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir() and not p.name.startswith("."))


def check_two_method_sweep(out: Path, capsys) -> list[dict]:
    """Two jobs, one per method, each with the AR reference and exact outputs; the merged
    leaderboard lists both methods. Returns the jobs' manifests."""
    jobs = job_dirs(out)
    assert [j.name for j in jobs] == ["methods-[hf-generate]", "methods-[prompt-lookup]"]
    manifests = []
    for job in jobs:
        records = [json.loads(x) for x in (job / "samples.jsonl").read_text().splitlines()]
        assert len(records) == 2 * len(PROMPTS)  # reference + the job's method
        assert {r["status"] for r in records} == {"exact"}
        manifests.append(json.loads((job / "manifest.json").read_text()))
    capsys.readouterr()
    assert main(["leaderboard", *map(str, jobs), "--by", "run_dir", "--format", "csv"]) == 0
    table = capsys.readouterr().out
    assert "hf-generate" in table and "prompt-lookup" in table
    return manifests


def test_joblib_launcher_runs_jobs_in_parallel_processes(model_dir, prompts, tmp_path, capsys, launchable):
    need_extra("hydra_plugins.hydra_joblib_launcher", "joblib")
    out = tmp_path / "sweep"
    args = sweep_args(model_dir, prompts, out, "--launcher", "joblib", "hydra.launcher.n_jobs=2")
    assert main(args) == 0
    assert "2 of 2 jobs done" in capsys.readouterr().out
    manifests = check_two_method_sweep(out, capsys)
    pids = {m["environment"]["pid"] for m in manifests}
    assert os.getpid() not in pids  # the jobs ran in joblib's worker processes
    before = {j.name: (j / "samples.jsonl").read_text() for j in job_dirs(out)}
    assert main(args) == 0  # a re-run resumes job by job: nothing left to do, nothing rewritten
    assert {j.name: (j / "samples.jsonl").read_text() for j in job_dirs(out)} == before


def test_ray_launcher_on_a_local_two_worker_cluster(model_dir, prompts, tmp_path, capsys, launchable):
    need_extra("hydra_plugins.hydra_ray_launcher", "ray")
    out = tmp_path / "sweep"
    args = sweep_args(model_dir, prompts, out, "--launcher", "ray", "+hydra.launcher.ray.init.num_cpus=2",
                      "+hydra.launcher.ray.init.include_dashboard=false", "+hydra.launcher.ray.remote.num_cpus=1")
    try:
        assert main(args) == 0
    finally:
        import ray

        ray.shutdown()
    assert "2 of 2 jobs done" in capsys.readouterr().out
    manifests = check_two_method_sweep(out, capsys)
    assert os.getpid() not in {m["environment"]["pid"] for m in manifests}  # ran in Ray workers


def test_submitit_local_executor_runs_a_job(model_dir, prompts, tmp_path, capsys, launchable):
    need_extra("hydra_plugins.hydra_submitit_launcher", "submitit")
    out = tmp_path / "sweep"
    args = sweep_args(model_dir, prompts, out, "--launcher", "submitit_local", "hydra.launcher.timeout_min=10")
    assert main(args) == 0
    assert "2 of 2 jobs done" in capsys.readouterr().out
    manifests = check_two_method_sweep(out, capsys)
    assert os.getpid() not in {m["environment"]["pid"] for m in manifests}  # submitit's own processes
    assert (out / ".submitit").is_dir()


def test_missing_launcher_extra_is_one_clear_line(model_dir, prompts, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sweep.LAUNCHERS, "joblib", ("hydra_plugins.not_installed_launcher", "joblib"))
    assert main(sweep_args(model_dir, prompts, tmp_path / "s", "--launcher", "joblib")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install" in err[0] and "[joblib]" in err[0]
    assert not (tmp_path / "s").exists()
    assert main(sweep_args(model_dir, prompts, tmp_path / "s", "--launcher", "condor")) == 2
    assert "unknown launcher 'condor'" in capsys.readouterr().err


def test_failed_job_is_reported_and_the_others_finish(model_dir, prompts, tmp_path, capsys, monkeypatch):
    terminal = Terminal()  # the sweep's bar draws on a terminal only
    monkeypatch.setattr(sys, "stderr", terminal)
    monkeypatch.delenv("CI", raising=False)
    out = tmp_path / "sweep"
    args = sweep_args(model_dir, prompts, out, "run.max_new_tokens=8,-3")
    assert main(args) == 2
    assert "2 of 4 jobs done" in capsys.readouterr().out
    failed = [j for j in job_dirs(out) if (j / sweep.ERROR_FILE).exists()]
    assert len(failed) == 2 and all("max_new_tokens--3" in j.name for j in failed)
    err = terminal.getvalue()
    assert err.count("error: job ") == 2
    # the bar counted the 4 jobs ahead; its summary gives each job's time, the failed ones with their reason
    summary = err.rsplit("sweep: ", 1)[1].splitlines()
    assert summary[0].startswith("4 of 4 done in ")
    assert sorted(line.split(":")[0] for line in summary[1:5]) == sorted(j.name for j in job_dirs(out))
    assert sum("(failed: " in line and "max_new_tokens" in line for line in summary[1:5]) == 2


def test_each_parallel_job_holds_its_own_gpu(tmp_path):
    with claim_device("auto", count=2, locks=tmp_path) as first:
        with claim_device("auto", count=2, locks=tmp_path) as second:
            assert {first, second} == {"cuda:0", "cuda:1"}
        with claim_device("auto", count=2, locks=tmp_path) as third:
            assert third == second  # released by the job that ended, not the one still running
    with claim_device("auto", count=2, locks=tmp_path) as again:
        assert again == "cuda:0"
    with claim_device("cpu", count=2, locks=tmp_path) as cpu, claim_device("auto", count=1, locks=tmp_path) as one:
        assert (cpu, one) == ("cpu", "auto")


def test_model_sweep_mixes_presets_and_paths(model_dir, prompts, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["run", "-m", "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "4", "--out", str(out),
            "run.progress=false", "--methods", "hf-generate", f"model=random-tiny,{model_dir}"]  # fmt: skip
    assert main(args) == 0
    assert "2 of 2 jobs done" in capsys.readouterr().out
    paths = sorted(json.loads((j / "manifest.json").read_text())["model"]["path"] for j in job_dirs(out))
    assert paths == sorted([str(model_dir), "zoo/random-tiny"])
    assert main(args[:-1] + ["model=random-tiny,no-such-model"]) == 2
    assert "unknown model 'no-such-model' in the sweep" in capsys.readouterr().err
