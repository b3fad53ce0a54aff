"""Lookahead decoding: the two-branch mask, equality with greedy AR for several (W, N, G)
(N = 2 is plain Jacobi), pool hits on repetitive text, EOS / max_new_tokens inside an accepted
block, the cache after compaction, another family (Qwen2 with a sliding window), bad settings,
the sampling walk against the exact law with a negative control that fails, and the zoo target
on Python / C++ / Go HumanEval-X prompts."""

from __future__ import annotations

import pytest
import torch

from harness.config import ModelConfig, SamplingConfig
from harness.engine import Engine
from harness.paths import ZOO_DIR
from harness.stops import StopRule, StopStrings
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.base import Generation
from methods.lookahead import Filler, Lookahead, LookaheadConfig, LookaheadError, NgramPool, advance, step_layout
from tasks.humaneval_x import HumanEvalX, HumanEvalXConfig
from tests.conftest import tiny_model
from tests.sampling_law import CONTROL_RUNS, PVALUE_FLOOR, RUNS, SAMPLING, sampled_pvalue
from tests.test_medusa import check_cache
from tests.test_model_families import build
from tests.test_tree import ResampleFromP as WrongResidualVerifier

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5, 23], [0, 200, 11, 11, 64, 150, 7, 9, 250, 33], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
N = 40
SETTINGS = [  # (window W, ngram N, candidates G, context_pool)
    (1, 2, 0, False),  # plain Jacobi with a one-token window
    (5, 2, 3, False),  # plain Jacobi + 2-grams
    (4, 3, 4, False),
    (3, 4, 2, True),
    (6, 5, 6, True),
]


def ar(engine: Engine, prompt: list[int], stop: StopRule) -> list[int]:
    return Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop).tokens


def lookahead(engine: Engine, w: int = 4, n: int = 3, g: int = 4, context: bool = False, sampling=GREEDY) -> Lookahead:
    return Lookahead(LookaheadConfig(window=w, ngram=n, candidates=g, context_pool=context), engine, sampling)


def repetitive(engine: Engine, prompt: list[int]) -> list[int]:
    """The prompt and its greedy continuation: a random model loops, so the text repeats."""
    return prompt + ar(engine, prompt, StopRule(40))


def blocks(gen: Generation) -> list[tuple[int, int]]:
    """(index of the first token, tokens) committed by each verify step (the prefill left out)."""
    out, start = [], gen.accepted_per_step[0]
    for n in gen.accepted_per_step[1:]:
        out.append((start, n))
        start += n
    return out


# ---- the step's layout -------------------------------------------------------------------------
def test_two_branch_mask_hand_checked():
    # W = 2, two levels (N = 3), one candidate: rows x, (0,0), (0,1), (1,0), (1,1), c0, c1
    layout = step_layout(2, 2, 1, 3)
    assert layout.offsets.tolist() == [0, 1, 2, 2, 3, 1, 2]
    assert layout.mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],  # x
        [1, 1, 0, 0, 0, 0, 0],  # level 0 is causal after x
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],  # level 1 column 0: level 0 up to column 0, then itself
        [1, 1, 1, 0, 1, 0, 0],  # level 1 column 1: level 0 up to column 1, then itself
        [1, 0, 0, 0, 0, 1, 0],  # the candidate: x, then causal inside; it sees no window row
        [1, 0, 0, 0, 0, 1, 1],
    ]
    # N = 4, W = 1: column 0 of levels 0, 1, 2 is one diagonal at consecutive positions
    deep = step_layout(1, 3, 0, 4)
    assert deep.offsets.tolist() == [0, 1, 2, 3]
    assert deep.mask.int().tolist() == torch.tril(torch.ones(4, 4)).int().tolist()
    # N = 2: the lookahead branch is plain Jacobi's causal block after x
    jacobi = step_layout(3, 1, 2, 2)
    assert jacobi.offsets.tolist() == [0, 1, 2, 3, 1, 1]
    assert jacobi.mask[:4, :4].int().tolist() == torch.tril(torch.ones(4, 4)).int().tolist()
    assert jacobi.mask[4:].int().tolist() == [[1, 0, 0, 0, 1, 0], [1, 0, 0, 0, 0, 1]]
    assert step_layout(2, 2, 1, 3) is layout  # built once per shape


def test_window_moves_with_the_committed_tokens():
    fill = Filler([90, 91], start=0)
    # full window (2 levels kept, N = 3): the oldest level goes, 3 committed tokens shift by 2
    levels = advance([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12]], keep=2, committed=3, fill=fill)
    assert levels == [[7, 8, 90, 91], [11, 12, 90, 91]]
    # warm-up (no level dropped): one committed token shifts by one
    assert advance([[1, 2, 3], [4, 5, 6]], keep=2, committed=1, fill=Filler([7], 0)) == [[2, 3, 7], [5, 6, 7]]
    # plain Jacobi (N = 2): the new iterate, shifted by the accepted guesses
    assert advance([[1, 2, 3], [4, 5, 6]], keep=1, committed=2, fill=Filler([9], 0)) == [[5, 6, 9]]


