"""Token trees: what every tree method proposes, and the target side of a tree verify step.

Medusa, EAGLE, REST, suffix decoding, token recycling and draft-model trees differ only in
how they *propose* a tree; verifying it is the same everywhere, so it lives here once:

  DraftTree      node tokens and parents (node 0 = the root = the last committed token);
                 optional draft distributions ``q`` when children were *sampled* from them
  TreeVerifier   one target forward over all nodes with the tree mask (a node sees the
                 committed prefix, its ancestors and itself; position = n - 1 + depth),
                 acceptance, commit through the stop rules, cache compaction to prefix +
                 accepted nodes, and the per-depth counts of a Generation; ``accept``
                 does the same for a forward the method ran itself, given each node's row
                 (lookahead: the tree shares its forward with the Jacobi window)

Acceptance:
  greedy       the longest root path whose every node is the target's argmax after its
               parent, then the target's argmax after the last accepted node (the bonus)
  sampling     walk down from the root; at each node try its children in order:
               - deterministic candidates (``q`` None: top-k, copies, lookups): accept child
                 c with probability p'(c) / sum(p'), where p' is the target's p with the
                 children already rejected removed (the one-hot-draft rule, many candidates);
               - children drawn i.i.d. from the draft's ``q`` (SpecInfer): accept c with
                 probability min(1, p(c) / q(c)); on rejection p <- norm(max(0, p - q));
               when no child is accepted (or at a leaf) the next token is drawn from what is
               left of p. Either way the committed tokens are distributed exactly as
               sampling the target.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from harness.config import SamplingConfig
from harness.engine import Engine, ForwardOutput, Injection
from harness.stops import StopRule
from methods.base import Generation, probabilities
from methods.verifier import Verifier, mean


# (tree, shape, logits [T, vocab], sampling generator) -> (accepted nodes root first, tokens to commit)
Acceptance = Callable[["DraftTree", "TreeShape", torch.Tensor, Optional[torch.Generator]], tuple[list[int], list[int]]]


class TreeError(ValueError):
    """A token tree that cannot be used (a parent after its child, no root...)."""


@dataclass(frozen=True, eq=False)  # compared (and hashed) by identity: one object per shape
class TreeShape:
    """What depends only on the parents: built once per distinct shape (static templates
    are shared by every step; dynamic trees build theirs each step, cheaply)."""

    parents: tuple[int, ...]  # parent of each node; parents[0] == -1 (the root)
    depth: torch.Tensor  # [T] depth of each node (root 0)
    mask: torch.Tensor  # [T, T] bool: mask[a, b] = node a may attend to node b (b is a or an ancestor)
    children: tuple[tuple[int, ...], ...]  # child nodes of each node, in the order they are tried
    paths: tuple[tuple[int, ...], ...]  # every root-to-leaf node path, depth-first
    max_depth: int  # depth of the deepest node

    @property
    def size(self) -> int:
        return len(self.parents)


@functools.lru_cache(maxsize=64)
def tree_shape(parents: tuple[int, ...], device: str = "cpu") -> TreeShape:
    """Depths, ancestor mask and children of the tree given by ``parents``."""
    if not parents or parents[0] != -1:
        raise TreeError("a token tree starts with its root: parents[0] must be -1")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise TreeError(f"node {i} has parent {p}: every parent must come before its child")
    size = len(parents)
    depth = [0] * size
    children: list[list[int]] = [[] for _ in range(size)]
    for i in range(1, size):
        depth[i] = depth[parents[i]] + 1
        children[parents[i]].append(i)
    # the ancestor mask one level at a time (a few tensor operations per level, none per node)
    mask = torch.eye(size, dtype=torch.bool)
    up, node, rows = torch.tensor((0,) + parents[1:]), torch.arange(size), torch.arange(size)
    for _ in range(max(depth)):
        node = up[node]
        mask[rows, node] = True
    paths: list[tuple[int, ...]] = []

    def walk(node: int, path: tuple[int, ...]) -> None:
        for c in children[node]:
            walk(c, path + (c,))
        if not children[node]:
            paths.append(path)

    walk(0, (0,))
    dev = torch.device(device)
    return TreeShape(parents, torch.tensor(depth, device=dev), mask.to(dev),
                     tuple(tuple(c) for c in children), tuple(paths), max(depth))  # fmt: skip


def argmax_rows(logits: torch.Tensor) -> list[int]:
    """The argmax of each row of ``logits`` [rows, vocab] (the first maximal index, as
    ``torch.argmax``), on the host. On CPU through numpy: torch's arg-reductions along the
    vocabulary cost about 10 us a row there (measured), numpy's a fraction of one."""
    if logits.device.type == "cpu" and logits.dtype in (torch.float32, torch.float64):
        return logits.detach().numpy().argmax(axis=-1).tolist()
    return logits.argmax(dim=-1).tolist()


