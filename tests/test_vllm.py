"""run.engine=vllm: the parts that need no vLLM (method mapping, records, process control, refusals)
here; the ones that start vLLM engines are marked ``vllm`` (make test-vllm)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from harness.cli import concurrency_list, main
from harness.config import RunSettings, SamplingConfig
from harness.paths import REPO_ROOT
from harness.registry import METHODS, MODELS
from harness.runner import Experiment
from harness.serving.vllm_methods import vllm_method
from harness.serving.vllm_process import VllmError, VllmWorker, WorkerSettings, vllm_python
from harness.serving.vllm_rounds import BASELINE, METHOD, latest_rounds, paired_rounds, round_speedup
from harness.serving.vllm_run import Prompt, check_rounds, to_record
from harness.stops import StopRule, StopStrings
from tasks.base import Sample

VLLM_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"


def config(name: str, **fields):
    cfg = METHODS.get(name).config_class(name=name)
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def test_each_method_maps_to_vllms_own_with_the_harness_settings(tmp_path):
    target = MODELS.get("zoo-target")
    spec = {n: vllm_method(n, config(n), target, 3, tmp_path).speculative_config
            for n in ("autoregressive", "speculative", "prompt-lookup", "eagle3", "medusa", "suffix")}  # fmt: skip
    assert spec["autoregressive"] is None
    gamma = config("speculative").gamma  # the harness's own setting, whatever the tables chose
    assert spec["speculative"] == {"model": str((REPO_ROOT / "zoo/draft").resolve()), "num_speculative_tokens": gamma}
    assert spec["prompt-lookup"] == {"method": "ngram", "num_speculative_tokens": 10, "prompt_lookup_max": 3,
                                     "prompt_lookup_min": 1}  # fmt: skip
    assert spec["eagle3"]["method"] == "eagle3" and spec["eagle3"]["num_speculative_tokens"] == 3
    assert spec["medusa"] == {"method": "medusa", "model": str((REPO_ROOT / "zoo/target-medusa").resolve()),
                              "num_speculative_tokens": 3}  # fmt: skip
    assert spec["suffix"]["suffix_decoding_max_tree_depth"] == 24 and spec["suffix"]["num_speculative_tokens"] == 16
    gamma = vllm_method("speculative", config("speculative", gamma=1), target, 3, tmp_path)
    assert gamma.speculative_config["num_speculative_tokens"] == 1


def test_what_vllm_has_no_counterpart_for_is_refused_in_one_line(tmp_path):
    target = MODELS.get("zoo-target")
    with pytest.raises(VllmError, match="lookahead has no vLLM counterpart"):
        vllm_method("lookahead", config("lookahead"), target, 3, tmp_path)
    with pytest.raises(VllmError, match="schedule=heuristic has no counterpart"):
        vllm_method("speculative", config("speculative", schedule="heuristic"), target, 3, tmp_path)


def test_the_eagle1_head_is_exported_with_the_target_hidden_state_it_was_trained_on(tmp_path):
    head = Path(vllm_method("eagle", config("eagle"), MODELS.get("zoo-target"), 3, tmp_path).speculative_config["model"])
    exported = json.loads((head / "config.json").read_text())
    assert exported["bias"] is False and exported["attention_bias"] is True
    with safe_open(head / "model.safetensors", "pt") as f:
        weights = {k: f.get_tensor(k) for k in f.keys()}
    with safe_open(REPO_ROOT / "zoo/target-eagle/model.safetensors", "pt") as f:
        stored = {k: f.get_tensor(k).float() for k in f.keys()}
    assert "fc.bias" not in weights and torch.equal(weights["layers.0.self_attn.o_proj.bias"], stored["fc.bias"])
    # the same function: layer 0's q of fc's output with the bias = the exported q without it + q's bias
    x = torch.randn(5, 2 * 192)
    q = stored["layers.0.self_attn.q_proj.weight"]
    ours = (x @ stored["fc.weight"].T + stored["fc.bias"]) @ q.T
    theirs = (x @ weights["fc.weight"].T) @ weights["layers.0.self_attn.q_proj.weight"].T + weights["layers.0.self_attn.q_proj.bias"]
    assert torch.allclose(ours, theirs, atol=1e-4)


def test_a_vllm_request_goes_through_the_harness_commit_path(engine, tokenizer):
    """A stop string inside a multi-token step cuts the record there; steps and tokens per step follow."""
    ids = tokenizer("return a + b\n", add_special_tokens=False).input_ids
    strings = StopStrings(["\n"], lambda t: tokenizer.decode(t, skip_special_tokens=True))
    reference = type("R", (), {"model": "tiny", "tokens": ids, "text": ""})()
    prompt = Prompt(Sample(id="s", turns=["x"]), [0, 5], StopRule(64, frozenset({1}), strings), ["\n"], reference)
    # vLLM's steps: the prefill's token, a step of 3 (2 accepted + 1), then a step past the newline
    chunks = [1, 3, len(ids) - 4 + 2]
    result = {"tokens": ids + [7, 8], "chunks": chunks, "arrivals": [0.5, 0.7, 0.9], "submitted": 0.1,
              "finish_reason": "stop"}  # fmt: skip
    spec = {"drafts": 2, "accepted_per_position": [1, 1], "draft_tokens": 4, "accepted_tokens": 2}
    exp = Experiment(model=MODELS.get("random-tiny"), task=type("T", (), {"name": "jsonl"})(), methods={},
                     run=RunSettings(), sampling=SamplingConfig(), config={})  # fmt: skip
    record = to_record(exp, engine, "speculative", prompt, result, 4, spec)
    assert record.tokens == ids and record.stop_reason == "stop:\n"
    assert record.target_forwards == 3 and record.accepted_per_step == [1, 3, len(ids) - 4]
    assert record.proposed_per_position == [2, 2] and record.accepted_per_position == [1, 1]
    assert record.engine == "vllm" and record.extra["concurrency"] == 4
    assert record.extra["ttft_s"] == pytest.approx(0.4) and record.wall_time_s == pytest.approx(0.8)
    assert record.extra["itl_s"] == pytest.approx([0.2, 0.2])


def test_concurrency_is_a_list_not_a_sweep():
    assert concurrency_list("run.concurrency=1,4,16") == "run.concurrency=[1,4,16]"
    assert concurrency_list("run.concurrency=[1,4]") == "run.concurrency=[1,4]"
    assert concurrency_list("run.concurrency=4") == "run.concurrency=[4]"
    assert concurrency_list("method.speculative.gamma=1,2") == "method.speculative.gamma=1,2"


def test_a_missing_vllm_is_one_line_naming_make_vllm(tmp_path, capsys):
    with pytest.raises(VllmError, match="run `make vllm`"):
        vllm_python(str(tmp_path / "none" / "bin" / "python"))
    code = main(["run", "--engine", "vllm", "--methods", "prompt-lookup", "--limit", "1", "--max-new-tokens", "4",
                 "--out", str(tmp_path / "r"), f"vllm.python={tmp_path}/none/bin/python"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "make vllm" in err[0]
    assert not (tmp_path / "r").exists()  # refused before any work


def test_a_vllm_run_without_a_method_to_time_is_refused_in_one_line(tmp_path, capsys):
    code = main(["run", "--engine", "vllm", "--limit", "1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--methods autoregressive,prompt-lookup" in err[0]
    assert not (tmp_path / "r").exists()


def test_an_unknown_engine_is_refused(tmp_path, capsys):
    code = main(["run", "--engine", "tgi", "--limit", "1", "--out", str(tmp_path / "r")])
    assert code == 2 and "must be harness or vllm (--engine)" in capsys.readouterr().err


def test_the_worker_group_is_stopped_even_when_it_ignores_quit(tmp_path):
    """close() signals the whole process group: a grandchild that ignores SIGTERM is killed too."""
    fake = fake_worker_python(tmp_path / "python")
    worker = VllmWorker(WorkerSettings(fake, tmp_path / "log", 1, 1, timeout_s=1))
    time.sleep(0.5)
    assert worker.alive()
    started = time.monotonic()
    worker.close()
    assert not worker.alive() and time.monotonic() - started < 40


class StubWorker:
    """A worker that answers each batch with the next of its makespans, noting the order of the calls."""

    def __init__(self, side: str, makespans: list[float], calls: list[str], results: list[dict] | None = None):
        self.side, self.makespans, self.calls, self.results = side, list(makespans), calls, results or []

    def request(self, message: dict) -> dict:
        self.calls.append(self.side)
        return {"wall_s": self.makespans.pop(0), "results": self.results, "spec": {"drafts": 0}}


def test_paired_rounds_alternate_the_order_and_pair_the_makespans_of_one_round():
    calls: list[str] = []
    baseline = StubWorker(BASELINE, [2.0, 3.0, 4.0, 5.0], calls)
    method = StubWorker(METHOD, [1.0, 1.5, 2.5, 2.0], calls)
    rounds = paired_rounds(lambda i: baseline.request({}), lambda i: method.request({}), 4)
    assert calls == ["baseline", "method", "method", "baseline", "baseline", "method", "method", "baseline"]
    assert [r.order for r in rounds] == [(BASELINE, METHOD), (METHOD, BASELINE)] * 2
    assert [(r.baseline["wall_s"], r.method["wall_s"]) for r in rounds] == [(2.0, 1.0), (3.0, 1.5), (4.0, 2.5),
                                                                             (5.0, 2.0)]  # fmt: skip


def row(round_: int, makespan: float, baseline: float, tokens: int = 100, method: str = "speculative") -> dict:
    return {"method": method, "concurrency": 4, "round": round_, "makespan_s": makespan, "tokens": tokens,
            "baseline_makespan_s": baseline, "baseline_tokens": 100}  # fmt: skip


def test_the_speedup_is_the_ratio_of_the_paired_rounds_with_an_interval_over_rounds():
    sp = round_speedup([row(0, 1.0, 2.0), row(1, 2.0, 2.0), row(2, 1.0, 4.0)])
    assert sp.speedup == pytest.approx((300 / 4.0) / (300 / 8.0)) and sp.rounds == 3
    assert sp.tokens_per_s == pytest.approx(75.0) and sp.baseline_tokens_per_s == pytest.approx(37.5)
    assert 1.0 <= sp.low <= sp.speedup <= sp.high <= 4.0 and sp.low < sp.high
    one = round_speedup([row(0, 1.0, 3.0)])
    assert one.speedup == pytest.approx(3.0) and one.low != one.low  # a single round: no interval
    # a resumed run appends: the last row of each round counts, other methods and concurrencies do not
    rows = [row(0, 9.0, 1.0), row(1, 9.0, 1.0), row(0, 1.0, 2.0), row(1, 1.0, 2.0), row(0, 5.0, 5.0, method="medusa")]
    assert [r["makespan_s"] for r in latest_rounds(rows, "speculative", 4)] == [1.0, 1.0]
    assert latest_rounds(rows, "speculative", 1) == []


def test_every_request_of_every_round_is_checked_and_the_record_keeps_a_divergence(tmp_path, engine, tokenizer):
    """Round 1 of the method changes one token of one request: its record says so (against the transformers
    reference and against plain vLLM's output of that round), and the load rows count it in that round only."""
    from harness.results import RunDir

    outputs = [tokenizer(t, add_special_tokens=False).input_ids for t in ("return a", "x = 1")]
    prompts = [Prompt(Sample(id=f"s{i}", turns=["x"]), [0, 5], StopRule(64, frozenset(), None), [],
                      type("R", (), {"model": "tiny", "tokens": ids})()) for i, ids in enumerate(outputs)]  # fmt: skip

    def reply(tokens: list[list[int]], wall: float) -> dict:
        results = [{"tokens": t, "chunks": [len(t)], "arrivals": [0.5], "submitted": 0.0, "finish_reason": "length"}
                   for t in tokens]  # fmt: skip
        return {"wall_s": wall, "results": results, "spec": {"drafts": 0, "accepted_per_position": []}}

    changed = [outputs[0], outputs[1][:-1] + [outputs[1][-1] + 1]]
    method = [reply(outputs, 1.0), reply(changed, 1.0), reply(outputs, 1.0)]
    rounds = paired_rounds(lambda i: reply(outputs, 2.0), lambda i: method[i], 3)
    rundir = RunDir(tmp_path / "vllm-c2")
    rundir.create({}, "key")
    exp = Experiment(model=MODELS.get("random-tiny"), task=type("T", (), {"name": "jsonl"})(), methods={},
                     run=RunSettings(), sampling=SamplingConfig(), config={})  # fmt: skip
    check_rounds(exp, engine, "speculative", prompts, rounds, 2, rundir)
    records = {(r.method, r.sample_id): r for r in rundir.records()[0]}
    assert len(records) == 4  # one per prompt and side, whatever the rounds
    bad, good = records[("speculative", "s1")], records[("speculative", "s0")]
    last = len(outputs[1]) - 1
    assert bad.status in ("mismatch", "tie") and bad.first_diff == last and bad.extra["rounds_exact"] == 2
    assert bad.extra["vs_vllm_greedy"] == f"mismatch at {last} (round 1)" and bad.tokens == outputs[1]
    assert good.status == "exact" and good.extra["rounds_exact"] == 3 and good.extra["vs_vllm_greedy"] == "exact"
    plain = records[("autoregressive", "s1")].extra
    assert (plain["rounds"], plain["rounds_exact"], plain["vs_vllm_greedy"]) == (3, 3, "exact")
    rows = [json.loads(x) for x in (rundir.path / "load.jsonl").read_text().splitlines()]
    assert [(r["round"], r["first"], r["exact"], r["equal_to_baseline"], r["baseline_exact"]) for r in rows] == [
        (0, "baseline", 2, 2, 2), (1, "method", 1, 1, 2), (2, "baseline", 2, 2, 2)]
    tokens = sum(map(len, outputs))
    assert [(r["tokens"], r["baseline_tokens"], r["makespan_s"], r["baseline_makespan_s"]) for r in rows] == [
        (tokens, tokens, 1.0, 2.0)] * 3
    assert round_speedup(rows).speedup == pytest.approx(2.0)


def fake_worker_python(path: Path, deaf: bool = True) -> Path:
    """A stand-in for vLLM's python: a group of two processes like vLLM's worker and engine core; ``deaf``: both
    ignore quit and SIGTERM (else the leader exits on quit and leaves its child to the group's SIGTERM)."""
    deaf_script = "#!/bin/sh\nsh -c 'trap \"\" TERM; sleep 300' &\ntrap '' TERM\nsleep 300\n"
    path.write_text(deaf_script if deaf else "#!/bin/sh\nsleep 300 &\nread line\n")
    path.chmod(0o755)
    return path


def test_two_live_workers_are_both_stopped_when_the_run_is_interrupted(tmp_path):
    """The baseline's and the method's workers live together; an interrupt closes both groups."""
    fake = fake_worker_python(tmp_path / "python", deaf=False)
    workers = []
    with pytest.raises(KeyboardInterrupt), ExitStack() as live:
        for side in ("baseline", "method"):
            workers.append(live.enter_context(VllmWorker(WorkerSettings(fake, tmp_path / f"{side}.log", 1, 1, 1))))
        time.sleep(0.5)
        assert all(w.alive() for w in workers) and workers[0].pgid != workers[1].pgid
        raise KeyboardInterrupt
    assert not any(w.alive() for w in workers)
    assert {p.name for p in tmp_path.glob("*.pid")} == {"baseline.pid", "method.pid"}


# ---- with vLLM (make test-vllm) ---------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory, tokenizer) -> Path:
    """A tiny random Llama vLLM's CPU kernels take (head size 32), saved with its tokenizer."""
    from tests.conftest import tiny_model

    path = tmp_path_factory.mktemp("vllm-tiny")
    tiny_model(len(tokenizer), hidden_size=128, num_attention_heads=4, num_key_value_heads=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_prompts(path: Path) -> Path:
    rows = [{"id": f"p{i}", "prompt": p} for i, p in enumerate(["def add(a, b):", "for i in range(10):",
                                                                  "class Foo:", "int main() {"])]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.vllm
def test_vllm_runs_the_methods_exactly_at_every_concurrency(tmp_path, vllm_model):
    """The draft is the target itself: vLLM must accept every drafted token, and every output must
    equal transformers' greedy output and vLLM's own, at concurrency 1 and 3."""
    out = tmp_path / "run"
    code = main(["run", "--engine", "vllm", "--task", "jsonl", f"task.path={write_prompts(tmp_path / 'p.jsonl')}",
                 "--model", str(vllm_model), "--methods", "speculative,prompt-lookup", "--max-new-tokens", "24",
                 f"method.speculative.draft={vllm_model}", "method.speculative.gamma=3", "run.concurrency=1,3",
                 "--out", str(out), "vllm.max_model_len=512", "run.progress=false", "vllm.rounds=2"])  # fmt: skip
    assert code == 0
    for c in (1, 3):
        records = [json.loads(x) for x in (out / f"vllm-c{c}" / "samples.jsonl").read_text().splitlines()]
        assert {r["method"] for r in records} == {"autoregressive", "speculative", "prompt-lookup"}
        assert all(r["engine"] == "vllm" and r["status"] == "exact" for r in records), records
        assert all(r["extra"]["vs_vllm_greedy"] == "exact" for r in records)
        spec = [r for r in records if r["method"] == "speculative"]
        drafted = sum(r["proposed_per_position"][0] for r in spec if r["proposed_per_position"])
        assert drafted > 0 and all(a == drafted for r in spec for a in r["accepted_per_position"])
        assert all(s <= 4 for r in spec for s in r["accepted_per_step"])  # gamma 3 + the bonus token
        manifest = json.loads((out / f"vllm-c{c}" / "manifest.json").read_text())
        assert manifest["engine"]["name"] == "vllm" and manifest["engine"]["concurrency"] == c
        assert manifest["engine"]["rounds"] == 2
        rows = [json.loads(x) for x in (out / f"vllm-c{c}" / "load.jsonl").read_text().splitlines()]
        assert [(r["method"], r["round"], r["first"]) for r in rows] == [
            (m, i, first) for m in ("speculative", "prompt-lookup") for i, first in enumerate(("baseline", "method"))]
        assert all(r["exact"] == r["baseline_exact"] == r["equal_to_baseline"] == 4 for r in rows)
        assert all(r["tokens"] == r["baseline_tokens"] and r["makespan_s"] > 0 for r in rows)
        assert all(r["extra"]["rounds"] == 2 and r["extra"]["rounds_exact"] == 2 for r in records)
    assert json.loads((out / "harness" / "manifest.json").read_text())["engine"]["name"] == "harness"
    report = (out / "leaderboard.md").read_text()
    assert "## Side by side" in report and "## Speedup vs concurrency" in report
    assert "timed in 2 paired rounds per concurrency" in report and "the order alternating" in report
    assert "none: every output equals both references" in report
    assert (out / "speedup-vs-concurrency.png").stat().st_size > 0
    assert main(["leaderboard", str(out / "vllm-c1")]) == 0  # an ordinary run directory


@pytest.mark.vllm
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_killed_harness_leaves_no_vllm_process(tmp_path, vllm_model, sig):
    """Killed while plain vLLM's worker and the method's are both alive: neither group outlives it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "harness.cli", "run", "--engine", "vllm", "--task", "jsonl",
           f"task.path={write_prompts(tmp_path / 'p.jsonl')}", "--model", str(vllm_model), "--max-new-tokens", "8",
           "--methods", "prompt-lookup", "--out", str(out), "vllm.max_model_len=512", "run.progress=false"]  # fmt: skip
    harness = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pid_files = [out / "vllm-baseline.pid", out / "vllm-prompt-lookup.pid"]
    deadline = time.monotonic() + 400
    while not all(p.exists() for p in pid_files) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert all(p.exists() for p in pid_files), "the two vLLM workers never started"
    time.sleep(5)  # inside the method engine's start-up: its engine core is spawned by now or soon
    groups = [int(p.read_text()) for p in pid_files]
    assert group_alive(groups[0]), "plain vLLM's worker is not alive beside the method's"
    harness.send_signal(sig)
    harness.wait(timeout=120)
    deadline = time.monotonic() + 60
    while any(group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(group_alive(g) for g in groups), f"vLLM processes left in groups {groups} after {sig.name}"


def group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of group ``pgid`` is left."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


@pytest.mark.vllm
def test_vllm_is_installed_as_make_vllm_leaves_it():
    assert VLLM_PYTHON.exists(), "run `make vllm`"
    python = vllm_python(str(VLLM_PYTHON))
    done = subprocess.run([str(python), "-P", "-c", "import importlib.util as u; "
                           "print([m for m in ('torchvision', 'torchaudio', 'torchcodec') if u.find_spec(m)])"],
                          capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})  # fmt: skip
    assert done.stdout.strip() == "[]", "the CUDA vision wheels break vLLM's import on CPU: make vllm removes them"