def test_pool_is_bounded_and_most_recent_first():
    pool = NgramPool(2)
    for rest in ((1, 2), (3, 4), (1, 2), (5, 6)):
        pool.add(7, rest)
    assert pool.get(7) == [(5, 6), (1, 2)] and pool.get(8) == []
    pool.add_from([1, 2, 3, 1, 2, 4], 3)
    assert pool.get(1) == [(2, 4), (2, 3)] and pool.get(3) == [(1, 2)]
    assert NgramPool(0).get(1) == [] and len(NgramPool(0)) == 0


def test_bad_settings_are_refused(engine):
    for kw, field in ((dict(window=0), "window"), (dict(ngram=1), "ngram"), (dict(candidates=-1), "candidates")):
        with pytest.raises(LookaheadError, match=f"method.lookahead.{field}"):
            Lookahead(LookaheadConfig(**kw), engine, GREEDY)


# ---- equality with greedy AR -----------------------------------------------------------------
IDS = [f"W{w}-N{n}-G{g}{'-ctx' * context}" for w, n, g, context in SETTINGS]


@pytest.mark.parametrize("w, n, g, context", SETTINGS, ids=IDS)
def test_equals_greedy_autoregressive(engine, w, n, g, context):
    stop = StopRule(N)
    for prompt in PROMPTS + [repetitive(engine, PROMPTS[0])]:
        end = lookahead(engine, w, n, g, context).loop(prompt, stop)
        gen, cache = end.generation, end.cache
        assert gen.tokens == ar(engine, prompt, stop)
        assert sum(gen.accepted_per_step) == len(gen.tokens) == N
        assert gen.target_forwards == len(gen.accepted_per_step)
        drafted = gen.extra["accepted_from_pool"] + gen.extra["accepted_from_window"]
        assert sum(gen.accepted_per_position) == drafted
        # every step commits its drafted tokens and one more, but the last may be cut before that one
        assert N - gen.target_forwards <= drafted <= N - gen.target_forwards + 1
        assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))
        assert 1 + w <= gen.extra["mean_step_tokens"] <= 1 + (w + g) * (n - 1)
        check_cache(engine, cache, prompt + gen.tokens[:-1])


@pytest.mark.parametrize("start", PROMPTS)
def test_repetitive_text_hits_the_pool_and_saves_forwards(engine, start):
    """The prompt ends inside the loop its greedy continuation keeps going round: n-grams from
    the Jacobi window are accepted after the warm-up; with the prompt's n-grams in the pool
    (context_pool) already in the first step."""
    prompt = repetitive(engine, repetitive(engine, start))
    stop = StopRule(N)
    reference = Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop)
    runs = {context: lookahead(engine, 4, 3, 4, context).generate(prompt, stop) for context in (False, True)}
    for gen in runs.values():
        assert gen.tokens == reference.tokens
        assert gen.extra["accepted_from_pool"] > 0 and max(gen.accepted_per_step) == 3  # full n-grams accepted
        assert gen.target_forwards < reference.target_forwards
    assert runs[False].accepted_per_step[1] == 1  # warm-up: the pool is still empty
    assert runs[True].accepted_per_step[1] == 3
    assert runs[True].target_forwards < runs[False].target_forwards


@torch.inference_mode()
def plain_jacobi(engine: Engine, prompt: list[int], window: int, count: int) -> list[int]:
    """Tokens committed per step by textbook Jacobi decoding, written out without a cache: run
    the whole sequence + the W guesses causally, accept the guesses that equal the argmax
    before them plus one more token, and take the remaining outputs as the next guesses (the
    freed columns filled as lookahead fills them)."""
    fill = Filler(prompt, start=len(prompt) - window)
    guesses = fill.take(window)
    seq = prompt + [int(engine.model(torch.tensor([prompt])).logits[0, -1].argmax())]
    steps = []
    while len(seq) - len(prompt) < count:
        best = engine.model(torch.tensor([seq + guesses])).logits[0, len(seq) - 1 :].argmax(dim=-1).tolist()
        a = 0
        while a < window and guesses[a] == best[a]:
            a += 1
        seq += best[: a + 1]
        steps.append(a + 1)
        guesses = best[a + 1 :] + fill.take(a)
    return steps


def test_n2_without_a_pool_is_plain_jacobi(engine):
    """N = 2, G = 0: only the window's own guesses are verified, step for step as Jacobi decoding."""
    accepted = 0
    for prompt in PROMPTS + [repetitive(engine, PROMPTS[0])]:
        gen = lookahead(engine, 5, 2, 0).generate(prompt, StopRule(N))
        assert gen.tokens == ar(engine, prompt, StopRule(N))
        assert gen.extra["accepted_from_pool"] == 0 and gen.extra["mean_verified"] == 0
        assert gen.extra["mean_step_tokens"] == 6
        expected = plain_jacobi(engine, prompt, 5, N)
        assert gen.accepted_per_step[1:-1] == expected[: len(gen.accepted_per_step) - 2]  # the last one may be cut
        accepted += gen.extra["accepted_from_window"]
    assert accepted > 0  # a guess was right somewhere, so the comparison covers the window's shift


