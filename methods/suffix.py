"""Suffix decoding (Oliaro et al. 2024, ArcticInference): drafts from suffix statistics of
this request and of the run's earlier outputs, verified as a tree.

Structure: a bounded-depth suffix trie with counts (``SuffixTrie``): every substring of at
most ``max_depth`` tokens of the sequences added is a node whose count is its number of
occurrences (an uncompressed suffix tree cut at depth ``max_depth``; appending a token
updates the nodes of the sequence's last ``max_depth`` suffixes). Two of them:

  local   this request's prompt + output, extended as tokens are committed;
  global  the outputs of the earlier ``generate`` calls of this Method object (the runner
          builds one per run, calls it for every sample and ``reset()`` after its warm-up, so
          the warm-up's output is never drafted from), at most
          ``global_max_tokens`` tokens, the oldest outputs evicted first (FIFO). Its drafts
          depend on the calls before, in order: a run is deterministic for its sample order,
          and a resumed run starts with an empty one.

One step: for every match length m = 1, 2, ... (while the last m context tokens occur in the
trie, m < ``max_depth``), a speculation tree is grown greedily from the matched node: the
candidate with the highest path probability (the product of conditional frequencies
count(child) / count(parent) along it) is added next, while it is at least ``min_token_prob``,
up to ``max_spec_factor * m + max_spec_offset`` nodes (the adaptive size), capped by
``max_nodes`` and never deeper than what may still be committed. The tree with the highest
score (sum of its path probabilities: the expected accepted tokens under the statistics;
ties: the longer match, then local before global) is verified by the shared tree step
(methods/tree.py); nothing matched: a plain one-token step.

Host work per step is kept small: the matches are followed token by token (the local trie's
are the appender's own nodes, the global trie's a ``Follower``'s), not looked up from the root,
and a match is grown only when its tree could still win (longest first; a tree scores at most
min(its budget, the room left)), which picks the same tree as growing every one.

Greedy: the longest root path the target agrees with (lossless). Sampling: the candidates
are deterministic, so the one-hot-draft rule over several candidates applies (lossless).
``Generation.extra`` reports the cost as counts (``trie_ops_per_token``: trie nodes visited to
insert, match and grow, per committed token) and, for information only, the host time
``lookup_ms_per_token`` (perf_counter, inside the runner's timed generation; never gated).
"""

from __future__ import annotations

import bisect
import heapq
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional, Sequence

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.base import Generation, LoopEnd, Method
from methods.tree import DraftTree, TreeVerifier


@dataclass
class SuffixConfig(MethodConfig):
    name: str = "suffix"
    max_depth: int = 24  # longest substring counted: a match plus the speculation below it
    # adaptive size: a tree has at most max_spec_factor * match length + max_spec_offset nodes. 4.0
    # (upstream's default is 1.0): on HumanEval's tuning split (zoo target, 6 problems x 64 tokens)
    # 2.30 tokens per forward against 1.97 with 1.0, trees of 5.6 nodes on average
    max_spec_factor: float = 4.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1  # a node's path probability (product of conditional frequencies) must reach this
    max_nodes: int = 16  # cap on a tree's nodes (the root not counted)
    global_max_tokens: int = 65536  # earlier outputs kept in the global trie, oldest evicted first (0 = none)


ROOT = 0
EDGE = 1 << 32  # edge key = parent * EDGE + token (token ids < 2^32)


