"""The shared tree step (methods/tree.py): shapes, tries, greedy exactness with trees that
are right for j tokens on one branch among wrong ones, stop rules inside an accepted path,
cache compaction, the per-depth counts, and both sampling rules (one-hot candidates and
children drawn from q) against the target distribution, each with a negative control."""

from __future__ import annotations

import random

import pytest
import torch
from test_speculative import autoregressive

from harness.config import SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.tree import DraftTree, TreeError, TreeVerifier, tree_shape

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5, 23], [0, 200, 11, 11, 64, 150, 7, 9, 250, 33]]


def check_cache(engine: Engine, cache, seq: list[int]) -> None:
    """The compacted cache equals a plain prefill of ``seq``."""
    fresh = engine.new_cache()
    engine.forward(seq, fresh)
    assert len(cache) == len(seq)
    for a, b in zip(cache.inner.layers, fresh.inner.layers):
        torch.testing.assert_close(a.keys, b.keys, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.values, b.values, atol=1e-4, rtol=1e-4)


def test_shape_hand_checked():
    shape = tree_shape((-1, 0, 0, 1, 1, 2, 3))
    assert shape.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert shape.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())
    assert shape.paths == ((0, 1, 3, 6), (0, 1, 4), (0, 2, 5))
    assert shape.max_depth == 3 and shape.size == 7
    assert shape.mask[6].int().tolist() == [1, 1, 0, 1, 0, 0, 1]  # itself and its ancestors 3, 1, 0
    assert shape.mask[5].int().tolist() == [1, 0, 1, 0, 0, 1, 0]
    assert tree_shape((-1, 0, 0, 1, 1, 2, 3)) is shape  # built once per shape
    assert tree_shape((-1,)).max_depth == 0
    with pytest.raises(TreeError, match="root"):
        tree_shape((0, -1))
    with pytest.raises(TreeError, match="node 2 has parent 2"):
        tree_shape((-1, 0, 2))
    with pytest.raises(TreeError, match="3 node tokens for 2 parents"):
        DraftTree([1, 2, 3], (-1, 0))


def test_trie_merges_shared_prefixes():
    tree = DraftTree.from_sequences(7, [[1, 2, 3], [1, 2, 4], [5], [1, 6], []])
    assert list(tree.tokens) == [7, 1, 2, 3, 4, 5, 6]
    assert tree.parents == (-1, 0, 1, 2, 2, 0, 1)
    capped = DraftTree.from_sequences(7, [[1, 2, 3], [1, 2, 4], [5]], max_nodes=3)
    assert list(capped.tokens) == [7, 1, 2, 3] and capped.parents == (-1, 0, 1, 2)


def test_compaction_keeps_the_accepted_rows_and_moves_only_those_out_of_place(engine):
    """``KVCache.keep_after`` (the tree step's compaction) equals ``keep`` of prefix + rows; rows
    already in place are not copied (one ``_move``, from the first row out of place on)."""
    prompt, tree = PROMPTS[1], [5, 6, 7, 8]
    past = len(prompt)
    shape = tree_shape((-1, 0, 0, 2))
    mask = torch.cat((torch.ones(4, past, dtype=torch.bool), shape.mask), dim=1)
    for rows, moved in (([], None), ([0, 1], None), ([0, 2, 3], [2, 3]), ([1], [1])):
        caches = [engine.new_cache() for _ in range(2)]
        for cache in caches:
            engine.forward(prompt, cache)
            engine.forward(tree, cache, positions=shape.depth + past, mask=mask)
        calls, move = [], caches[1]._move
        caches[1]._move = lambda start, src: calls.append(src.tolist()) or move(start, src)
        caches[0].keep(list(range(past)) + [past + r for r in rows])
        caches[1].keep_after(past, [past + r for r in rows])
        assert len(caches[1]) == past + len(rows) and calls == ([] if moved is None else [[past + r for r in moved]])
        for a, b in zip(caches[0].inner.layers, caches[1].inner.layers):
            assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)
    for bad in ([past + 2, past + 1], [past - 1], [past + 4]):
        with pytest.raises(ValueError, match="strictly increasing rows"):
            caches[1].keep_after(past, bad)


def oracle(ref: list[int], right: int, rng: random.Random, vocab: int, depth: int = 4):
    """A proposer whose tree holds the true continuation for ``right`` tokens on one branch
    (then wrong tokens), beside wrong branches, in a random order."""

    def propose(seq: list[int]) -> DraftTree:
        truth = ref[len(seq) : len(seq) + depth]
        if not truth:
            return DraftTree([seq[-1]], (-1,))
        good = truth[:right] + [(t + 1) % vocab for t in truth[right:]]
        branches = [good]
        for _ in range(rng.randrange(0, 3)):
            first = rng.choice([t for t in range(vocab) if t != truth[0]])
            branches.append([first] + [rng.randrange(vocab) for _ in range(rng.randrange(0, depth))])
        rng.shuffle(branches)
        return DraftTree.from_sequences(seq[-1], branches)

    return propose


