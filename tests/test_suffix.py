"""Suffix decoding: the bounded-depth suffix trie against brute-force substring counts
(adding, removing, the global FIFO bound), matching, the greedy speculation tree, greedy
output equal to autoregressive (repetitive prompts: local hits; a repeated request: global
hits), max_new_tokens inside an accepted path, stats, and determinism for a sample order
(stop rules and the sampling law every method keeps: tests/test_conformance.py)."""

from __future__ import annotations

import random
from types import SimpleNamespace
from collections import Counter

import pytest
from test_speculative import autoregressive
from test_tree import check_cache

from harness.config import SamplingConfig
from harness.registry import METHODS
from harness.stops import StopRule
from methods.suffix import ROOT, Follower, Suffix, SuffixConfig, SuffixTrie, grow

PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
N = 60
GREEDY = SamplingConfig()


def suffix(engine, sampling=GREEDY, **cfg) -> Suffix:
    return Suffix(SuffixConfig(**cfg), engine, sampling)


def substring_counts(seqs: list[list[int]], depth: int) -> Counter:
    """Brute force: occurrences of every substring of 1..depth tokens inside each sequence."""
    counts: Counter = Counter()
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(i + depth, len(s)) + 1):
                counts[tuple(s[i:j])] += 1
    return counts


def trie_counts(trie: SuffixTrie) -> Counter:
    counts: Counter = Counter()

    def walk(node: int, path: tuple) -> None:
        for t, child in trie.children(node):
            assert trie.count[child] > 0 and trie.child(node, t) == child
            counts[path + (t,)] = trie.count[child]
            walk(child, path + (t,))

    walk(ROOT, ())
    assert len(trie.edges) == len(counts)  # no edge left to a removed node
    return counts


def check_stats(gen, n: int) -> None:
    assert sum(gen.accepted_per_step) == len(gen.tokens) == n
    assert len(gen.accepted_per_step) == gen.target_forwards and gen.draft_forwards == 0
    assert len(gen.accepted_per_position) == len(gen.proposed_per_position)
    assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))
    assert gen.extra["local_trees"] + gen.extra["global_trees"] <= gen.target_forwards - 1


# ---- the trie ------------------------------------------------------------------------------
def test_trie_counts_match_brute_force_when_adding_and_removing():
    rng = random.Random(0)
    for _ in range(100):
        depth = rng.randrange(1, 6)
        trie = SuffixTrie(depth)
        seqs = [[rng.randrange(3) for _ in range(rng.randrange(0, 15))] for _ in range(rng.randrange(1, 5))]
        for s in seqs:
            appender = trie.appender()
            cut = rng.randrange(len(s) + 1)  # in two pieces, as decoding appends
            appender.extend(s[:cut])
            appender.extend(s[cut:])
        assert trie_counts(trie) == substring_counts(seqs, depth)
        assert trie.count[ROOT] == sum(len(s) for s in seqs)
        gone = seqs.pop(rng.randrange(len(seqs)))
        trie.remove(gone)
        assert trie_counts(trie) == substring_counts(seqs, depth)
        assert trie.count[ROOT] == sum(len(s) for s in seqs)


