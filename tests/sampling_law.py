"""The sampling tests' shared yardstick: the exact law of a tiny model's first tokens and a
chi-square test of a method's samples against it (the verifiers' tests, and every method's in
tests/test_conformance.py).

Every method's first ``length`` tokens over ``runs`` seeds are compared with the law of
plain autoregressive sampling, computed exactly by enumerating every prefix. Each test picks
a proposal size small against ``length`` so that those tokens span several verify steps:
``Draws.multi_step`` says in how many runs they did, and the tests require most, so a cache
rolled back or compacted after a sampled rejection is part of what is checked, not only the
first block. A wrong acceptance rule (the negative controls) fails the same test.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from conftest import tiny_model

from harness.config import SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.base import probabilities

# A random Llama over 8 tokens with large weights, so distributions are far from uniform and
# a draft from another seed disagrees with the target.
V = 8
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, initializer_range=0.3, eos_token_id=None, pad_token_id=None)  # fmt: skip
SAMPLING = SamplingConfig(do_sample=True, temperature=0.9, top_k=6)
SAMPLE_PROMPT = [0, 3, 5, 3, 5, 7, 3, 5]  # repeats, so prompt lookup finds matches
LENGTH = 4  # tokens counted per run: with one- or two-token proposals, at least two verify steps
RUNS = 1500  # seeds 0..RUNS-1: deterministic
CONTROL_RUNS = 800  # the negative controls fail with fewer
PVALUE_FLOOR = 1e-3
# Each verifier's rules are tested at full strength, with failing controls (ChainVerifier:
# test_speculative, test_space; TreeVerifier: test_tree, test_lookahead). Every method then
# checks only its own part (proposals, the cache after a sampled rejection) end to end, with
# fewer runs (tests/test_conformance.py): CI time. A wrong rule still fails at this count.
METHOD_RUNS = 400


def small_engine(seed: int) -> Engine:
    return Engine.from_model(tiny_model(V, seed=seed, **SMALL), None)


@torch.inference_mode()
def exact_law(engine: Engine, prompt: list[int], length: int, sampling: SamplingConfig) -> torch.Tensor:
    """P(first ``length`` tokens) under autoregressive sampling, as a flat [vocab**length] tensor."""
    vocab = engine.config.vocab_size
    law = torch.ones(1)
    for depth in range(length):
        prefixes = torch.tensor(list(itertools.product(range(vocab), repeat=depth)), dtype=torch.long)
        prefixes = prefixes.reshape(vocab**depth, depth)
        ids = torch.cat((torch.tensor(prompt).expand(len(prefixes), -1), prefixes), dim=1)
        probs = probabilities(engine.model(input_ids=ids).logits[:, -1], sampling)
        law = (law[:, None] * probs).flatten()
    return law


@dataclass
class Draws:
    counts: torch.Tensor  # [vocab**length] how often each sequence of the first `length` tokens came out
    multi_step: float  # share of runs whose first `length` tokens took two or more verify steps


def draw(method, prompt: list[int], length: int, runs: int) -> Draws:
    """The first ``length`` tokens of ``runs`` seeded generations (one token more is generated,
    so the last counted token may sit inside a verified block, not only at its end)."""
    vocab = method.engine.config.vocab_size
    counts = torch.zeros(vocab**length)
    multi = 0
    for seed in range(runs):
        gen = method.generate(prompt, StopRule(length + 1), seed=seed)
        tokens = gen.tokens[:length]
        counts[sum(t * vocab ** (length - 1 - i) for i, t in enumerate(tokens))] += 1
        committed, forwards = 0, 0  # target forwards (prefill first) until `length` tokens were committed
        for n in gen.accepted_per_step:
            committed, forwards = committed + n, forwards + 1
            if committed >= length:
                break
        multi += forwards >= 3  # the prefill and at least two verify steps
    return Draws(counts, multi / runs)


def chi_square_pvalue(counts: torch.Tensor, law: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson's chi-square of counts against an exact law, cells with expected count
    below ``min_expected`` pooled into one; an observation in a zero-probability cell fails."""
    expected = law.double() * counts.sum()
    if bool((counts[law == 0] > 0).any()):
        return 0.0
    big = expected >= min_expected
    obs = torch.cat((counts.double()[big], counts.double()[~big].sum().view(1)))
    exp = torch.cat((expected[big], expected[~big].sum().view(1)))
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    half = torch.tensor([dof / 2.0, stat / 2.0], dtype=torch.float64)
    return float(torch.special.gammaincc(half[0], half[1]))  # P(chi2_dof >= stat)


def sampled_pvalue(method, engine: Engine, runs: int, length: int = LENGTH, prompt=SAMPLE_PROMPT) -> tuple[float, float]:
    """(p-value of ``runs`` seeded samples against the exact law, share of multi-step runs)."""
    law = exact_law(engine, prompt, length, method.sampling)
    draws = draw(method, prompt, length, runs)
    return chi_square_pvalue(draws.counts, law), draws.multi_step
