"""The compiled mode (model.compile=true): the static cache and bucketed forwards equal the
eager engine, every lossless method is token-exact against compiled autoregressive, a
second generation compiles nothing, and runs record (and leaderboards keep apart) the mode.

One compiled engine per module (compiling is slow on a shared CPU), with three buckets; the
methods whose forwards are not one plain decoder call (EAGLE-3's chosen layers, SWIFT's layer
skipping, Hidden Transfer's and FIRP's injected rows) share a second one, on its own three-layer
model with two buckets.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from harness.cli import main
from harness.compiled import StaticKVCache, compile_count
from harness.config import ModelConfig, SamplingConfig
from harness.engine import Engine
from harness.lossless import EXACT, MISMATCH, compare
from harness.report import load_runs
from harness.results import RunDirError
from harness.stops import StopRule
from conftest import tiny_model
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.eagle import Eagle, EagleConfig
from methods.eagle3 import Eagle3, Eagle3Config
from methods.hidden_transfer import Firp, FirpConfig, HiddenTransfer, HiddenTransferConfig
from methods.swift import Swift, SwiftConfig
from methods.lookahead import Lookahead, LookaheadConfig
from methods.medusa import Medusa, MedusaConfig
from methods.prompt_lookup import PromptLookup, PromptLookupConfig
from methods.space import Space, SpaceConfig
from methods.speculative import Speculative, SpeculativeConfig
from tests.test_eagle import random_head
from tests.test_hidden_transfer import LAYER as INJECTED_AT, random_transfer
from tests.test_medusa import random_heads

GREEDY = SamplingConfig()
BUCKETS = [1, 4, 16]
PROMPTS = [[0, 17, 42, 99, 5], [0, 250, 251, 252, 253, 254, 255, 10, 11], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
LONG = [0] + list(range(20, 60))  # 41 tokens: more than the largest bucket
N = 40


@pytest.fixture(scope="module")
def compiled(engine) -> Engine:
    """The session's tiny random model (same weights as ``engine``), compiled, every bucket warm."""
    cfg = ModelConfig(name="tiny-compiled", path="", compile=True, compile_buckets=BUCKETS, compile_cache_len=160)
    eng = Engine.from_model(engine.model, engine.tokenizer, cfg)
    assert eng.compiled.warm_up() == len(BUCKETS)  # one graph per bucket
    return eng


def test_forwards_equal_the_eager_engine(engine, compiled):
    """A prompt longer than the largest bucket (eager over a dynamic cache, copied into the static
    one), a custom tree mask with explicit positions (a bucket), keep and truncate, and a long
    forward after cached entries (eager over the static cache)."""
    ce, ee = compiled.new_cache(), engine.new_cache()
    assert isinstance(ce, StaticKVCache)
    a, b = compiled.forward(LONG, ce).logits, engine.forward(LONG, ee).logits
    assert len(ce) == len(ee) == len(LONG) and torch.allclose(a, b, atol=1e-5)
    past, n = len(LONG), 5
    mask = torch.ones(n, past + n, dtype=torch.bool)
    mask[:, past:] = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]])
    positions = [past, past + 1, past + 1, past + 2, past + 2]  # a root, two branches of depth 2
    tree = [7, 8, 9, 10, 11]
    a = compiled.forward(tree, ce, positions=positions, mask=mask, hidden=True)
    b = engine.forward(tree, ee, positions=positions, mask=mask, hidden=True)
    assert torch.allclose(a.logits, b.logits, atol=1e-5) and torch.allclose(a.hidden, b.hidden, atol=1e-5)
    for cache in (ce, ee):
        cache.keep(list(range(past)) + [past, past + 2, past + 4])  # the root and one branch
    a, b = compiled.forward([12], ce, last_only=True).logits, engine.forward([12], ee, last_only=True).logits
    assert len(ce) == len(ee) == past + 4 and torch.allclose(a, b, atol=1e-5)
    ce.truncate(past)
    ee.truncate(past)
    a, b = compiled.forward([3, 4], ce).logits, engine.forward([3, 4], ee).logits
    assert torch.allclose(a, b, atol=1e-5)
    more = list(range(60, 80))  # longer than the largest bucket after cached entries: eager over the static cache
    a, b = compiled.forward(more, ce).logits, engine.forward(more, ee).logits
    assert len(ce) == len(ee) == past + 2 + len(more) and torch.allclose(a, b, atol=1e-5)
    with pytest.raises(ValueError):
        ce.truncate(len(ce) + 1)