def tree_decode(engine, prompt, stop, propose) -> TreeVerifier:
    v = TreeVerifier(engine, GREEDY, stop, prompt, seed=0)
    v.prefill()
    while not v.done:
        v.verify(propose(v.seq))
    return v


@pytest.mark.parametrize("right", [0, 1, 2, 4])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_autoregressive(engine, prompt, right):
    n = 30
    ref = prompt + autoregressive(engine, prompt, n + 8)
    v = tree_decode(engine, prompt, StopRule(n, frozenset()), oracle(ref, right, random.Random(right), engine.config.vocab_size))
    gen = v.result()
    assert gen.tokens == ref[len(prompt) : len(prompt) + n]
    assert sum(gen.accepted_per_step) == n and gen.target_forwards == len(gen.accepted_per_step)
    assert all(c <= right + 1 for c in gen.accepted_per_step)
    if right:
        assert max(gen.accepted_per_step) == right + 1
    assert len(gen.accepted_per_position) == len(gen.proposed_per_position) == 4
    assert gen.accepted_per_position[0] == (len(gen.accepted_per_step) - 1 if right else 0)
    assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))
    check_cache(engine, v.cache, prompt + gen.tokens[:-1])


def test_stops_inside_an_accepted_path(engine):
    prompt = PROMPTS[1]
    ref = prompt + autoregressive(engine, prompt, 40)
    out = ref[len(prompt) :]
    propose = oracle(ref, 4, random.Random(0), engine.config.vocab_size)
    # max_new_tokens = 7: the prefill gives 1, the first step 5, the second is cut after 1
    v = tree_decode(engine, prompt, StopRule(7, frozenset()), propose)
    assert v.result().tokens == out[:7] and v.per_step == [1, 5, 1]
    check_cache(engine, v.cache, ref[: len(prompt) + 6])
    # EOS in the middle of the second step's path: nothing after it
    at = next(i for i in range(7, 10) if out[i] not in out[:i])
    stop = StopRule(40, frozenset({out[at]}))
    v = tree_decode(engine, prompt, stop, propose)
    assert v.result().tokens == out[: at + 1] == autoregressive(engine, prompt, 40, eos=frozenset({out[at]}))
    assert v.per_step == [1, 5, at + 1 - 6] and v.result().stop_reason == "eos"


# ---- sampling rules (unit level: the law of the first committed token) ----------------------
P_ROOT = torch.tensor([0.4, 0.1, 0.15, 0.05, 0.3])


class ResampleFromP(TreeVerifier):
    """The negative control: after every child is rejected the token comes from p itself
    instead of what is left of p, so rejected children come back too often."""

    def residual_token(self, rest, p_node):
        return int(torch.multinomial(p_node, 1, generator=self.gen))


def first_token_law(verifier: TreeVerifier, make_tree, runs: int = 6000) -> torch.Tensor:
    counts = torch.zeros(len(P_ROOT))
    for _ in range(runs):
        tree = make_tree()
        shape = tree_shape(tree.parents)
        p = torch.softmax(torch.randn(shape.size, len(P_ROOT)), dim=-1)
        p[0] = P_ROOT
        _nodes, new = verifier._sample_walk(tree, shape, p)
        counts[new[0]] += 1
    return counts / runs


@pytest.mark.parametrize("control", [False, True])
def test_one_hot_candidates_keep_the_target_distribution(engine, control):
    cls = ResampleFromP if control else TreeVerifier
    v = cls(engine, SamplingConfig(do_sample=True), StopRule(5, frozenset()), [0], seed=0)
    torch.manual_seed(0)
    tree = DraftTree([9, 0, 1, 2, 3, 0], (-1, 0, 0, 0, 0, 1))  # token 4 is no child of the root
    tv = float((first_token_law(v, lambda: tree) - P_ROOT).abs().sum() / 2)
    assert (tv > 0.1) if control else (tv < 0.03)


@pytest.mark.parametrize("control", [False, True])
def test_children_drawn_from_q_keep_the_target_distribution(engine, control):
    """SpecInfer's rule: three children drawn i.i.d. from q (repeats allowed)."""
    cls = ResampleFromP if control else TreeVerifier
    v = cls(engine, SamplingConfig(do_sample=True), StopRule(5, frozenset()), [0], seed=0)
    q_root = torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05])
    draws = torch.Generator().manual_seed(1)
    torch.manual_seed(0)

    def make_tree():
        kids = torch.multinomial(q_root, 3, replacement=True, generator=draws).tolist()
        q = torch.full((4, len(q_root)), 1 / len(q_root))
        q[0] = q_root
        return DraftTree([9, *kids], (-1, 0, 0, 0), q=q)

    tv = float((first_token_law(v, make_tree) - P_ROOT).abs().sum() / 2)
    assert (tv > 0.05) if control else (tv < 0.03)