@dataclass
class DraftTree:
    """One step's proposal: node 0 is the last committed token, every other node a draft
    token continuing its parent. Siblings carry distinct tokens (a trie), except when they
    were sampled i.i.d. from ``q``."""

    tokens: Sequence[int] | torch.Tensor  # [T] token of each node (a list or a 1-D tensor)
    parents: tuple[int, ...]  # [T] parent node of each node, -1 for the root; parents[i] < i
    # [T, vocab] the draft's distribution each node's children were sampled from (SpecInfer's
    # rule); None: the children are deterministic candidates (top-k, copies, lookups)
    q: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents):
            raise TreeError(f"{len(self.tokens)} node tokens for {len(self.parents)} parents")

    @classmethod
    def from_sequences(cls, root: int, sequences: Sequence[Sequence[int]], max_nodes: int = 0) -> "DraftTree":
        """The trie of candidate continuations of ``root`` (shared prefixes merged), children in
        the order first seen; ``max_nodes`` > 0 caps the nodes after the root (later ones dropped)."""
        tokens, parents = [root], [-1]
        index: dict[tuple[int, int], int] = {}  # (parent node, token) -> node
        for seq in sequences:
            node = 0
            for t in seq:
                child = index.get((node, int(t)))
                if child is None:
                    if max_nodes and len(tokens) > max_nodes:
                        break
                    child = len(tokens)
                    index[(node, int(t))] = child
                    tokens.append(int(t))
                    parents.append(node)
                node = child
        return cls(tokens, tuple(parents))


@dataclass
class TreeStep:
    """What one verify step did."""

    nodes: list[int]  # the accepted root path (root first) whose tokens are now in the cache
    tokens: list[int]  # tokens committed: the accepted nodes' after the root, then one target token
    output: ForwardOutput  # the step's forward (logits; hidden states when asked for)
    accepted: list[int]  # the nodes whose draft tokens were committed (root not included)
    rows: Optional[list[int]] = None  # each node's row in ``output`` (None: node i is row i)

    @property
    def hidden(self) -> torch.Tensor:
        """Target hidden states of the kept nodes, root first: [len(nodes), hidden]."""
        kept = self.nodes if self.rows is None else [self.rows[n] for n in self.nodes]
        return self.output.hidden[kept]


