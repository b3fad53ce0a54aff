"""The trained zoo really gets proposals accepted (a random draft would not), with the
settings tested here; every method's token-exactness on the zoo is tests/test_conformance.py's."""

from __future__ import annotations

import pytest
import torch

from harness.config import ModelConfig, SamplingConfig
from harness.engine import Engine
from harness.paths import ZOO_DIR
from harness.registry import METHODS
from harness.stops import StopRule
from tasks.humaneval import HumanEval, HumanEvalConfig

NEW_TOKENS = 48


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [s.turns[0] for s in HumanEval(HumanEvalConfig(limit=3)).samples()]


@pytest.fixture(scope="module")
def engines() -> dict[str, Engine]:
    torch.set_num_threads(1)
    return {name: Engine.load(ModelConfig(name=name, path=str(ZOO_DIR / path)))
            for name, path in (("target", "target"), ("space", "target-space"))}  # fmt: skip


def run(engine: Engine, name: str, prompts: list[str], **options):
    cls = METHODS.get(name)
    method = cls(cls.config_class(name=name, **options), engine, SamplingConfig())
    stop = StopRule(NEW_TOKENS, frozenset(engine.eos_ids))
    return [method.generate(engine.tokenizer(p).input_ids, stop) for p in prompts]


CASES = [
    ("speculative", "target", {"draft": str(ZOO_DIR / "draft"), "gamma": 4}),
    ("speculative", "target", {"draft": str(ZOO_DIR / "draft"), "gamma": 2, "schedule": "heuristic"}),
    ("prompt-lookup", "target", {}),
    ("medusa", "target", {"heads": str(ZOO_DIR / "target-medusa"), "tree": "chain"}),
    ("medusa", "target", {"heads": str(ZOO_DIR / "target-medusa"), "tree": "large"}),
    ("space", "space", {}),
    ("lookahead", "target", {}),  # the defaults: W=4, N=3, G=4 with the context pool
]


@pytest.mark.parametrize("name, model, options", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_zoo_method_equals_greedy(engines, prompts, name, model, options):
    engine = engines[model]
    reference = run(engine, "autoregressive", prompts)
    got = run(engine, name, prompts, **options)
    for ref, gen in zip(reference, got):
        assert gen.tokens == ref.tokens
    accepted = sum(len(g.tokens) for g in got) / sum(g.target_forwards for g in got)
    assert accepted > 1.2, f"{name} accepted {accepted:.2f} tokens per target forward on the trained zoo"


# ---- the second-wave methods on Python, C++ and Go HumanEval-X prompts (issues 16-18) ------------
SECOND_WAVE = [
    ("eagle", {}), ("eagle2", {}), ("eagle3", {}), ("speculative-tree", {"draft": str(ZOO_DIR / "draft")}),
    ("swift", {}), ("lookahead", {}), ("reference-lookup", {}), ("rest", {}), ("suffix", {}), ("recycling", {}),
    ("hidden-transfer", {"tree": "small"}), ("firp", {"tree": "small"}),
    ("speculative-tree", {"draft": str(ZOO_DIR / "draft"), "branching": [4, 2, 2, 1, 1, 1, 1, 1], "max_nodes": 8,
                          "confidence": 0.4}),  # LLMCad's option
]  # fmt: skip


