"""Detail metrics (harness/detail.py) against figures computed by hand on a synthetic run.

The run: two samples, a (5 new tokens) and b (8). The reference decodes one token per 10 ms
forward. ``speculative`` (gamma 2) commits [1, 3, 1] on a and [1, 2, 2, 2, 1] on b, with 3 ms
per draft forward and 15 ms per verify; ``medusa`` (a tree, no gamma) commits [1, 2, 2] and
[1, 3, 3, 1] at 20 ms per step. ``hf-assisted``'s prompt forward also verifies a draft: it
commits [2, 2, 1] and [3, 3, 2], 21 ms of forwards per step.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from harness.detail import ChainModel, expected_tokens, with_prompt_forward
from harness.report import load_runs, metrics
from harness.results import Record, RunDir

TOKENS = {"a": [5, 6, 7, 8, 9], "b": [5, 6, 7, 8, 9, 10, 11, 12]}


def record(method: str, sample: str, per_step: list[int], *, prefill: float, verify: float, draft: float = 0.0,
           host: float, first: float, proposed=(), accepted=()) -> dict:  # fmt: skip
    """A record whose forward times are prefill + verify + draft and wall = forwards + host."""
    forwards = prefill + verify + draft
    return Record(
        method=method, task="jsonl", sample_id=sample, turn=0, model="m", prompt_tokens=3, tokens=TOKENS[sample],
        text="", wall_time_s=forwards + host, forward_time_s=forwards, prefill_time_s=prefill,
        draft_forward_time_s=draft, verify_tokens=0, peak_memory_bytes=None, target_forwards=len(per_step),
        draft_forwards=0, accepted_per_step=per_step, proposed_per_position=list(proposed),
        accepted_per_position=list(accepted), lossy=False, status="exact", first_token_s=first,
    ).__dict__  # fmt: skip


def reference_rows() -> list[dict]:
    return [
        record("autoregressive", "a", [1] * 5, prefill=0.010, verify=0.040, host=0.010, first=0.011),
        record("autoregressive", "b", [1] * 8, prefill=0.010, verify=0.070, host=0.016, first=0.011),
    ]


def synthetic_run(path: Path) -> Path:
    rows = reference_rows() + [
        record("speculative", "a", [1, 3, 1], prefill=0.010, verify=0.030, draft=0.012, host=0.010, first=0.015,
               proposed=[2, 2], accepted=[1, 1]),  # 2 steps: accept 2, then 0 drafts
        record("speculative", "b", [1, 2, 2, 2, 1], prefill=0.010, verify=0.060, draft=0.024, host=0.010,
               first=0.017, proposed=[4, 4], accepted=[3, 0]),  # 4 steps: accept 1, 1, 1, 0 drafts
        record("medusa", "a", [1, 2, 2], prefill=0.010, verify=0.040, host=0.005, first=0.012),
        record("medusa", "b", [1, 3, 3, 1], prefill=0.010, verify=0.060, host=0.005, first=0.012),
    ]  # fmt: skip
    return write_run(path, rows)


def write_run(path: Path, rows: list[dict]) -> Path:
    path.mkdir(parents=True)
    manifest = {"config": {"method": {"speculative": {"gamma": 2, "schedule": "constant"}, "medusa": {}}},
                "environment": {"device": "cpu", "device_name": "test"}, "model": {"label": "m"}}  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    (path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def table(tmp_path):
    return metrics(load_runs([synthetic_run(tmp_path / "run")])).set_index("method")


def test_acceptance_distribution(table):
    spec = table.loc["speculative"]
    # decode steps: a commits 3, 1; b commits 2, 2, 2, 1
    assert spec.accepted_histogram == {1: 2, 2: 3, 3: 1}
    # proposed [6, 6] at positions 1, 2; accepted [4, 1]
    assert spec.acceptance_joint == pytest.approx([4 / 6, 1 / 6])
    assert spec.acceptance_conditional == pytest.approx([4 / 6, 1 / 4])
    # pooled: 11 tokens / 6 steps; per request: mean(4 / 2, 7 / 4)
    assert spec.accepted_pooled == pytest.approx(11 / 6)
    assert spec.accepted_per_request == pytest.approx(1.875)
    assert table.loc["autoregressive"].accepted_histogram == {1: 11}


def test_latency_and_time_per_step(table):
    spec = table.loc["speculative"]
    assert spec.ttft_ms == pytest.approx(16.0)  # median of 15 and 17 ms
    a, b = (0.062 - 0.015) / 4 * 1000, (0.104 - 0.017) / 7 * 1000  # per-token latency of each request
    assert (a, b) == pytest.approx((11.75, 87 / 7))
    assert spec.tpot_ms_p50 == pytest.approx((a + b) / 2)
    assert spec.tpot_ms_p90 == pytest.approx(a + 0.9 * (b - a))
    assert spec.tpot_ms_p99 == pytest.approx(a + 0.99 * (b - a))
    # 6 decode steps: 36 ms of draft, 90 ms of verify, 20 ms of host time
    assert spec.draft_ms_per_step == pytest.approx(6.0)
    assert spec.verify_ms_per_step == pytest.approx(15.0)
    assert spec.host_ms_per_step == pytest.approx(20 / 6)


# the reference's prompt forwards: 20 ms of its 130 ms of forwards, which no method shortens
SHARE = 20 / 130


def whole(decode_limit: float) -> float:
    """A decode-step limit over whole generations, by hand: the prompt's 20 ms stay, the rest shrinks."""
    return 130 / (20 + 110 / decode_limit)


