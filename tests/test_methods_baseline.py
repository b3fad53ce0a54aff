"""The baseline: autoregressive equals transformers' generate token for token."""

from __future__ import annotations

import pytest
import torch

from harness.config import SamplingConfig
from harness.stops import Committer, StopRule
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.base import filter_logits
from methods.hf_generate import HFGenerate, HFGenerateConfig

PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11]]


def methods(engine, sampling=None):
    sampling = sampling or SamplingConfig()
    return Autoregressive(AutoregressiveConfig(), engine, sampling), HFGenerate(HFGenerateConfig(), engine, sampling)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_autoregressive_equals_hf_generate(engine, prompt):
    ar, hf = methods(engine)
    stop = StopRule(40, frozenset(engine.eos_ids))  # the model's own EOS (id 1)
    a, h = ar.generate(prompt, stop), hf.generate(prompt, stop)
    assert a.tokens == h.tokens
    assert len(a.tokens) == 40 or a.tokens[-1] == 1
    assert a.target_forwards == len(a.tokens) and a.accepted_per_step == [1] * len(a.tokens)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_autoregressive_equals_hf_generate_with_eos(engine, prompt):
    ar, hf = methods(engine)
    free = ar.generate(prompt, StopRule(40, frozenset())).tokens  # no stop token at all
    eos = free[7]  # a token greedy decoding emits at index 7 (maybe earlier too)
    stop = StopRule(40, frozenset({eos}))
    a, h = ar.generate(prompt, stop), hf.generate(prompt, stop)
    cut = free.index(eos) + 1
    assert a.tokens == free[:cut] == h.tokens
    assert a.tokens[-1] == eos and eos not in a.tokens[:-1]


def test_sampling_is_seeded_and_varies(engine):
    ar, _ = methods(engine, SamplingConfig(do_sample=True, temperature=1.5, top_k=50, top_p=0.9))
    stop = StopRule(20, frozenset())
    one, again, other = (ar.generate(PROMPTS[0], stop, seed=s).tokens for s in (1, 1, 2))
    assert one == again and one != other


def test_committer_stops_inside_a_block():
    c = Committer(StopRule(5, frozenset({9})))
    assert c.add([1, 2, 9, 4]) == 3 and c.done and c.tokens == [1, 2, 9]
    c = Committer(StopRule(3, frozenset()))
    assert c.add([1, 2, 3, 4, 5]) == 3 and c.tokens == [1, 2, 3]


def test_filter_logits_top_k_top_p():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0])
    k = filter_logits(logits, SamplingConfig(top_k=2))
    assert torch.isfinite(k).tolist() == [True, True, False, False]
    # softmax([3,2,1,0]) = [.64,.24,.09,.03]: top_p=0.7 keeps the two tokens that cross 0.7
    p = filter_logits(logits, SamplingConfig(top_p=0.7))
    assert torch.isfinite(p).tolist() == [True, True, False, False]
    t = filter_logits(logits, SamplingConfig(temperature=2.0))
    assert torch.allclose(t, logits / 2)