class SuffixTrie:
    """Counts of every substring of at most ``depth`` tokens of the sequences added; the
    root counts the positions. ``ops`` counts the nodes visited (the structure's cost).

    Nodes are integer ids into flat lists and one dict of edges keyed by integers: no Python
    object per node, so building a trie allocates nothing the garbage collector walks (a
    node object each made the collector's full passes over the model's objects dominate).
    """

    def __init__(self, depth: int):
        self.depth = depth
        self.count: list[int] = [0]  # occurrences of each node's substring (root: positions)
        self.token: list[int] = [-1]  # the token on the edge into each node
        self.first: list[int] = [-1]  # first child of each node (-1: none), newest first
        self.sibling: list[int] = [-1]  # next child of the same parent (-1: last)
        self.edges: dict[int, int] = {}  # parent * EDGE + token -> child
        self.free: list[int] = []  # ids of removed nodes, reused
        self.ops = 0

    def child(self, node: int, token: int) -> int:
        """The child of ``node`` for ``token`` (-1: none)."""
        return self.edges.get(node * EDGE + token, -1)

    def children(self, node: int):
        """(token, child) of every child of ``node``, oldest first."""
        kids = []
        c = self.first[node]
        while c != -1:
            kids.append((self.token[c], c))
            c = self.sibling[c]
        return reversed(kids)

    def _drop_child(self, node: int, c: int) -> None:
        del self.edges[node * EDGE + self.token[c]]
        if self.first[node] == c:
            self.first[node] = self.sibling[c]
        else:
            k = self.first[node]
            while self.sibling[k] != c:
                k = self.sibling[k]
            self.sibling[k] = self.sibling[c]
        self.free.append(c)

    def appender(self) -> "Appender":
        """Adds one sequence token by token (its substrings only: no n-gram across sequences)."""
        return Appender(self)

    def add(self, tokens: Sequence[int]) -> None:
        self.appender().extend(tokens)

    def remove(self, tokens: Sequence[int]) -> None:
        """Undo ``add(tokens)``: every substring's count drops by its occurrences in it; nodes
        left at zero (the chain of this occurrence alone) are removed."""
        for start in range(len(tokens)):
            self.count[ROOT] -= 1
            node = ROOT
            for t in tokens[start : start + self.depth]:
                c = self.edges[node * EDGE + t]
                self.count[c] -= 1
                self.ops += 1
                if self.count[c] == 0:
                    self._drop_child(node, c)
                node = c

    def find(self, pattern: Sequence[int]) -> int:
        """The node of ``pattern`` (-1: it does not occur)."""
        node = ROOT
        for t in pattern:
            self.ops += 1
            node = self.edges.get(node * EDGE + t, -1)
            if node == -1:
                return -1
        return node

    def matches(self, context: Sequence[int]) -> list[tuple[int, int]]:
        """(m, node of the last m context tokens) for m = 1, 2, ... while they occur (m < depth)."""
        found = []
        for m in range(1, min(self.depth - 1, len(context)) + 1):
            node = self.find(context[len(context) - m :])
            if node == -1:
                break
            found.append((m, node))
        return found


class Appender:
    """Appends tokens to one sequence of a trie: ``active[i]`` is the node of the sequence's
    last i + 1 tokens (kept while shorter than the trie's depth, so they can be extended).
    They are also the sequence's matches (``SuffixTrie.matches`` of it, without a lookup)."""

    def __init__(self, trie: SuffixTrie):
        self.trie = trie
        self.active: list[int] = []

    def extend(self, tokens: Sequence[int]) -> None:
        # one loop with the trie's lists bound locally and no call per node: a prompt adds
        # thousands of nodes (prompt length x depth), inside the timed generation
        trie = self.trie
        edges, count, token, first, sibling = trie.edges, trie.count, trie.token, trie.first, trie.sibling
        free = trie.free
        keep = trie.depth - 1
        for t in tokens:
            count[ROOT] += 1
            extended = []
            for node in (ROOT, *self.active):
                key = node * EDGE + t
                c = edges.get(key, -1)
                if c == -1:  # a new child, first in node's list (an id freed by remove, or a new one)
                    if free:
                        c = free.pop()
                        count[c], token[c], first[c], sibling[c] = 0, t, -1, first[node]
                    else:
                        c = len(count)
                        count.append(0)
                        token.append(t)
                        first.append(-1)
                        sibling.append(first[node])
                    first[node] = c
                    edges[key] = c
                count[c] += 1
                extended.append(c)
            trie.ops += len(extended)
            self.active = extended[:keep]

    def matches(self) -> list[tuple[int, int]]:
        """``trie.matches(sequence)``: every suffix of the sequence shorter than the depth occurs."""
        return list(enumerate(self.active, start=1))