def test_chain_limit_and_best_gamma(table):
    spec = table.loc["speculative"]
    # per decode step: E(2) = 1 + 4/6 + 1/6; cost = 2 x 3 ms + 15 ms; t1 = 10 ms (110 ms over 11 reference steps)
    assert spec.limit_speedup == pytest.approx(whole(11 / 6 * 10 / 21))
    # gamma 1: E = 5/3, verify 10 + (15 - 10) / 2 = 12.5 ms -> 16.7 / 15.5 = 1.075;
    # gamma 3: E = 11/6 + 1/6 x 1/4, cost 9 + 17.5 ms -> 0.708
    assert spec.setting_run == "gamma=2" and spec.best_setting == "gamma=1"
    assert spec.best_setting_limit == pytest.approx(whole(5 / 3 * 10 / 15.5))
    assert spec.speedup == pytest.approx(0.156 / 0.166)  # same tokens, wall 166 ms vs 156 ms
    assert spec.limit_fraction == pytest.approx(spec.speedup / spec.limit_speedup)


def test_tree_limit_from_step_cost(table):
    medusa = table.loc["medusa"]
    # 11 tokens over 5 steps at 20 ms a step against 10 ms: 2.2 / 2 per decode step
    assert medusa.limit_speedup == pytest.approx(whole(1.1))
    assert medusa.efficiency == pytest.approx(medusa.speedup / whole(1.1))
    assert medusa.setting_run == "" and medusa.best_setting == ""
    ar = table.loc["autoregressive"]
    assert ar.limit_speedup == pytest.approx(1.0) and ar.limit_fraction == pytest.approx(1.0)


def test_tokens_the_prompt_forward_committed_are_not_decode_steps(tmp_path):
    rows = reference_rows() + [
        record("hf-assisted", "a", [2, 2, 1], prefill=0.010, verify=0.030, draft=0.012, host=0.010, first=0.012),
        record("hf-assisted", "b", [3, 3, 2], prefill=0.010, verify=0.030, draft=0.012, host=0.010, first=0.012),
    ]  # fmt: skip
    hf = metrics(load_runs([write_run(tmp_path / "run", rows)])).set_index("method").loc["hf-assisted"]
    # 4 decode steps commit (5 - 2) + (8 - 3) = 8 tokens (not 5 - 1 + 8 - 1 = 11) in 84 ms of forwards
    assert hf.accepted_pooled == pytest.approx(2.0)
    assert hf.step_cost == pytest.approx(2.1) and hf.limit_speedup == pytest.approx(whole(2 / 2.1))
    assert hf.efficiency == pytest.approx(hf.speedup / whole(2 / 2.1))
    assert hf.mean_accepted_tokens == pytest.approx(13 / 6)  # all tokens over all target forwards


def test_the_whole_generation_limit_follows_amdahl():
    assert with_prompt_forward(2.0, 0.0) == pytest.approx(2.0)  # no prompt forward: the decode limit
    assert with_prompt_forward(2.0, 0.5) == pytest.approx(1 / (0.5 + 0.25))
    assert with_prompt_forward(0.5, 0.2) == pytest.approx(1 / (0.2 + 1.6))  # a slowdown shrinks too
    assert with_prompt_forward(1.0, SHARE) == pytest.approx(1.0)


def test_expected_tokens_extrapolates_by_the_last_conditional():
    assert expected_tokens([0.5], [0.5], 3) == pytest.approx(1 + 0.5 + 0.25 + 0.125)
    assert expected_tokens([0.8, 0.4], [0.8, 0.5], 3) == pytest.approx(1 + 0.8 + 0.4 + 0.2)
    assert expected_tokens([], [], 4) == 1.0
    chain = ChainModel([0.9], [0.9], 1, t1=1.0, draft_per_token=0.05, verify_run=1.0)
    assert chain.best() > 1  # cheap drafts and high acceptance: longer chains pay


def test_summary_files_carry_the_detail(tmp_path):
    path = synthetic_run(tmp_path / "run")
    RunDir(path).write_summary(metrics(load_runs([path])))
    rows = {r["method"]: r for r in csv.DictReader((path / "summary.csv").open())}
    assert json.loads(rows["speculative"]["acceptance_joint"]) == pytest.approx([4 / 6, 1 / 6])
    assert json.loads(rows["speculative"]["accepted_histogram"]) == {"1": 2, "2": 3, "3": 1}
    assert rows["speculative"]["best_setting"] == "gamma=1"
    doc = {r["method"]: r for r in json.loads((path / "summary.json").read_text())}
    assert doc["speculative"]["tpot_ms_p99"] == pytest.approx(rows_float(rows, "speculative", "tpot_ms_p99"))
    assert doc["medusa"]["limit_speedup"] == pytest.approx(whole(1.1))


def rows_float(rows: dict, method: str, column: str) -> float:
    return float(rows[method][column])