def lossless_methods(compiled: Engine, heads) -> dict:
    return {
        "speculative": Speculative(SpeculativeConfig(gamma=3), compiled, GREEDY, draft=compiled),
        "prompt-lookup": PromptLookup(PromptLookupConfig(), compiled, GREEDY),
        "medusa": Medusa(MedusaConfig(tree="small"), compiled, GREEDY, heads=heads),
        "space-k1": Space(SpaceConfig(k=1), compiled, GREEDY),
        "space-k2": Space(SpaceConfig(k=2), compiled, GREEDY),
        # steps of 1 + (3 + 2) * 2 rows at most: every shape within the 16-token bucket
        "lookahead": Lookahead(LookaheadConfig(window=3, ngram=3, candidates=2, context_pool=True), compiled, GREEDY),
    }


def test_every_method_is_token_exact_and_a_second_run_compiles_nothing(compiled):
    ar = Autoregressive(AutoregressiveConfig(), compiled, GREEDY)
    stop = StopRule(N, frozenset())
    reference = {tuple(p): ar.generate(p, stop).tokens for p in PROMPTS}
    methods = lossless_methods(compiled, random_heads(compiled))
    for name, method in methods.items():
        method.generate(PROMPTS[0], stop)  # a first run may compile the method's own parts (Medusa heads)
        before = compile_count()
        for prompt in PROMPTS:
            got = method.generate(prompt, stop)
            assert got.tokens == reference[tuple(prompt)], name
            assert sum(got.accepted_per_step) == N and len(got.accepted_per_step) == got.target_forwards
        assert compile_count() == before, f"{name} recompiled on its second run"
    assert max(methods["prompt-lookup"].generate(PROMPTS[2], stop).accepted_per_step) > 1  # verify chunks ran


def test_compiled_autoregressive_against_eager(engine, compiled):
    """A compiled kernel may round differently: each prompt is classified like any method
    (exact, or a tie at a near-zero margin); a real mismatch fails."""
    stop = StopRule(N, frozenset())
    verdicts = []
    for prompt in PROMPTS + [LONG]:
        eager = Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop).tokens
        fast = Autoregressive(AutoregressiveConfig(), compiled, GREEDY).generate(prompt, stop).tokens
        verdicts.append(compare(engine, prompt, eager, fast, 1e-3).status)
    assert MISMATCH not in verdicts
    assert verdicts.count(EXACT) >= 1, verdicts


def test_bad_buckets_are_refused(engine):
    with pytest.raises(ValueError, match="compile_buckets"):
        Engine.from_model(engine.model, engine.tokenizer, ModelConfig(path="", compile=True, compile_buckets=[0, 4]))


@pytest.mark.filterwarnings("error:compiled mode")  # the fitted static cache must not have to grow
def test_run_records_the_mode_and_leaderboards_keep_modes_apart(model_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"def f{i}(x):"}) + "\n" for i in range(2)))
    out = tmp_path / "compiled"
    args = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "8",
            "--out", str(out), "--methods", "autoregressive,prompt-lookup", "run.progress=false", "run.threads=1",
            "model.compile=true", f"model.compile_buckets=[{','.join(map(str, BUCKETS))}]"]  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "graphs compiled" in printed and "inside the timer" not in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["forward_mode"]["mode"] == "compiled" and manifest["forward_mode"]["buckets"] == BUCKETS
    assert manifest["environment"]["threads"] == 1
    # the cache fits the longest prompt + 8 new tokens + one largest bucket of padding
    assert manifest["forward_mode"]["static_cache_len"] <= 64
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["status"] for r in records} == {EXACT}
    eager = tmp_path / "eager"
    shutil.copytree(out, eager)
    manifest["forward_mode"] = {"mode": "eager"}
    (eager / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunDirError, match="forward mode"):
        load_runs([out, eager])
    assert main(["leaderboard", str(out)]) == 0
    assert "forwards: compiled" in capsys.readouterr().out