class Follower:
    """The matches of a growing context in a trie that does not change meanwhile (the global
    one during a generation): ``nodes[i]`` is the node of the context's last i + 1 tokens, for
    as many as occur (and are shorter than the depth). Each token extends the previous
    matches by one edge, instead of looking every suffix up from the root each step."""

    def __init__(self, trie: SuffixTrie):
        self.trie = trie
        self.nodes: list[int] = []

    def extend(self, tokens: Sequence[int]) -> None:
        trie = self.trie
        edges, keep = trie.edges, trie.depth - 1
        if len(tokens) >= keep:  # the matches after them depend on their last depth - 1 only
            self.nodes, tokens = [], tokens[len(tokens) - keep :]
        for t in tokens:
            found = []
            for node in (ROOT, *self.nodes):  # the suffix one token shorter, then + t
                c = edges.get(node * EDGE + t, -1)
                if c == -1:  # a substring's extensions occur only if it does
                    break
                found.append(c)
            trie.ops += len(found) + 1
            self.nodes = found[:keep]

    def matches(self) -> list[tuple[int, int]]:
        """``trie.matches(context)``."""
        return list(enumerate(self.nodes, start=1))


@dataclass
class Speculation:
    """A grown tree and its score."""

    tree: DraftTree
    score: float  # sum of the nodes' path probabilities (expected accepted tokens under the counts)
    match: int  # match length it was grown from
    source: str  # local | global


def grow(root: int, node: int, budget: int, min_prob: float, max_depth: int, trie: SuffixTrie) -> tuple[DraftTree, float]:
    """The greedy speculation tree below trie node ``node`` (module doc): at most ``budget``
    nodes, each the most probable remaining candidate, none below ``min_prob`` or deeper than
    ``max_depth``."""
    count, first, sibling, token = trie.count, trie.first, trie.sibling, trie.token  # bound once: grows run every step
    tokens, parents, score = [root], [-1], 0.0
    heap: list[tuple[float, int, int, int, int, int]] = []  # (-prob, serial, token, parent, trie node, depth)
    serial = 0

    def push(parent: int, trie_node: int, prob: float, depth: int) -> None:
        nonlocal serial
        if depth > max_depth:
            return
        kids = []  # newest first
        c = first[trie_node]
        while c != -1:
            kids.append(c)
            c = sibling[c]
        trie.ops += len(kids)
        total = count[trie_node]
        for child in reversed(kids):  # oldest first (the order ties are broken in)
            p = prob * count[child] / total
            if p >= min_prob:
                heapq.heappush(heap, (-p, serial, token[child], parent, child, depth))
                serial += 1

    push(0, node, 1.0, 1)
    while heap and len(tokens) - 1 < budget:
        neg, _, t, parent, child, depth = heapq.heappop(heap)
        tokens.append(t)
        parents.append(parent)
        score -= neg
        push(len(tokens) - 1, child, -neg, depth + 1)
    return DraftTree(tokens, tuple(parents)), score


@dataclass
class SuffixStats:
    """What the lookups did in one generation."""

    local: int = 0  # steps whose tree came from the local trie
    global_: int = 0  # ... from the global trie
    matched: int = 0  # match lengths of those trees, summed
    seconds: float = 0.0  # host time inserting, matching and growing (perf_counter)
    ops_before: int = 0  # the global trie's op counter at the start


