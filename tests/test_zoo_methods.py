"""Every method on the shipped zoo equals greedy autoregressive decoding token for token,
and the trained zoo really gets proposals accepted (a random draft would not)."""

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
]  # fmt: skip


@pytest.fixture(scope="module")
def humaneval_x():
    """One Python, C++ and Go HumanEval-X problem each, as (prompt ids, stop rule with the
    language's stop strings and EOS), and a datastore for rest: the other problems' prompts."""
    from harness.datastore import Datastore  # noqa: PLC0415
    from harness.stops import StopStrings  # noqa: PLC0415
    from tasks.humaneval_x import HumanEvalX, HumanEvalXConfig  # noqa: PLC0415

    engine = Engine.load(ModelConfig(name="zoo-target", path=str(ZOO_DIR / "target")))
    tok = engine.tokenizer
    task = HumanEvalX(HumanEvalXConfig(languages=["python", "cpp", "go"], limit=4))
    samples = task.samples()
    cases, corpus = [], []
    for lang in ("python", "cpp", "go"):
        first, *rest = [s for s in samples if s.language == lang]
        strings = StopStrings(task.stop_strings(first), lambda ids: tok.decode(ids, skip_special_tokens=True))
        cases.append((tok(first.turns[0]).input_ids, StopRule(NEW_TOKENS, frozenset(engine.eos_ids), strings)))
        corpus += [t for s in rest for t in tok(s.turns[0]).input_ids]
    return engine, cases, Datastore.from_tokens(corpus)


@pytest.mark.parametrize("name, options", SECOND_WAVE, ids=[c[0] for c in SECOND_WAVE])
def test_second_wave_equals_greedy_on_humaneval_x(humaneval_x, name, options):
    engine, cases, store = humaneval_x
    cls = METHODS.get(name)
    extra = {"datastore": store} if name == "rest" else {}
    method = cls(cls.config_class(name=name, **options), engine, SamplingConfig(), **extra)
    reference = METHODS.get("autoregressive")(METHODS.get("autoregressive").config_class(), engine, SamplingConfig())
    for prompt, stop in cases:
        ref = reference.generate(prompt, stop)
        gen = method.generate(prompt, stop)
        assert gen.tokens == ref.tokens and gen.stop_reason == ref.stop_reason, name
        assert sum(gen.accepted_per_step) == len(gen.tokens) and len(gen.accepted_per_step) == gen.target_forwards