# ---- chosen layers, layer skipping, injected rows ----------------------------------------------
LAYERWISE_BUCKETS = [1, 4]
LAYERS = 3  # SWIFT keeps the first and last layer: one layer's two sublayers may be skipped
SHORT = [42]  # prefill: 1 token, then 1 + 3 injected rows: both layer ranges at buckets no step of PROMPTS runs


@pytest.fixture(scope="module")
def layerwise(tokenizer) -> tuple[Engine, Engine]:
    """(eager, compiled) engines on one three-layer random model of their own: a model that ran
    transformers' ``output_hidden_states`` carries its capture hooks, which the compiled
    module-by-module forwards do not trace (the session model has, in other tests)."""
    model = tiny_model(len(tokenizer), seed=3, num_hidden_layers=LAYERS)
    cfg = ModelConfig(name="tiny-layerwise", path="", compile=True, compile_buckets=LAYERWISE_BUCKETS,
                      compile_cache_len=120)  # fmt: skip
    eager = Engine.from_model(tiny_model(len(tokenizer), seed=3, num_hidden_layers=LAYERS), tokenizer)
    return eager, Engine.from_model(model, tokenizer, cfg)


def layerwise_methods(engine: Engine) -> dict:
    return {
        "eagle": Eagle(EagleConfig(), engine, GREEDY, head=random_head(engine, 1)),
        "eagle3": Eagle3(Eagle3Config(), engine, GREEDY, head=random_head(engine, 3)),
        # one of layer 1's two sublayers skipped: the search scores both sets; confidence 0: every
        # draft runs max_draft skipped forwards; a 4-row window: the search runs the 4-row bucket
        "swift": Swift(SwiftConfig(skip_ratio=0.2, confidence=0.0, max_draft=3, search_window=4), engine, GREEDY),
        "hidden-transfer": HiddenTransfer(HiddenTransferConfig(tree="chain"), engine, GREEDY,
                                          transfer=random_transfer(engine, attend_rows=False)),  # fmt: skip
        "firp": Firp(FirpConfig(tree="chain"), engine, GREEDY, transfer=random_transfer(engine, attend_rows=True)),
    }


def test_layerwise_methods_compiled_are_token_exact_with_fixed_graphs(layerwise):
    """EAGLE, EAGLE-3, SWIFT, Hidden Transfer and FIRP compiled equal eager greedy decoding token
    for token; the graphs: per bucket one plain forward, one with EAGLE-3's fused layers, one per
    sublayer (2 x layers) once layer-skipping forwards ran at that bucket (so every skip set
    SWIFT's search tries runs on the same graphs), one per layer range of the injected-row
    forwards (before the injection layer, from it) at every bucket, and the draft heads' (EAGLE's
    one input width, EAGLE-3's two: fused target features, its own outputs); a second run
    compiles nothing, though its one-token prompt runs the injected-row forwards at buckets the
    warm-up's prompt never used."""
    eager, compiled = layerwise
    stop = StopRule(N, frozenset())
    prompts = PROMPTS + [SHORT]
    reference = {tuple(p): Autoregressive(AutoregressiveConfig(), eager, GREEDY).generate(p, stop).tokens
                 for p in prompts}  # fmt: skip
    methods = layerwise_methods(compiled)
    for method in methods.values():
        method.generate(PROMPTS[0], stop)  # the warm-up's generation: what it runs is compiled below
    before = compiled.compiled.graphs
    warmed = compiled.compiled.warm_up()
    assert compiled.compiled.fused and compiled.compiled.sublayer_sizes == set(LAYERWISE_BUCKETS)
    assert compiled.compiled.spans == {(0, INJECTED_AT), (INJECTED_AT, LAYERS)}
    assert [sorted(h.widths) for h in compiled.compiled.heads.values()] == [[64], [64, 3 * 64]]
    per_bucket = 1 + len(compiled.compiled.fused) + 2 * LAYERS + 2 + 1 + 2
    assert compiled.compiled.graphs == per_bucket * len(LAYERWISE_BUCKETS), (before, warmed)
    start = compile_count()
    for name, method in methods.items():
        for prompt in prompts:
            got = method.generate(prompt, stop)
            assert got.tokens == reference[tuple(prompt)], name
            assert sum(got.accepted_per_step) == N and len(got.accepted_per_step) == got.target_forwards
        assert compile_count() == start, f"{name} compiled a graph after the warm-up"