class Suffix(Method):
    """Suffix decoding: a tree drafted from suffix statistics of the request and of the run's earlier outputs."""

    config_class = SuffixConfig
    main_settings = ("max_depth", "max_spec_factor")
    cfg: SuffixConfig
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)

    def __init__(self, cfg: SuffixConfig, engine: Engine, sampling: SamplingConfig):
        super().__init__(cfg, engine, sampling)
        if cfg.max_depth < 2:
            raise ValueError(f"method.suffix.max_depth={cfg.max_depth}: at least 2 (one matched token, one drafted)")
        if cfg.max_nodes < 1 or cfg.max_spec_factor < 0 or cfg.global_max_tokens < 0:
            raise ValueError("method.suffix: max_nodes >= 1, max_spec_factor >= 0 and global_max_tokens >= 0")
        self.global_trie = SuffixTrie(cfg.max_depth)
        self.global_outputs: deque[list[int]] = deque()  # what the global trie holds, oldest first
        self.global_tokens = 0

    def reset(self) -> None:
        """Empty the global trie (the runner calls this after its warm-up)."""
        self.global_trie = SuffixTrie(self.cfg.max_depth)
        self.global_outputs.clear()
        self.global_tokens = 0

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The loop (the output then joins the global trie); also returns the cache, which
        then holds prompt + tokens but the last."""
        self.check_context(len(prompt_ids), stop)
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed)
        local = SuffixTrie(self.cfg.max_depth)
        stats = SuffixStats(ops_before=self.global_trie.ops)
        start = time.perf_counter()
        appender = local.appender()
        appender.extend(prompt_ids)
        follower = Follower(self.global_trie)  # the global trie's matches, followed token by token
        follower.extend(prompt_ids)
        stats.seconds += time.perf_counter() - start
        # 1. prefill: the prompt's last row gives the first token (the first tree's root)
        committed = 0  # output tokens already in the local trie
        verifier.prefill()
        while True:
            # 2. the committed tokens into the local trie
            start = time.perf_counter()
            new = verifier.out.tokens[committed:]
            appender.extend(new)
            committed = len(verifier.out.tokens)
            if verifier.done:
                stats.seconds += time.perf_counter() - start
                break
            # 3. the best speculation tree of both tries, over the matches of the context's suffixes
            follower.extend(new)
            sources = (("local", local, appender.matches()), ("global", self.global_trie, follower.matches()))
            best = self.speculate(verifier.seq[-1], verifier.room(), sources)
            stats.seconds += time.perf_counter() - start
            if best is not None:
                stats.matched += best.match
                if best.source == "local":
                    stats.local += 1
                else:
                    stats.global_ += 1
            tree = best.tree if best is not None else DraftTree([verifier.seq[-1]], (-1,))
            # 4. one target forward over the tree, acceptance, commit, cache compaction
            verifier.verify(tree)
        tokens = list(verifier.out.tokens)
        ops = local.ops + self.global_trie.ops - stats.ops_before
        start = time.perf_counter()
        self.remember(tokens)
        stats.seconds += time.perf_counter() - start
        drafts = stats.local + stats.global_
        extra = {
            "local_trees": stats.local,
            "global_trees": stats.global_,
            "mean_match_length": stats.matched / drafts if drafts else 0.0,
            "trie_ops_per_token": ops / len(tokens) if tokens else 0.0,
            "lookup_ms_per_token": 1000 * stats.seconds / len(tokens) if tokens else 0.0,  # host time, information only
            "global_outputs": len(self.global_outputs),
            "global_tokens": self.global_tokens,
        }
        return LoopEnd(verifier.result(extra=extra), verifier.cache)

    def speculate(self, root: int, room: int, sources: Sequence[tuple[str, SuffixTrie, list[tuple[int, int]]]]
                  ) -> Optional[Speculation]:  # fmt: skip
        """The highest-scoring tree over every match (m, node) of each source (name, trie,
        matches of the context), after the last context token ``root`` (None: no candidate).

        Longest match first, and a match is grown only if its tree could win: a tree scores at
        most one per depth (the path probabilities at one depth sum to at most 1) and one per
        node, so at most min(budget, room); a shorter match's bound is no higher."""
        cfg = self.cfg
        if room <= 0:
            return None
        best: Optional[Speculation] = None
        for source, trie, matches in sources:
            # the matches with a continuation seen are the shortest ones up to some length (a
            # substring's shorter suffixes occur wherever it does, followed by the same token)
            ends = bisect.bisect_left(matches, True, key=lambda match: trie.first[match[1]] == -1)
            for m, node in reversed(matches[:ends]):
                budget = min(cfg.max_nodes, int(cfg.max_spec_factor * m + cfg.max_spec_offset + 1e-6))
                if best is not None and (min(budget, room), m) <= (best.score, best.match):
                    break  # neither this match nor a shorter one can beat the best tree
                if budget < 1:
                    continue
                tree, score = grow(root, node, budget, cfg.min_token_prob, room, trie)
                if len(tree.tokens) > 1 and (best is None or (score, m) > (best.score, best.match)):
                    best = Speculation(tree, score, m, source)
        return best

    def remember(self, output: list[int]) -> None:
        """Add a finished output to the global trie; evict the oldest beyond global_max_tokens."""
        limit = self.cfg.global_max_tokens
        if limit <= 0 or not output:
            return
        output = output[-limit:]
        self.global_trie.add(output)
        self.global_outputs.append(output)
        self.global_tokens += len(output)
        while self.global_tokens > limit:
            old = self.global_outputs.popleft()
            self.global_trie.remove(old)
            self.global_tokens -= len(old)
