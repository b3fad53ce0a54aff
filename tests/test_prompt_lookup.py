"""Prompt lookup decoding: n-gram lookup, greedy output equal to autoregressive, cache
rollback, and stats (stop rules and the sampling law every method keeps:
tests/test_conformance.py)."""

from __future__ import annotations

import random

import pytest
from test_speculative import autoregressive

from harness.config import SamplingConfig
from harness.stops import StopRule
from methods.acceptance import NgramIndex, ngram_lookup
from methods.hf_prompt_lookup import HFPromptLookup, HFPromptLookupConfig
from methods.prompt_lookup import PromptLookup, PromptLookupConfig

PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
N = 60


def brute_force(tokens: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    for n in range(max_n, min_n - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):  # latest first; at least one token follows
            if tokens[start : start + n] == tokens[-n:]:
                grown = list(tokens)  # copy token by token, so the copy may read what it wrote
                for i in range(k):
                    grown.append(grown[start + n + i])
                return grown[len(tokens) :]
    return []


def lookup_method(engine, sampling=None, **cfg) -> PromptLookup:
    return PromptLookup(PromptLookupConfig(**cfg), engine, sampling or SamplingConfig())


def test_ngram_lookup_matches_brute_force():
    rng = random.Random(0)
    for _ in range(300):
        tokens = [rng.randrange(4) for _ in range(rng.randrange(1, 30))]
        k, min_n = rng.randrange(0, 6), rng.randrange(1, 3)
        max_n = min_n + rng.randrange(0, 3)
        assert ngram_lookup(tokens, k, min_n, max_n) == brute_force(tokens, k, min_n, max_n), (tokens, k, min_n, max_n)
    index, grown = NgramIndex(1, 3), []  # incremental updates agree with a fresh index
    for t in [rng.randrange(3) for _ in range(60)]:
        grown.append(t)
        index.update(grown)
        assert index.lookup(grown, 4) == brute_force(grown, 4, 1, 3)
    assert ngram_lookup([1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]  # a periodic tail continues with its period
    assert ngram_lookup([4, 1, 2, 9, 1, 2, 3, 7, 1, 2], 2) == [3, 7]  # the most recent match wins
    assert ngram_lookup([5, 5, 5], 3, max_n=2) == [5, 5, 5]
    assert ngram_lookup([1, 2, 3], 5) == []
    with pytest.raises(ValueError):
        NgramIndex(2, 1)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("cfg", [{}, {"num_tokens": 3, "max_ngram": 1}, {"num_tokens": 7, "min_ngram": 2}])
def test_equals_autoregressive(engine, prompt, cfg):
    ref = autoregressive(engine, prompt, n=N)
    gen = lookup_method(engine, **cfg).generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    assert sum(gen.accepted_per_step) == N and len(gen.accepted_per_step) == gen.target_forwards
    assert gen.draft_forwards == 0
    width = cfg.get("num_tokens", 10)
    assert len(gen.proposed_per_position) <= width and len(gen.accepted_per_position) == len(gen.proposed_per_position)
    assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))


def test_lookup_saves_forwards(engine):
    gens = [lookup_method(engine).generate(p, StopRule(N, frozenset())) for p in PROMPTS]
    assert sum(g.target_forwards for g in gens) < 0.75 * N * len(PROMPTS)
    assert max(max(g.accepted_per_step) for g in gens) >= 5


def test_cache_is_rolled_back_to_the_committed_length(engine):
    for prompt in PROMPTS:
        end = lookup_method(engine).loop(prompt, StopRule(37, frozenset()))
        assert end.generation.tokens == autoregressive(engine, prompt, n=37)
        assert len(end.cache) == len(prompt) + 37 - 1


def test_hf_prompt_lookup_equals_autoregressive(engine):
    method = HFPromptLookup(HFPromptLookupConfig(), engine, SamplingConfig())
    eos = frozenset(engine.eos_ids)  # transformers' generate stops at the model's EOS anyway
    for prompt in PROMPTS:
        gen = method.generate(prompt, StopRule(N, eos))
        assert gen.tokens == autoregressive(engine, prompt, n=N, eos=eos)
        assert 0 < gen.target_forwards <= len(gen.tokens) and gen.draft_forwards == 0
    with pytest.raises(ValueError, match="greedy"):
        HFPromptLookup(HFPromptLookupConfig(), engine, SamplingConfig(do_sample=True))


