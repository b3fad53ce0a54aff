"""Token Recycling (Luo et al. 2024): drafts from the candidates the target already computed.

Every forward gives, at each position, a whole next-token distribution of which decoding keeps
one token; the rest is "recycled" into an **adjacency table** ``[vocab, k]``: row t holds the k
tokens the target ranked highest the last time it predicted after a t. No draft model, no
training, no datastore; the table is the method's only state.

One step (the last committed token ``x`` is the root):
  1. the tree template (a static tree of candidate ranks, Medusa's ``choices`` format: (0,) is
     the best candidate after the root, (0, 1) the second best after that one...) is filled
     breadth first from the table: a node's token is ``table[its parent's token][its rank]``.
     Nodes whose parent's row is still empty are left out (with their subtrees), and so are
     nodes deeper than the tokens still allowed (``TreeVerifier.room``);
  2. the shared tree step (methods/tree.py ``TreeVerifier``) verifies it in one target forward:
     acceptance, commit (stop rules cut inside a path), cache compaction;
  3. the table is refreshed from that forward: every tree node's top-k becomes the row of its
     token (when a token sits on several nodes, the last node wins). The prefill's last row
     fills the row of the prompt's last token.

The table starts empty (-1) and, with ``persist`` (the default, as the paper's "hot start"
where the matrix is kept from one query to the next), lives as long as the method: every
sample of a run refines it, in the run's sample order (the runner empties it after its
warm-up, ``reset``; a resumed run starts empty). ``persist=false`` empties it before each
sample, so a sample's steps do not depend on the samples before it (its tokens never do:
greedy is exact either way).

Acceptance: the candidates are deterministic (top-k rows, siblings distinct), so greedy takes
the longest agreeing path plus one token and sampling uses the verifier's one-hot
multi-candidate rule; both leave the target's output (greedy) or distribution (sampling)
unchanged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.base import Generation, Method
from methods.tree import DraftTree, TreeError, TreeVerifier

Choices = tuple[tuple[int, ...], ...]


def rank_budget(budget: int) -> list[tuple[int, ...]]:
    """Every path of candidate ranks (r_1..r_d) with d + r_1 + ... + r_d <= ``budget``: a deeper
    node or a lower-ranked one costs more, so the tree is widest near the root and along the
    best candidates (the shape of the paper's template, from one number)."""
    out: list[tuple[int, ...]] = []

    def grow(path: tuple[int, ...], spent: int) -> None:
        for r in range(budget - spent):  # the child costs 1 + r
            child = path + (r,)
            out.append(child)
            grow(child, spent + 1 + r)

    grow((), 0)
    return out


TREES: dict[str, list[tuple[int, ...]]] = {
    "chain": [(0,) * d for d in range(1, 5)],  # the top-1 candidate four deep: 4 nodes
    "small": rank_budget(4),  # 15 nodes, 4 deep
    "medium": rank_budget(5),  # 31 nodes, 5 deep
    "large": rank_budget(6),  # 63 nodes, 6 deep
}


@dataclass
class RecyclingConfig(MethodConfig):
    name: str = "recycling"
    # chain | small | medium | large (methods.recycling.TREES); ignored when `choices` is set
    tree: str = "small"
    choices: Optional[list[list[int]]] = None  # explicit template of rank paths, e.g. [[0],[1],[0,0]]
    k: int = 8  # candidates kept per token (the table's width); at least the template's largest rank + 1
    persist: bool = True  # keep the table across the samples of a run (the paper's hot start); false: empty per sample


@dataclass(frozen=True)
class Template:
    """A static tree of ranks, nodes in (depth, ranks) order; node 0 is the root."""

    choices: Choices  # node i + 1 is choices[i]
    parents: tuple[int, ...]  # template parent of each node (-1 for the root)
    ranks: tuple[int, ...]  # rank of each node among its parent's candidates (root: 0)
    depths: tuple[int, ...]  # depth of each node (root: 0), non-decreasing
    top_k: int  # candidates the template needs per token

    @property
    def size(self) -> int:
        return len(self.parents)

    @property
    def max_depth(self) -> int:
        return self.depths[-1]


@functools.lru_cache(maxsize=16)
def build_template(choices: Choices) -> Template:
    if not choices:
        raise TreeError("a recycling tree template needs at least one node")
    if len(set(choices)) != len(choices) or any(not c or min(c) < 0 for c in choices):
        raise TreeError(f"bad tree template {list(choices)}: distinct non-empty rank paths with ranks >= 0")
    nodes = sorted(choices, key=lambda c: (len(c), c))
    index = {c: i + 1 for i, c in enumerate(nodes)}
    missing = [c for c in nodes if len(c) > 1 and c[:-1] not in index]
    if missing:
        raise TreeError(f"tree template node {missing[0]} has no parent {missing[0][:-1]}")
    parents = (-1,) + tuple(index[c[:-1]] if len(c) > 1 else 0 for c in nodes)
    ranks = (0,) + tuple(c[-1] for c in nodes)
    return Template(tuple(nodes), parents, ranks, (0,) + tuple(len(c) for c in nodes), max(ranks) + 1)


def template_choices(cfg: RecyclingConfig) -> Choices:
    if cfg.choices:
        return tuple(tuple(int(r) for r in c) for c in cfg.choices)
    if cfg.tree not in TREES:
        raise TreeError(f"unknown recycling tree '{cfg.tree}'; use one of {', '.join(TREES)} or set "
                        f"method.{cfg.name}.choices")  # fmt: skip
    return tuple(TREES[cfg.tree])


class AdjacencyTable:
    """Row t: the k tokens the target ranked highest after a t, best first; -1 = never seen.
    Held on the host (int32), where the tree is built; ``update`` takes top-k from the device.
    The tree is read and written through a numpy view of the same memory: a step touches a
    few dozen entries, which numpy's scalar indexing reads far faster than torch ops would."""

    def __init__(self, vocab: int, k: int):
        self.rows = torch.full((vocab, k), -1, dtype=torch.int32)
        self.view = self.rows.numpy()  # the same memory

    @property
    def k(self) -> int:
        return self.rows.shape[1]

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()

    def known(self) -> int:
        """Rows filled so far."""
        return int((self.rows[:, 0] >= 0).sum())

    def reset(self) -> None:
        self.rows.fill_(-1)

    def update(self, tokens: torch.Tensor | list[int], logits: torch.Tensor) -> None:
        """Row ``tokens[i]`` <- the top-k of ``logits[i]``; a token given twice keeps its last row."""
        top = logits.topk(self.k, dim=-1).indices.to("cpu", torch.int32).numpy()
        last = {int(t): i for i, t in enumerate(tokens)}  # each token's last node
        self.view[list(last)] = top[list(last.values())]

    def expand(self, root: int, template: Template, depth: int) -> DraftTree:
        """The template filled breadth first from ``root`` (module doc, step 1), at most ``depth`` deep."""
        tokens, parents = [root], [-1]
        where = [0] * template.size  # template node -> tree node (-1: left out)
        for i in range(1, template.size):  # parents before children, shallow before deep
            if template.depths[i] > depth:
                break
            above = where[template.parents[i]]
            token = int(self.view[tokens[above], template.ranks[i]]) if above >= 0 else -1
            if token < 0:  # the parent is left out, or its row is still empty
                where[i] = -1
                continue
            where[i] = len(tokens)
            tokens.append(token)
            parents.append(above)
        return DraftTree(tokens, tuple(parents))


class Recycling(Method):
    """Token Recycling: a tree drafted from the candidates earlier target forwards computed."""

    config_class = RecyclingConfig
    main_settings = ("tree", "k")
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)

    def __init__(self, cfg: RecyclingConfig, engine: Engine, sampling: SamplingConfig):
        super().__init__(cfg, engine, sampling)
        self.template = build_template(template_choices(cfg))
        if cfg.k < self.template.top_k:
            raise TreeError(f"method.{cfg.name}.k={cfg.k} but the tree template uses rank {self.template.top_k - 1}; "
                            f"set k >= {self.template.top_k}")  # fmt: skip
        vocab = engine.model.get_output_embeddings().weight.shape[0]
        self.table = AdjacencyTable(vocab, cfg.k)

    def reset(self) -> None:
        """Empty the table (the runner calls it after its warm-up)."""
        self.table.reset()

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        self.check_context(len(prompt_ids), stop)
        if not self.cfg.persist:
            self.table.reset()
        table = self.table
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed)
        table.update(prompt_ids[-1:], verifier.prefill().logits[-1:])
        while not verifier.done:
            # 1. the template filled from the table, from the last committed token
            tree = self.propose(verifier.seq, verifier.room())
            # 2. one target forward: acceptance, commit, cache compaction
            step = verifier.verify(tree)
            # 3. every node's candidates become its token's row
            table.update(tree.tokens, step.output.logits)
        extra = {"tree": "custom" if self.cfg.choices else self.cfg.tree, "template_size": self.template.size,
                 "table_bytes": table.nbytes, "table_rows": table.known(), "persist": self.cfg.persist}  # fmt: skip
        return verifier.result(extra=extra)

    def propose(self, seq: list[int], room: int) -> DraftTree:
        """The step's tree after the committed tokens ``seq``, at most ``room`` deep."""
        return self.table.expand(seq[-1], self.template, room)
