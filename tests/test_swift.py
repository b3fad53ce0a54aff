"""SWIFT self-speculation: the engine's layer-skipping forward (empty skip set = the plain
forward, with and without a cache; a skip set = the model with those sublayers' outputs
zeroed; a ragged cache rolled back), the search (it finds the sublayers that do nothing),
greedy output equal to autoregressive decoding (Llama, Qwen2 and Mistral with sliding
windows), stops inside an accepted block, and stats and timing accounts (the sampling law
every method keeps: tests/test_conformance.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_speculative import autoregressive
from transformers import Gemma2Config, Gemma2ForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from harness.config import SamplingConfig
from harness.engine import Engine, LayerSkip
from harness.stops import StopRule
from methods.swift import Swift, SwiftConfig, eligible_sublayers

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5], [0, 3], list(range(10, 70))]
N = 40
NOOP = LayerSkip(attn=frozenset({2}), mlp=frozenset({3}))  # the sublayers noop_engine zeroes
# finds NOOP on noop_engine: 2 of the 6 eligible sublayers, every pair may be scored
FIND_NOOP = dict(skip_ratio=0.2, search_budget=15, search_random=15, target_score=1.0, confidence=0.0)
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.2, bos_token_id=0, eos_token_id=None,
              pad_token_id=2)  # fmt: skip
WINDOW = 8
FAMILIES = {  # four layers with sliding windows, so the skip path's masks are tested past the window
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=4, use_sliding_window=True, sliding_window=WINDOW,
                                                  max_window_layers=2, **COMMON)),  # fmt: skip
    "mistral": lambda: MistralForCausalLM(MistralConfig(num_hidden_layers=4, sliding_window=WINDOW, **COMMON)),
}


def llama(layers: int = 4, seed: int = 0, vocab: int = 300, tokenizer=None, **kw) -> Engine:
    return Engine.from_model(tiny_model(vocab, seed=seed, num_hidden_layers=layers, **kw), tokenizer)


def family(name: str, seed: int = 0) -> Engine:
    torch.manual_seed(seed)
    return Engine.from_model(FAMILIES[name]().eval(), None)


def noop_engine(vocab: int = 300, tokenizer=None) -> Engine:
    """Five layers; layer 2's attention and layer 3's MLP output zeros (o_proj, down_proj = 0),
    so skipping exactly those two changes no logit: that draft is always right."""
    model = tiny_model(vocab, num_hidden_layers=5, initializer_range=0.2)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.zero_()
        model.model.layers[3].mlp.down_proj.weight.zero_()
    return Engine.from_model(model, tokenizer)


def swift(engine: Engine, sampling: SamplingConfig = GREEDY, **cfg) -> Swift:
    return Swift(SwiftConfig(**cfg), engine, sampling)


def check_stats(gen, n: int) -> None:
    assert sum(gen.accepted_per_step) == len(gen.tokens) == n
    assert len(gen.accepted_per_step) == gen.target_forwards
    extra = gen.extra
    assert gen.draft_forwards == extra["search_forwards"] + extra["drafting_forwards"]
    assert extra["search_forwards"] == (extra["search_candidates"] + 1 if n > 1 else 0)  # none when the prefill ends it
    assert len(gen.accepted_per_position) == len(gen.proposed_per_position)
    assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))


# ---- the engine's skipping forward ------------------------------------------------------------
def zeroed_forward(engine: Engine, ids: list[int], skip: LayerSkip) -> torch.Tensor:
    """Independent reference: the plain model with the skipped sublayers' outputs replaced by zeros
    (forward hooks on the modules, removed after)."""
    layers = engine.model.get_decoder().layers
    hooks = [layers[i].self_attn.register_forward_hook(lambda m, a, out: (torch.zeros_like(out[0]), out[1]))
             for i in skip.attn]  # fmt: skip
    hooks += [layers[i].mlp.register_forward_hook(lambda m, a, out: torch.zeros_like(out)) for i in skip.mlp]
    try:
        with torch.no_grad():
            return engine.model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("name", ["llama", *FAMILIES])
def test_an_empty_skip_set_is_the_plain_forward(name):
    engine = llama() if name == "llama" else family(name)
    ids = [0] + [(7 * i + 3) % 60 + 3 for i in range(40)]  # five windows long
    plain = engine.forward(ids, engine.new_cache()).logits
    torch.testing.assert_close(engine.forward(ids, engine.new_cache(), skip=LayerSkip()).logits, plain, atol=1e-5, rtol=1e-5)
    cache = engine.new_cache()  # with a cache: a prefix, then single tokens and a block
    engine.forward(ids[:20], cache)
    rows = [engine.forward(ids[20:21], cache, skip=LayerSkip()).logits]
    rows.append(engine.forward(ids[21:30], cache, skip=LayerSkip()).logits)
    rows.append(engine.forward(ids[30:], cache, skip=LayerSkip(), last_only=True).logits)
    torch.testing.assert_close(torch.cat(rows), plain[[*range(20, 30), len(ids) - 1]], atol=1e-5, rtol=1e-5)
    # a real skip set is the model with those sublayers' outputs zeroed
    skip = LayerSkip(attn=frozenset({1}), mlp=frozenset({1, 2}))
    skipped = engine.forward(ids, engine.new_cache(), skip=skip).logits
    torch.testing.assert_close(skipped, zeroed_forward(engine, ids, skip), atol=1e-5, rtol=1e-5)
    assert (skipped.argmax(-1) != plain.argmax(-1)).any()  # it does change the model


def test_skipped_attention_writes_no_cache_and_truncate_evens_it():
    engine = llama(layers=4)
    ids = list(range(3, 33))
    plain = engine.forward(ids, engine.new_cache()).logits
    cache = engine.new_cache()
    engine.forward(ids[:20], cache)
    engine.forward(ids[20:25], cache, skip=LayerSkip(attn=frozenset({1, 2}), mlp=frozenset({2})))
    assert [layer.keys.shape[2] for layer in cache.inner.layers] == [25, 20, 20, 25] and len(cache) == 25
    cache.truncate(20)
    assert all(layer.keys.shape[2] == layer.values.shape[2] == 20 for layer in cache.inner.layers)
    torch.testing.assert_close(engine.forward(ids[20:], cache).logits, plain[20:], atol=1e-5, rtol=1e-5)


def test_unsupported_models_and_sets_are_refused():
    torch.manual_seed(0)
    gemma = Engine.from_model(Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=4, head_dim=8, **COMMON)).eval(), None)
    with pytest.raises(ValueError, match="layer skipping supports llama, mistral, qwen2 models, not 'gemma2'"):
        gemma.forward([0, 5], gemma.new_cache(), skip=LayerSkip())
    with pytest.raises(ValueError, match="layer skipping supports"):
        swift(gemma)
    engine = llama(layers=4)
    with pytest.raises(ValueError, match=r"outside the model's 0\.\.3"):
        engine.forward([0, 5], engine.new_cache(), skip=LayerSkip(mlp=frozenset({4})))
    with pytest.raises(ValueError, match="at least 3 layers"):
        swift(llama(layers=2))
    with pytest.raises(ValueError, match="skips no sublayer"):
        swift(engine, skip_ratio=0.01)
    with pytest.raises(ValueError, match="search_random <= search_budget"):
        swift(engine, search_budget=2, search_random=3)


# ---- the search ---------------------------------------------------------------------------------
def test_the_search_finds_the_sublayers_that_do_nothing():
    engine = noop_engine()
    assert len(eligible_sublayers(5)) == 6
    for prompt in PROMPTS:
        ref = autoregressive(engine, prompt, n=N)
        gen = swift(engine, **FIND_NOOP, max_draft=4).generate(prompt, StopRule(N, frozenset()))
        assert gen.tokens == ref
        check_stats(gen, N)
        assert (gen.extra["skip_attn"], gen.extra["skip_mlp"]) == ([2], [3]) and gen.extra["search_score"] == 1.0
        assert gen.extra["skipped_share"] == 0.2 and gen.extra["search_candidates"] <= 15
        # the draft is always right: 1 token from the prefill, then blocks of 4 drafts + 1
        assert gen.accepted_per_step == [1] + [5] * 7 + [4]
        assert gen.extra["drafting_forwards"] == 4 * 7 + 3


def test_the_search_is_bounded_and_deterministic():
    engine = llama(layers=6)
    prompt = PROMPTS[2]
    cfg = dict(search_budget=5, search_random=3, search_window=32, skip_ratio=0.3, target_score=2.0)
    runs = [swift(engine, **cfg).generate(prompt, StopRule(8, frozenset()), seed=s) for s in (0, 0, 1)]
    assert runs[0].extra == runs[1].extra and runs[0].tokens == runs[1].tokens
    for gen in runs:
        assert gen.extra["search_candidates"] == 5 and gen.extra["search_window"] == 32  # never reaches a score of 2
        assert len(gen.extra["skip_attn"]) + len(gen.extra["skip_mlp"]) == round(0.3 * 12)
        assert 0 not in gen.extra["skip_attn"] + gen.extra["skip_mlp"] and 5 not in gen.extra["skip_attn"] + gen.extra["skip_mlp"]


# ---- greedy output --------------------------------------------------------------------------------
CONFIGS = [
    {},
    {"confidence": 0.0, "max_draft": 3},
    {"confidence": 0.0, "max_draft": 1, "search_budget": 1, "search_random": 1},
    {"confidence": 0.2, "max_draft": 8, "skip_ratio": 0.5, "search_window": 4},
]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("cfg", CONFIGS)
def test_equals_autoregressive(prompt, cfg):
    engine = llama(layers=4, seed=1, initializer_range=0.1)
    ref = autoregressive(engine, prompt, n=N)
    gen = swift(engine, **cfg).generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    check_stats(gen, N)


def test_drafts_are_accepted_and_rejected_on_a_random_model():
    engine = llama(layers=4, seed=1, initializer_range=0.1)
    gens = [swift(engine, confidence=0.0, max_draft=3).generate(p, StopRule(N, frozenset())) for p in PROMPTS]
    accepted = [n for g in gens for n in g.accepted_per_step[1:]]
    assert max(accepted) >= 3 and min(accepted) == 1  # whole drafts taken, and drafts refused


@pytest.mark.parametrize("name", FAMILIES)
def test_sliding_window_families_equal_generate(name):
    engine = family(name)
    prompt = [0, 5, 9, 13, 5, 9, 13, 5]
    with torch.no_grad():
        ref = engine.model.generate(torch.tensor([prompt]), max_new_tokens=N, do_sample=False, pad_token_id=2)
    ref = ref[0, len(prompt) :].tolist()
    assert len(set(ref)) > 5
    for cfg in CONFIGS[:2]:
        gen = swift(engine, **cfg).generate(prompt, StopRule(N))
        assert gen.tokens == ref
        check_stats(gen, N)


@pytest.mark.parametrize("limit", range(1, 12))
def test_max_new_tokens_inside_an_accepted_block(limit):
    engine = noop_engine()
    prompt = PROMPTS[0]
    gen = swift(engine, **FIND_NOOP, max_draft=4).generate(prompt, StopRule(limit, frozenset()))
    assert gen.tokens == autoregressive(engine, prompt, n=limit)
    assert gen.stop_reason == "max_new_tokens"
    check_stats(gen, limit)


def test_eos_inside_an_accepted_block():
    engine = noop_engine()
    found = 0
    for prompt in PROMPTS:
        ref = autoregressive(engine, prompt, n=N)
        # blocks of 5 at indices 1-5, 6-10, ...: an index strictly inside one, its token's first occurrence
        k = next((i for i in range(2, N) if (i - 1) % 5 not in (0, 4) and ref[i] not in ref[:i]), None)
        if k is None:
            continue
        eos = frozenset({ref[k]})
        gen = swift(engine, **FIND_NOOP, max_draft=4).generate(prompt, StopRule(N, eos))
        assert gen.tokens == ref[: k + 1] == autoregressive(engine, prompt, n=N, eos=eos)
        assert gen.stop_reason == "eos" and gen.accepted_per_step[-1] == (k - 1) % 5 + 1
        check_stats(gen, k + 1)
        found += 1
    assert found >= 2


def test_draft_forwards_are_timed_apart_from_the_target():
    """The runner times the target and draft_engines(): the prefill and verifies on one side,
    every skipped / search forward on the other, counted as draft forwards."""
    engine = llama(layers=4, seed=1, initializer_range=0.1)
    method = swift(engine, confidence=0.0, max_draft=3)
    (drafter,) = method.draft_engines()
    assert drafter is not engine and drafter.model is engine.model
    engine.start_timing()
    drafter.start_timing()
    gen = method.generate(PROMPTS[0], StopRule(N, frozenset()))
    target_log, draft_log = engine.stop_timing(), drafter.stop_timing()
    assert len(target_log) == gen.target_forwards and len(draft_log) == gen.draft_forwards
    assert target_log[0][0] == len(PROMPTS[0])  # the prefill comes first
    assert sum(n for n, _ in draft_log[: gen.extra["search_forwards"]]) == gen.extra["search_forwards"] * len(PROMPTS[0])


# ---- sampling -----------------------------------------------------------------------------------------
