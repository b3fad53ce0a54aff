"""Token-tree speculative decoding: greedy output equals autoregressive for drafts that are always
right (the target itself), right only at rank 1 (a chain accepts nothing, a tree does), never
right, right for j tokens, and an independent random model; the tree chosen within the budget;
EOS and max_new_tokens inside an accepted path; the draft cache kept to the accepted path; stats;
refusals (the sampling law every method keeps: tests/test_conformance.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_model_families import PositionLog
from test_speculative import autoregressive
from test_tree import check_cache

from harness.config import SamplingConfig
from harness.engine import Engine, ForwardOutput
from harness.stops import StopRule
from methods.speculative import Speculative, SpeculativeConfig
from methods.speculative_tree import SpeculativeTree, SpeculativeTreeConfig, SpeculativeTreeError

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11]]
N = 40


def tree_method(engine, draft, sampling=GREEDY, **cfg) -> SpeculativeTree:
    return SpeculativeTree(SpeculativeTreeConfig(**cfg), engine, sampling, draft=draft)


class TokenCache:
    """A draft cache that holds token ids instead of keys and values (truncate and keep as KVCache)."""

    def __init__(self):
        self.tokens: list[int] = []

    def __len__(self) -> int:
        return len(self.tokens)

    def truncate(self, length: int) -> None:
        del self.tokens[length:]

    def keep(self, indices) -> None:
        indices = list(indices)
        assert indices == sorted(set(indices)) and all(0 <= i < len(self.tokens) for i in indices)
        self.tokens = [self.tokens[i] for i in indices]


class OracleTreeDraft:
    """A draft that knows the reference sequence: each row's context is read from the mask (the
    cached entries it may see and itself) and checked against its position; when that context
    is a prefix of the reference, the reference's next token is the draft's choice of rank
    ``rank`` (the first ``right`` tokens of a proposal; after that it is ranked last), behind
    fixed arbitrary scores. Same interface as Engine."""

    def __init__(self, target: Engine, reference: list[int], rank: int = 0, right: int = 100):
        self.config, self.tokenizer, self.device = target.config, target.tokenizer, torch.device("cpu")
        self.vocab = target.config.vocab_size
        self.reference, self.rank, self.right = reference, rank, right
        self.scores = torch.randn(self.vocab, generator=torch.Generator().manual_seed(5))
        self.proposal_start = 0  # committed length when the current proposal began

    def new_cache(self) -> TokenCache:
        return TokenCache()

    def forward(self, ids, cache, positions=None, mask=None, hidden=False, last_only=False) -> ForwardOutput:
        ids = torch.as_tensor(ids).flatten().tolist()
        past = len(cache)
        every = cache.tokens + ids
        if mask is None:
            mask = torch.ones(len(ids), past + len(ids), dtype=torch.bool).tril(past)
            self.proposal_start = len(every)  # a catch-up: a new proposal after the committed tokens
        positions = list(range(past, past + len(ids))) if positions is None else torch.as_tensor(positions).tolist()
        rows = []
        for i in range(len(ids)):
            context = [t for t, ok in zip(every, mask[i].tolist()) if ok]
            assert context[-1] == ids[i] and positions[i] == len(context) - 1  # its path, at its position
            logits = self.scores.clone()
            n = len(context)
            if n < len(self.reference) and context == self.reference[:n]:
                truth = self.reference[n]
                order = [t for t in logits.argsort(descending=True).tolist() if t != truth]
                if n - self.proposal_start < self.right and self.rank == 0:
                    logits[truth] = logits[order[0]] + 5  # a confident draft
                elif n - self.proposal_start < self.right:  # between the tokens of ranks r - 1 and r
                    logits[truth] = (logits[order[self.rank - 1]] + logits[order[self.rank]]) / 2
                else:
                    logits[truth] = logits.min() - 1
            rows.append(logits)
        cache.tokens = every
        out = torch.stack(rows)
        return ForwardOutput(logits=out[-1:] if last_only else out)


# ---- greedy equality --------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_target_as_draft_accepts_the_whole_chain(engine, prompt):
    ref = autoregressive(engine, prompt)
    method = tree_method(engine, engine, branching=[1, 1, 1], max_nodes=3)
    end = method.loop(prompt, StopRule(N))
    gen, cache = end.generation, end.draft_cache
    assert gen.tokens == ref
    full, rest = divmod(N - 1, 4)
    assert gen.accepted_per_step == [1] + [4] * full + ([rest] if rest else [])
    assert gen.accepted_per_position == gen.proposed_per_position
    # one draft forward per depth: the catch-up (depth 1's candidates) and two feeds
    assert gen.draft_forwards == 3 * full + (rest - 1 if rest else 0)
    assert len(cache) <= len(prompt) + N - 1
    check_cache(engine, cache, (prompt + ref)[: len(cache)])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_rank_one_drafts_need_a_tree(engine, prompt):
    """The right token is always the draft's second choice: a chain accepts nothing; a tree with
    two children per node and the budget for a full binary tree of depth 3 accepts 3 + 1 a step."""
    ref = prompt + autoregressive(engine, prompt)
    draft = OracleTreeDraft(engine, ref, rank=1)
    chain = Speculative(SpeculativeConfig(gamma=3), engine, GREEDY, draft=draft).generate(prompt, StopRule(N))
    assert chain.tokens == ref[len(prompt) :] and chain.accepted_per_step == [1] * N
    end = tree_method(engine, draft, branching=[2, 2, 2], max_nodes=14).loop(prompt, StopRule(N))
    gen, cache = end.generation, end.draft_cache
    assert gen.tokens == ref[len(prompt) :]
    full, rest = divmod(N - 1, 4)
    assert gen.accepted_per_step == [1] + [4] * full + ([rest] if rest else [])
    assert gen.extra["mean_tree_size"] > 4 and gen.draft_forwards == 3 * full + (rest - 1 if rest else 0)
    assert cache.tokens == ref[: len(cache)] and len(cache) <= len(ref) - 1


@pytest.mark.parametrize("right", [0, 1, 2])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_right_for_j_tokens_then_wrong(engine, prompt, right):
    ref = prompt + autoregressive(engine, prompt)
    draft = OracleTreeDraft(engine, ref, rank=0, right=right)
    end = tree_method(engine, draft, branching=[3, 2, 2, 1], max_nodes=8).loop(prompt, StopRule(N))
    gen, cache = end.generation, end.draft_cache
    assert gen.tokens == ref[len(prompt) :]
    assert max(gen.accepted_per_step[1:]) == right + 1
    assert sum(gen.accepted_per_step) == N and gen.target_forwards == len(gen.accepted_per_step)
    assert gen.accepted_per_position[right:] == [0] * (len(gen.accepted_per_position) - right)
    assert cache.tokens == ref[: len(cache)]


def test_independent_random_draft_equals_autoregressive(engine, tokenizer):
    other = Engine.from_model(tiny_model(len(tokenizer), seed=1), tokenizer)
    for prompt in PROMPTS:
        for branching, budget in (([2, 2, 1], 5), ([4, 1, 1, 1], 3), ([1], 1)):
            end = tree_method(engine, other, branching=branching, max_nodes=budget).loop(prompt, StopRule(N))
            gen, cache = end.generation, end.draft_cache
            assert gen.tokens == autoregressive(engine, prompt)
            assert sum(gen.accepted_per_step) == N and len(gen.accepted_per_step) == gen.target_forwards
            assert gen.extra["mean_tree_size"] <= budget + 1
            check_cache(other, cache, (prompt + gen.tokens)[: len(cache)])


def test_the_tree_is_the_best_scored_nodes(engine):
    """The target as its own draft, a budget of 6 over candidates 3 wide and 3 deep: every tree
    has 6 nodes, the root's children in it are the draft's best, in order, and the best one (the
    target's argmax) is always there, so every step commits at least 2 tokens."""
    prompt = PROMPTS[0]
    method = tree_method(engine, engine, branching=[3, 3, 3], max_nodes=6, score_temperature=1.0)
    drafted = []
    original = method.draft_tree
    method.draft_tree = lambda *a: drafted.append(original(*a)) or drafted[-1]
    gen = method.generate(prompt, StopRule(N))
    assert gen.tokens == autoregressive(engine, prompt)
    assert len(drafted[0].tree.tokens) == 7 and gen.extra["mean_tree_size"] > 6
    assert min(gen.accepted_per_step[1:-1]) >= 2
    first = drafted[0].tree
    probs = torch.softmax(engine.forward(prompt + gen.tokens[:1], engine.new_cache()).logits[-1], dim=-1)
    depth1 = [t for t, p in zip(first.tokens, first.parents) if p == 0]
    assert depth1 == probs.topk(len(depth1)).indices.tolist()  # the best children, best first
    assert len(first.tokens) - 1 - len(depth1) > 0  # and deeper nodes where they score higher


@pytest.mark.parametrize("confidence", [0.0, 0.2, 0.6])
def test_llmcad_confidence_stops_drafting_where_the_draft_is_unsure(engine, confidence):
    """The target as its own draft (every drafted token is accepted), a chain up to 6 deep: each
    step drafts until the path probability of its tokens under the draft falls below
    ``confidence`` (that depth still drafted), so it commits that depth + 1 tokens."""
    import math

    prompt = PROMPTS[0]
    ref = prompt + autoregressive(engine, prompt)
    top = torch.softmax(engine.forward(ref, engine.new_cache()).logits, dim=-1).max(dim=-1).values.tolist()
    expected, length = [1], len(prompt) + 1  # the prefill commits one token
    while length < len(ref):
        room = min(6, len(ref) - length - 1)
        depth, logp = 0, 0.0
        while depth < room:
            logp += math.log(top[length - 1 + depth])
            depth += 1
            if confidence and logp < math.log(confidence):
                break
        expected.append(depth + 1)
        length += depth + 1
    gen = tree_method(engine, engine, branching=[1] * 6, max_nodes=6, confidence=confidence).generate(prompt, StopRule(N))
    assert gen.tokens == ref[len(prompt) :]
    assert gen.accepted_per_step == expected and gen.extra["confidence"] == confidence
    if confidence == 0.6:
        assert min(expected[1:-1]) < 7  # the threshold did stop some steps early


def test_llmcad_confidence_with_an_independent_draft_equals_autoregressive(engine, tokenizer):
    other = Engine.from_model(tiny_model(len(tokenizer), seed=1), tokenizer)
    for prompt in PROMPTS:
        for confidence in (0.05, 0.5):
            method = tree_method(engine, other, branching=[2, 2, 1, 1, 1, 1], max_nodes=8, confidence=confidence)
            end = method.loop(prompt, StopRule(N))
            gen, cache = end.generation, end.draft_cache
            assert gen.tokens == autoregressive(engine, prompt)
            check_cache(other, cache, (prompt + gen.tokens)[: len(cache)])


# ---- stops and limits ----------------------------------------------------------------------------------
def test_stops_inside_an_accepted_path(engine):
    prompt = PROMPTS[2]
    ref = prompt + autoregressive(engine, prompt)
    out = ref[len(prompt) :]
    method = tree_method(engine, OracleTreeDraft(engine, ref), branching=[2, 1, 1, 1], max_nodes=6)
    # max_new_tokens = 8: the prefill gives 1, the first step 5, the second is only 1 deep (room)
    end = method.loop(prompt, StopRule(8))
    gen, cache = end.generation, end.draft_cache
    assert gen.tokens == out[:8] and gen.accepted_per_step == [1, 5, 2]
    assert cache.tokens == ref[: len(cache)]
    at = next(i for i in range(7, 10) if out[i] not in out[:i])  # an EOS inside the second path (6-10)
    stop = StopRule(N, frozenset({out[at]}))
    gen = method.generate(prompt, stop)
    assert gen.tokens == out[: at + 1] == autoregressive(engine, prompt, eos=frozenset({out[at]}))
    assert gen.accepted_per_step == [1, 5, at + 1 - 6] and gen.stop_reason == "eos"


def test_steps_stay_inside_the_context(tokenizer):
    """Trees are never deeper than the tokens still allowed: with prompt + max_new_tokens equal
    to the context, no forward of the target or the draft passes its last position."""
    prompt, n = [0, 17, 42, 99, 5, 23], 20
    model = tiny_model(len(tokenizer), max_position_embeddings=len(prompt) + n)
    engine = PositionLog(model, tokenizer, Engine.from_model(model, tokenizer).cfg, torch.device("cpu"))
    method = tree_method(engine, engine, branching=[2, 2, 2, 2], max_nodes=8)
    assert method.headroom() == 0
    gen = method.generate(prompt, StopRule(n))
    assert gen.tokens == autoregressive(engine, prompt, n)
    assert engine.highest == len(prompt) + n - 2  # the last token is committed, never fed


def test_bad_settings_are_refused(engine):
    with pytest.raises(SpeculativeTreeError, match="branching needs one count >= 1 per depth"):
        tree_method(engine, engine, branching=[2, 0])
    with pytest.raises(SpeculativeTreeError, match="max_nodes must be >= 1"):
        tree_method(engine, engine, max_nodes=0)
    with pytest.raises(SpeculativeTreeError, match="score_temperature must be > 0"):
        tree_method(engine, engine, score_temperature=0)
    with pytest.raises(SpeculativeTreeError, match=r"confidence must be in \[0, 1\) \(0 = off\), got 1.5"):
        tree_method(engine, engine, confidence=1.5)


# ---- sampling ----------------------------------------------------------------------------------------
