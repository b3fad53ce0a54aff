"""A run on the engine it names (``run.engine``): the harness's own engine (harness/engine.py)
(``harness.runner``) or vLLM's implementation of each method (``harness.serving``)."""

from __future__ import annotations

from typing import Callable

from harness import runner


def run(exp: runner.Experiment, log: Callable[[str], None] = print) -> runner.RunResult:
    if exp.run.engine == "vllm":
        from harness.serving.vllm_run import run_vllm  # noqa: PLC0415 (vLLM's side only when asked for)

        return run_vllm(exp, log)
    return runner.run(exp, log)