def test_matches_are_the_occurring_context_suffixes():
    rng = random.Random(1)
    for _ in range(200):
        depth = rng.randrange(2, 7)
        seq = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]
        trie = SuffixTrie(depth)
        trie.add(seq)
        context = [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
        found = trie.matches(context)
        counts = substring_counts([seq], depth)
        want = []
        for m in range(1, min(depth - 1, len(context)) + 1):
            if not counts[tuple(context[-m:])]:
                break
            want.append(m)
        assert [m for m, _ in found] == want
        assert all(trie.count[node] == counts[tuple(context[-m:])] for m, node in found)


def test_followed_matches_equal_looked_up_ones():
    """The appender's active nodes are the matches of its own sequence; a follower's are those
    of a context extended in pieces (in a fixed trie), as ``matches`` finds them from the root."""
    rng = random.Random(3)
    for _ in range(200):
        depth = rng.randrange(2, 7)
        trie = SuffixTrie(depth)
        trie.add([rng.randrange(3) for _ in range(rng.randrange(0, 30))])
        follower, context = Follower(trie), []
        local = SuffixTrie(depth)
        appender = local.appender()
        for _ in range(rng.randrange(1, 6)):
            piece = [rng.randrange(3) for _ in range(rng.randrange(0, 2 * depth))]
            context += piece
            follower.extend(piece)
            appender.extend(piece)
            assert follower.matches() == trie.matches(context)
            assert appender.matches() == local.matches(context)


def test_speculation_tree_hand_checked():
    """After "1 2": 2 -> 3 (twice), 2 -> 4 (once); 3 -> 5 (twice); 4 -> 6."""
    trie = SuffixTrie(6)
    trie.add([2, 3, 5, 2, 3, 5, 2, 4, 6, 2])
    node = trie.find([2])  # count 4 (the last 2 has nothing after it)
    tree, score = grow(2, node, budget=10, min_prob=0.0, max_depth=2, trie=trie)
    # path probabilities: 3 = 2/4, 3 5 = 2/4 * 2/2, 4 = 1/4, 4 6 = 1/4 * 1/1
    assert tree.tokens == [2, 3, 5, 4, 6] and tree.parents == (-1, 0, 1, 0, 3) and score == pytest.approx(1.5)
    small, small_score = grow(2, node, budget=2, min_prob=0.0, max_depth=5, trie=trie)
    assert small.tokens == [2, 3, 5] and small_score == pytest.approx(1.0)
    pruned, _ = grow(2, node, budget=10, min_prob=0.3, max_depth=5, trie=trie)
    assert pruned.tokens == [2, 3, 5, 2]  # 3 5 2 = 2/4; the rest (4; 3 5 2 3 and 3 5 2 4) 1/4 < 0.3
    shallow, _ = grow(2, node, budget=10, min_prob=0.0, max_depth=1, trie=trie)
    assert shallow.tokens == [2, 3, 4] and shallow.parents == (-1, 0, 0)


def test_speculation_tree_is_greedy_by_path_probability():
    rng = random.Random(2)
    for _ in range(100):
        trie = SuffixTrie(5)
        trie.add([rng.randrange(3) for _ in range(40)])
        node = trie.find([rng.randrange(3)])
        if node == -1:
            continue
        budget = rng.randrange(1, 12)
        tree, score = grow(9, node, budget, min_prob=0.05, max_depth=3, trie=trie)
        probs, nodes = [1.0], [node]
        for i in range(1, len(tree.tokens)):
            parent = tree.parents[i]
            assert 0 <= parent < i
            child = trie.child(nodes[parent], tree.tokens[i])
            probs.append(probs[parent] * trie.count[child] / trie.count[nodes[parent]])
            nodes.append(child)
        assert len(tree.tokens) - 1 <= budget and score == pytest.approx(sum(probs[1:]))
        assert all(p >= 0.05 for p in probs)
        assert all(a >= b - 1e-12 for a, b in zip(probs[1:], probs[2:]))  # added most probable first


def test_speculate_grows_only_matches_that_can_win(monkeypatch):
    """The best tree over both tries equals the brute-force one (every match grown, the best
    by score, then match length, then local before global), with fewer trees grown."""
    import methods.suffix as module

    grown = []
    monkeypatch.setattr(module, "grow", lambda *a: grown.append(a) or grow(*a))
    rng = random.Random(4)
    brute_count = 0
    for _ in range(300):
        cfg = SuffixConfig(max_depth=rng.randrange(3, 8), max_spec_factor=rng.choice([0.5, 1.0, 4.0]),
                           max_nodes=rng.randrange(1, 10), min_token_prob=rng.choice([0.0, 0.1, 0.3]))  # fmt: skip
        local, glob = SuffixTrie(cfg.max_depth), SuffixTrie(cfg.max_depth)
        glob.add([rng.randrange(3) for _ in range(rng.randrange(0, 40))])
        context = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
        local.add(context)
        room = rng.randrange(1, 6)
        sources = (("local", local, local.matches(context)), ("global", glob, glob.matches(context)))
        want = None
        for source, trie, matches in sources:
            for m, node in matches:
                budget = min(cfg.max_nodes, int(cfg.max_spec_factor * m + 1e-6))
                if budget >= 1 and trie.first[node] != -1:
                    brute_count += 1
                    tree, score = grow(context[-1], node, budget, cfg.min_token_prob, room, trie)
                    if len(tree.tokens) > 1 and (want is None or (score, m) > want[1:3]):
                        want = (tree, score, m, source)
        best = Suffix.speculate(SimpleNamespace(cfg=cfg), context[-1], room, sources)
        if want is None:
            assert best is None
        else:
            assert (best.tree, best.score, best.match, best.source) == want
    assert 0 < len(grown) < brute_count


# ---- equality with greedy AR ---------------------------------------------------------------
def repetitive(engine, prompt: list[int]) -> list[int]:
    """The prompt followed by its greedy continuation: a random model loops, so the local trie hits."""
    return prompt + autoregressive(engine, prompt, n=40)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("kind", ["plain", "repetitive"])
def test_equals_greedy_autoregressive(engine, prompt, kind):
    if kind == "repetitive":
        prompt = repetitive(engine, prompt)
    ref = autoregressive(engine, prompt, n=N)
    method = suffix(engine)
    end = method.loop(prompt, StopRule(N, frozenset()))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref
    check_stats(gen, N)
    check_cache(engine, cache, prompt + ref[:-1])
    assert gen.extra["global_trees"] == 0 and gen.extra["global_outputs"] == 1  # empty before, this output after
    if kind == "repetitive":
        assert gen.extra["local_trees"] > 0 and sum(gen.accepted_per_position) >= N // 4  # drafts accepted
    # the same request again: the global trie holds its output
    again = method.generate(prompt, StopRule(N, frozenset()))
    assert again.tokens == ref and again.extra["global_trees"] > 0
    check_stats(again, N)
    assert again.target_forwards < gen.target_forwards or again.target_forwards <= N // 4


def test_no_global_trie(engine):
    method = suffix(engine, global_max_tokens=0)
    for _ in range(2):
        gen = method.generate(PROMPTS[0], StopRule(N, frozenset()))
        assert gen.extra["global_trees"] == 0 and gen.extra["global_tokens"] == 0


@pytest.mark.parametrize("limit", range(1, 14))
def test_max_new_tokens_inside_an_accepted_path(engine, limit):
    prompt = repetitive(engine, PROMPTS[2])
    ref = autoregressive(engine, prompt, n=N)
    method = suffix(engine)
    method.generate(prompt, StopRule(N, frozenset()))  # the global trie now holds the whole output
    end = method.loop(prompt, StopRule(limit, frozenset()))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref[:limit] and gen.stop_reason == "max_new_tokens"
    check_stats(gen, limit)
    assert len(gen.proposed_per_position) <= max(limit - 2, 0)  # no tree deeper than what may be committed
    check_cache(engine, cache, prompt + ref[: limit - 1])


# ---- the global trie ---------------------------------------------------------------------------
def test_global_trie_is_a_bounded_fifo(engine):
    bound = 100
    method = suffix(engine, global_max_tokens=bound, max_depth=6)
    outputs = []
    for prompt in PROMPTS + PROMPTS[:2]:
        outputs.append(method.generate(prompt, StopRule(45, frozenset())).tokens)
        kept = list(method.global_outputs)
        assert method.global_tokens == sum(len(o) for o in kept) <= bound
        assert kept == outputs[len(outputs) - len(kept) :]  # the newest, in order: oldest evicted first
        assert trie_counts(method.global_trie) == substring_counts(kept, 6)
    assert len(kept) == 2
    assert METHODS.get("suffix") is Suffix


def test_deterministic_for_a_sample_order(engine):
    runs = []
    for _ in range(2):
        method = suffix(engine)
        runs.append([method.generate(p, StopRule(30, frozenset())) for p in PROMPTS + PROMPTS])
    for a, b in zip(*runs):
        assert a.tokens == b.tokens and a.accepted_per_step == b.accepted_per_step
        assert {k: v for k, v in a.extra.items() if k != "lookup_ms_per_token"} == {
            k: v for k, v in b.extra.items() if k != "lookup_ms_per_token"}


# ---- sampling ----------------------------------------------------------------------------------