class TreeVerifier(Verifier):
    """The target side of a tree draft-and-verify loop, for one prompt.

    ``verify`` runs the target over the tree itself; a method whose forward holds more than
    the tree (lookahead's Jacobi window) runs it, hands the output and each node's row to
    ``accept`` and gets the same acceptance, commit and cache compaction. Invariant between
    steps (``Verifier``'s): ``seq[-1]``, the last committed token, is the root of the next tree.
    """

    def __init__(self, engine: Engine, sampling: SamplingConfig, stop: StopRule, prompt_ids: list[int],
                 seed: int, hidden: bool = False):  # fmt: skip
        super().__init__(engine, sampling, stop, prompt_ids, seed)
        self.hidden = hidden  # also return the target's hidden states (heads that read them)
        self.tree_sizes: list[int] = []  # nodes per verified tree, root included
        self.output: Optional[ForwardOutput] = None  # the last tree forward (logits; hidden states when asked for)

    def prefill(self, inject: Optional[Injection] = None) -> ForwardOutput:
        """Run the prompt; its last row gives the first token (and the heads' first input).
        ``inject``: rows that join the forward (``Engine.forward``), never kept in the cache."""
        res = self.engine.forward(self.seq, self.cache, hidden=self.hidden, last_only=True, inject=inject)
        if inject is not None:
            self.cache.truncate(len(self.seq))  # drop the rows' entries (upper layers only)
        self.first_token(res.logits[-1])
        return res

    def verify(self, tree: DraftTree, accept: Optional[Acceptance] = None, inject: Optional[Injection] = None) -> TreeStep:
        """One target forward over ``tree``; commits the accepted path and one target token,
        keeps prefix + accepted nodes in the cache. ``accept`` replaces the lossless rules
        (a method's own lossy mode, e.g. Medusa's typical acceptance). ``inject``: rows that
        join the forward (built for this cache length and tree; never kept in the cache)."""
        with self.engine.phase("tree"):  # the tree's positions and mask over the cache
            shape = tree_shape(tuple(tree.parents), str(self.engine.device))
            past = len(self.cache)
            prefix = torch.ones(shape.size, past, dtype=torch.bool, device=shape.mask.device)
            mask = torch.cat((prefix, shape.mask), dim=1)
        res = self.engine.forward(tree.tokens, self.cache, positions=shape.depth + past, mask=mask, hidden=self.hidden,
                                  inject=inject)  # fmt: skip
        self.output = res  # an ``accept`` rule that reads the nodes' hidden states finds them here
        return self.accept(tree, res, accept=accept)

    def accept(self, tree: DraftTree, output: ForwardOutput, rows: Optional[Sequence[int]] = None,
               accept: Optional[Acceptance] = None) -> TreeStep:  # fmt: skip
        """Acceptance, commit and cache compaction for a tree the caller's forward ran: the
        cache holds ``seq[:-1]`` and then every row of ``output``; node i's row is ``rows[i]``
        (None: row i). Keeps prefix + the accepted nodes' rows in the cache."""
        with self.engine.phase("accept"):
            shape = tree_shape(tuple(tree.parents), str(self.engine.device))
            past = len(self.seq) - 1
            logits = output.logits
            if rows is not None:
                logits = logits.index_select(0, torch.as_tensor(rows, device=logits.device))
            if accept is not None:
                nodes, new = accept(tree, shape, logits, self.gen)
            elif self.sampling.do_sample:
                nodes, new = self._sample_walk(tree, shape, probabilities(logits, self.sampling))
            else:
                nodes, new = self._greedy_walk(tree, shape, logits)
            committed = self._commit(new)  # a stop inside the path cuts it
            drafted = min(committed, len(new) - 1)
            kept = nodes[:committed]  # the nodes before each committed token
            kept_rows = [past + n for n in kept] if rows is None else [past + rows[n] for n in kept]
        with self.engine.phase("cache"):  # compaction: prefix + the accepted nodes' rows
            self.cache.keep_after(past, kept_rows)
        self.tree_sizes.append(shape.size)
        self._count(shape.max_depth, drafted)
        return TreeStep(kept, new[:committed], output, nodes[1 : drafted + 1], None if rows is None else list(rows))

    # ---- acceptance --------------------------------------------------------------------
    @staticmethod
    def _greedy_walk(tree: DraftTree, shape: TreeShape, logits: torch.Tensor) -> tuple[list[int], list[int]]:
        """Longest root path the target's argmax agrees with, plus its argmax after it."""
        best = argmax_rows(logits)
        ids = tree.tokens.tolist() if isinstance(tree.tokens, torch.Tensor) else tree.tokens
        node, nodes = 0, [0]
        while True:
            child = next((c for c in shape.children[node] if ids[c] == best[node]), None)
            if child is None:
                return nodes, [int(ids[n]) for n in nodes[1:]] + [best[node]]
            nodes.append(child)
            node = child

    def _sample_walk(self, tree: DraftTree, shape: TreeShape, p: torch.Tensor) -> tuple[list[int], list[int]]:
        """Multi-candidate speculative sampling down the tree (module doc)."""
        ids = torch.as_tensor(tree.tokens).tolist()
        node, nodes, new = 0, [0], []
        while True:
            rest, accepted = p[node].clone(), None
            q = tree.q[node].to(rest.device) if tree.q is not None else None
            for child in shape.children[node]:
                t, mass = ids[child], float(rest.sum())
                if mass <= 0:  # nothing left to accept (a rejection had probability zero)
                    break
                u = float(torch.rand(1, generator=self.gen, device=rest.device))
                if q is None:  # deterministic candidate: p' = p without the rejected siblings
                    if u * mass < float(rest[t]):
                        accepted = child
                        break
                    rest[t] = 0
                else:  # sampled from q: min(1, p'(t) / q(t)), then p' <- max(0, p' - q)
                    if u * float(q[t]) * mass < float(rest[t]):
                        accepted = child
                        break
                    rest = (rest / mass - q).clamp_min(0)
            if accepted is None:
                new.append(self.residual_token(rest, p[node]))
                return nodes, new
            nodes.append(accepted)
            new.append(ids[accepted])
            node = accepted

    def residual_token(self, rest: torch.Tensor, p_node: torch.Tensor) -> int:
        """The token after every child of a node was rejected: drawn from what is left of p
        (or from p itself when nothing is left, where a rejection had probability zero)."""
        weights = rest if float(rest.sum()) > 0 else p_node
        return int(torch.multinomial(weights, 1, generator=self.gen))

    # ---- bookkeeping ---------------------------------------------------------------------
    def result(self, draft_forwards: int = 0, lossy: bool = False, extra: Optional[dict] = None) -> Generation:
        return self._generation(draft_forwards, lossy, {"mean_tree_size": mean(self.tree_sizes), **(extra or {})})
