"""Microbenchmarks (pytest-benchmark): short decodes of each method on the shipped zoo,
and the engine's keep().

In the normal test run they execute once as smoke tests (``--benchmark-disable`` in
pyproject). To measure and compare:

    .venv/bin/python -m pytest tests/benchmarks --benchmark-enable --benchmark-save=before
    # ... change something ...
    .venv/bin/python -m pytest tests/benchmarks --benchmark-enable --benchmark-compare=0001 \
        --benchmark-compare-fail=mean:10%

Each decode benchmark generates 32 tokens from the same HumanEval prompt and records
the target forwards it needed (``extra_info``), so time per decoding step is
mean / target_forwards.
"""

from __future__ import annotations


import pytest
import torch

from harness.config import ModelConfig, SamplingConfig
from harness.engine import Engine
from harness.paths import ZOO_DIR
from harness.registry import METHODS
from harness.stops import StopRule

PROMPT = 'def fibonacci(n: int) -> int:\n    """Return the n-th Fibonacci number."""\n'
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def zoo():
    torch.set_num_threads(1)
    return {
        "target": Engine.load(ModelConfig(name="zoo-target", path=str(ZOO_DIR / "target"))),
        "space": Engine.load(ModelConfig(name="zoo-space", path=str(ZOO_DIR / "target-space"))),
    }


CASES = [
    ("autoregressive", "target", {}),
    ("speculative", "target", {"draft": str(ZOO_DIR / "draft")}),
    ("prompt-lookup", "target", {}),
    ("medusa", "target", {"heads": str(ZOO_DIR / "target-medusa")}),
    ("space", "space", {}),
]


@pytest.mark.parametrize("name, model, options", CASES, ids=[c[0] for c in CASES])
def test_decode(benchmark, zoo, name, model, options):
    engine = zoo[model]
    cls = METHODS.get(name)
    method = cls(cls.config_class(name=name, **options), engine, SamplingConfig())
    prompt = engine.tokenizer(PROMPT).input_ids
    stop = StopRule(NEW_TOKENS, frozenset(engine.eos_ids))
    gen = benchmark(method.generate, prompt, stop)
    ar = METHODS.get("autoregressive")
    reference = ar(ar.config_class(), engine, SamplingConfig()).generate(prompt, stop)
    assert gen.tokens == reference.tokens  # a fast wrong answer is no result
    benchmark.extra_info["target_forwards"] = gen.target_forwards
    benchmark.extra_info["new_tokens"] = len(gen.tokens)


def test_keep(benchmark, zoo):
    """Compacting 5 accepted entries out of a 36-token chunk after a 300-token prefix."""
    engine = zoo["target"]
    prompt = list(range(10, 310))

    def setup():
        cache = engine.new_cache()
        engine.forward(prompt, cache)
        engine.forward(list(range(400, 436)), cache)
        indices = list(range(len(prompt))) + [len(prompt) + 6 * i for i in range(5)]
        return (cache, indices), {}

    def run(cache, indices):
        cache.keep(indices)
        return cache

    cache = benchmark.pedantic(run, setup=setup, rounds=20)
    assert len(cache) == len(prompt) + 5
