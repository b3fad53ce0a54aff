"""scripts/gpu_check.sh's dry mode: every step of the GPU session's first script, tiny, on this CPU,
so a GPU minute is never spent on a typo. Slow (it loads every method and starts vLLM): make test-vllm."""

from __future__ import annotations

import subprocess

import pytest

from harness.paths import REPO_ROOT


@pytest.mark.vllm
def test_the_gpu_check_runs_every_step_in_its_dry_mode():
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run"], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=3600)  # fmt: skip
    out = REPO_ROOT / "results" / "runs" / "gpu-dry"
    summary = (out / "summary.txt").read_text()
    assert done.returncode == 0, summary + done.stdout[-2000:] + done.stderr[-2000:]
    assert [line.split(":")[0] for line in summary.splitlines()] == ["tests", "bench-eager", "bench-compiled", "vllm"]
    assert "dry run on CPU" in (out / "device.txt").read_text()
    for table in ("bench-eager.md", "bench-compiled.md", "vllm.md"):
        assert (out / table).stat().st_size > 0