def test_eos_and_max_new_tokens_inside_an_accepted_block(engine):
    found = 0
    for start_prompt in PROMPTS:
        prompt = repetitive(engine, start_prompt)
        ref = ar(engine, prompt, StopRule(N))
        method = lookahead(engine, 4, 3, 4)
        full = method.generate(prompt, StopRule(N))
        inside = [(s, k) for s, n in blocks(full) if n >= 3 for k in range(s, s + n - 1)]  # not a block's last token
        for s, k in inside:
            if ref[k] in ref[:k]:
                continue  # autoregressive decoding would stop earlier at this EOS
            gen = method.generate(prompt, StopRule(N, frozenset({ref[k]})))
            assert gen.tokens == ref[: k + 1] and gen.stop_reason == "eos"
            assert gen.accepted_per_step[-1] == k + 1 - s and sum(gen.accepted_per_step) == k + 1
            found += 1
            break
        s, k = inside[0]
        gen = method.generate(prompt, StopRule(k + 1))
        assert gen.tokens == ref[: k + 1] and gen.stop_reason == "max_new_tokens"
        assert gen.accepted_per_step[-1] == k + 1 - s
    assert found >= 1


def test_another_family_with_a_sliding_window():
    """Qwen2 mixing full and sliding-window layers (window 8 < the 40 tokens): the window is
    applied to the two-branch mask too, so lookahead still equals greedy decoding."""
    engine = build("qwen2", seed=0)
    prompt = [0, 5, 9, 13, 5, 9, 13, 5]
    for w, n, g, context in ((4, 3, 4, True), (5, 2, 2, False)):
        end = lookahead(engine, w, n, g, context).loop(prompt, StopRule(N))
        gen, cache = end.generation, end.cache
        assert gen.tokens == ar(engine, prompt, StopRule(N)) and len(gen.tokens) == N
        assert gen.target_forwards < N  # something was accepted
        assert len(cache) == len(prompt) + N - 1


def test_context_limit_counts_the_window(engine):
    method = lookahead(engine, 5, 4, 2)
    assert method.headroom() == 6
    with pytest.raises(ValueError, match="exceed the model's context"):
        method.generate([0] * 500, StopRule(8))  # 500 + 8 + 6 > 512


# ---- sampling --------------------------------------------------------------------------------
class ResampleFromP(Lookahead):
    """The negative control: the shared tree step with the rule broken (when every child of a
    node is rejected, the token is drawn from p itself instead of p without those children)."""

    verifier_class = WrongResidualVerifier


def test_sampling_matches_the_target_distribution_over_several_steps():
    """The law of the first five tokens on an 8-token model with peaked distributions
    (tests/sampling_law.py). W = 2 and N = 3 commit at most three tokens a step, so those
    tokens always take two or more steps; the prompt seeds the pool, so the root has several
    children (window and pool candidates) from the first step on (two or more in 63% of the
    steps). Calibrated: p = 0.18 and 0.67 for seeds 0-1499 and 5000-6499; the resample-from-p
    rule gives p = 6e-14 at 800 runs."""
    model = tiny_model(8, seed=3, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    engine, prompt = Engine.from_model(model, None), [0, 3, 5, 3, 5, 7, 3, 5]
    cfg = LookaheadConfig(window=2, ngram=3, candidates=3, context_pool=True)
    method = Lookahead(cfg, engine, SAMPLING)
    gen = method.generate(prompt, StopRule(20), seed=1)
    assert gen.extra["acceptance"] == "rejection" and not gen.lossy and len(gen.tokens) == 20
    assert gen.tokens == method.generate(prompt, StopRule(20), seed=1).tokens  # seeded
    pvalue, multi_step = sampled_pvalue(method, engine, RUNS, length=5, prompt=prompt)
    assert pvalue > PVALUE_FLOOR and multi_step == 1.0
    control = ResampleFromP(cfg, engine, SAMPLING)
    assert sampled_pvalue(control, engine, CONTROL_RUNS, length=5, prompt=prompt)[0] < PVALUE_FLOOR


def test_zoo_target_on_humaneval_x_prompts():
    """The shipped target on a Python, a C++ and a Go HumanEval-X prompt with each language's
    default stop strings and EOS: token-exact with the defaults and with plain Jacobi."""
    engine = Engine.load(ModelConfig(name="zoo-target", path=str(ZOO_DIR / "target")))
    task = HumanEvalX(HumanEvalXConfig(languages=["python", "cpp", "go"], limit=1))

    def decode(ids: list[int]) -> str:
        return engine.tokenizer.decode(ids, skip_special_tokens=True)

    for sample in task.samples():
        prompt = engine.tokenizer(sample.turns[0]).input_ids
        stop = StopRule(48, frozenset(engine.eos_ids), StopStrings(task.stop_strings(sample), decode))
        ref = Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop)
        for method in (Lookahead(LookaheadConfig(), engine, GREEDY), lookahead(engine, 4, 2, 0)):
            gen = method.generate(prompt, stop)
            assert gen.tokens == ref.tokens and gen.stop_reason == ref.stop_reason, sample.id
    assert {s.language for s in task.samples()} == {"python", "cpp", "go"}
