"""Medusa (Cai et al. 2024): tree verification of candidates from extra decoding heads.

State between steps: the committed tokens ``x[0:n]``, a KV cache holding ``x[0:n-1]``
and the hidden state that produced ``x[n-1]`` (the root of the next tree).

One step:
  1. the heads read that hidden state; one top-k over all heads gives each tree node its
     token (depth d, rank r -> the r-th best token of head d-1; not conditioned on the path);
  2-4. the shared tree step (methods/tree.py ``TreeVerifier``): one target forward over all
     nodes with the tree attention mask at positions n-1+depth, acceptance of the longest
     root path the target agrees with plus one more token, commit (stop rules inside a
     path cut it), cache compacted to prefix + accepted nodes; the last accepted node's
     hidden state is the heads' next input.

Acceptance: ``greedy`` (lossless; always used when not sampling), ``rejection`` (sampling,
lossless: at each node the children are tried in rank order with the one-hot-draft rule,
so the output is distributed exactly as sampling the target), ``typical`` (upstream's
sampling mode, NOT distribution preserving: every Generation it makes is marked lossy).

Trees are ``choices``: tuples of top-k ranks per depth as upstream, e.g. (0,), (1,), (0,0).
The shipped ones (``TREES``) are at most 3 deep so they fit heads with K >= 3.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import DraftClock, Engine
from harness.paths import resolve_repo_path
from harness.stops import StopRule
from methods.base import MEDUSA_HEADS, Generation, LoopEnd, Method, probabilities
from methods.tree import DraftTree, TreeError, TreeShape, TreeVerifier, tree_shape

Choices = tuple[tuple[int, ...], ...]

TREES: dict[str, list[tuple[int, ...]]] = {
    # top-1 of each of 3 heads: 4 nodes
    "chain": [(0,), (0, 0), (0, 0, 0)],
    # 13 nodes
    "small": [(0,), (1,), (2,), (3,),
              (0, 0), (0, 1), (0, 2), (1, 0), (1, 1),
              (0, 0, 0), (0, 0, 1), (0, 1, 0)],
    # 37 nodes
    "large": [(0,), (1,), (2,), (3,), (4,), (5,), (6,), (7,),
              (0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 0), (1, 1), (1, 2), (1, 3),
              (2, 0), (2, 1), (2, 2), (3, 0), (3, 1), (4, 0), (5, 0),
              (0, 0, 0), (0, 0, 1), (0, 0, 2), (0, 0, 3), (0, 1, 0), (0, 1, 1), (0, 2, 0),
              (1, 0, 0), (1, 0, 1), (1, 1, 0), (2, 0, 0)],
}  # fmt: skip

ACCEPTANCE = ("greedy", "typical", "rejection")


@dataclass
class MedusaConfig(MethodConfig):
    name: str = "medusa"
    heads: str = "zoo/target-medusa"  # directory (or weights file) of the heads; ours or upstream's format
    # chain | small | large (see methods.medusa.TREES): the fastest on HumanEval's tuning split in
    # results/medusa-trees.md (make tables-medusa); ignored when `choices` is set
    tree: str = "chain"
    choices: Optional[list[list[int]]] = None  # explicit tree, e.g. [[0],[1],[0,0]]
    acceptance: str = "greedy"  # sampling rule: greedy | rejection (lossless) | typical (lossy); greedy decoding always uses greedy
    posterior_threshold: float = 0.09  # typical: epsilon (hard cap of the acceptance threshold)
    posterior_alpha: float = 0.3  # typical: threshold = min(epsilon, alpha * exp(-entropy))


@dataclass(frozen=True)
class MedusaTree:
    """A tree of ``choices`` as the shared tree code sees it, plus where each node's token
    comes from in the heads' top-k (nodes in (depth, ranks) order; node 0 is the root)."""

    choices: Choices  # sorted choices; node i+1 is choices[i]
    shape: TreeShape  # parents, depths, mask, children, paths (methods/tree.py)
    gather: torch.Tensor  # [T-1] index of node 1.. in the flattened [K, top_k] head top-k
    top_k: int  # ranks needed per head (max rank + 1)

    @property
    def size(self) -> int:
        return self.shape.size

    @property
    def max_depth(self) -> int:
        return self.shape.max_depth


def tree_choices(cfg: MedusaConfig) -> Choices:
    if cfg.choices:
        return tuple(tuple(int(r) for r in c) for c in cfg.choices)
    if cfg.tree not in TREES:
        raise TreeError(f"unknown Medusa tree '{cfg.tree}'; use one of {', '.join(TREES)} or set method.medusa.choices")
    return tuple(TREES[cfg.tree])


@functools.lru_cache(maxsize=32)
def build_tree(choices: Choices, device: str = "cpu") -> MedusaTree:
    """The tree of ``choices`` and the top-k gather indices of its nodes."""
    if not choices:
        raise TreeError("a Medusa tree needs at least one choice")
    seen = set()
    for c in choices:
        if not c or any(r < 0 for r in c):
            raise TreeError(f"bad tree choice {c}: a non-empty tuple of ranks >= 0")
        if c in seen:
            raise TreeError(f"tree choice {c} appears twice")
        seen.add(c)
    for c in choices:
        if len(c) > 1 and c[:-1] not in seen:
            raise TreeError(f"tree choice {c} has no parent {c[:-1]} in the tree")
    nodes = sorted(choices, key=lambda c: (len(c), c))  # siblings in rank order
    index = {c: i + 1 for i, c in enumerate(nodes)}
    parents = (-1,) + tuple(index[c[:-1]] if len(c) > 1 else 0 for c in nodes)
    top_k = max(max(c) for c in nodes) + 1
    gather = torch.tensor([(len(c) - 1) * top_k + c[-1] for c in nodes], device=torch.device(device))
    return MedusaTree(tuple(nodes), tree_shape(parents, device), gather, top_k)


def node_tokens(tree: MedusaTree, root: int, logits: torch.Tensor) -> torch.Tensor:
    """Token of every node of ``tree``: the root, then for the node of choice (r_1..r_d) the
    r_d-th best token of ``logits[d - 1]`` ([depths, vocab], one row per depth)."""
    top = torch.topk(logits[: tree.max_depth], tree.top_k, dim=-1).indices.flatten()
    return torch.cat((top.new_tensor([root]), top[tree.gather]))


class Medusa(Method):
    """Medusa: extra decoding heads propose a token tree, one target forward verifies it."""

    config_class = MedusaConfig
    needs = (MEDUSA_HEADS,)
    lossless_sampling = {"acceptance": "rejection"}
    lossy_when = "acceptance=typical"
    main_settings = ("tree", "acceptance")
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)

    def __init__(self, cfg: MedusaConfig, engine: Engine, sampling: SamplingConfig, heads: Optional[torch.nn.Module] = None):
        super().__init__(cfg, engine, sampling)
        if cfg.acceptance not in ACCEPTANCE:
            raise ValueError(f"unknown Medusa acceptance '{cfg.acceptance}'; use one of {', '.join(ACCEPTANCE)}")
        if sampling.do_sample and cfg.acceptance == "greedy":
            raise ValueError("method.medusa.acceptance=greedy cannot sample; use rejection (lossless) or typical (lossy)")
        if heads is None:
            from harness.drafters.medusa import load_heads  # noqa: PLC0415

            lm_head = engine.model.get_output_embeddings().weight
            heads = load_heads(resolve_repo_path(cfg.heads), hidden_size=lm_head.shape[1], vocab_size=lm_head.shape[0])
        # compiled too when the engine is (model.compile=true): one graph, the input is always [1, hidden]
        self.heads = engine.compile_module(heads.to(device=engine.device, dtype=engine.dtype).eval())
        self.tree = build_tree(tree_choices(cfg), str(engine.device))
        if self.tree.max_depth > heads.num_heads:
            raise TreeError(f"the tree is {self.tree.max_depth} deep but there are only {heads.num_heads} Medusa heads")
        self.mode = cfg.acceptance if sampling.do_sample else "greedy"
        self.draft_clock = DraftClock(engine)  # the heads' forwards are the step's draft forwards

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    def headroom(self) -> int:
        """A step's nodes sit up to the tree's depth past the last committed token: the deepest
        ones of the last step reach depth - 1 positions past a full-length output."""
        return self.tree.max_depth - 1

    @torch.inference_mode()
    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The steps; the ``LoopEnd``'s cache then holds prompt + tokens but the last."""
        self.check_context(len(prompt_ids), stop)
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed, hidden=True)
        accept = self.typical if self.mode == "typical" else None
        # 1. prefill: the prompt's last row gives the root token and the heads' input
        hidden = verifier.prefill().hidden[-1:]
        while not verifier.done:
            # 2. node tokens: the root, then the heads' top-k at the last committed position
            with self.engine.phase("tree"):
                tokens = self.candidates(verifier.seq[-1], hidden)
            # 3. one target forward over the whole tree, acceptance, commit, cache compaction
            step = verifier.verify(DraftTree(tokens, self.tree.shape.parents), accept)
            # 4. the last kept node's hidden state predicted the last committed token: the heads' next input
            hidden = step.hidden[-1:]
        extra = {"tree": self.tree_name, "tree_size": self.tree.size, "tree_depth": self.tree.max_depth,
                 "acceptance": self.mode}  # fmt: skip
        return LoopEnd(verifier.result(lossy=self.cfg.acceptance == "typical", extra=extra), verifier.cache)

    @property
    def tree_name(self) -> str:
        return "custom" if self.cfg.choices else self.cfg.tree

    # ---- the phases of a step --------------------------------------------------------
    def candidates(self, root: int, hidden: torch.Tensor) -> torch.Tensor:
        """Token of every tree node: [root, then heads' top-k picked by (depth, rank)]."""
        with self.draft_clock.timed(1):
            logits = self.heads(hidden)[:, -1]
        return node_tokens(self.tree, root, logits)

    def typical(self, tree: DraftTree, shape: TreeShape, logits: torch.Tensor, gen) -> tuple[list[int], list[int]]:
        """Upstream's typical acceptance (lossy): accept a node when its probability under
        its parent exceeds min(eps, alpha * exp(-entropy)); longest path, ties broken by
        likelihood; the last token is sampled from the last accepted node."""
        cfg = self.cfg
        tokens = torch.as_tensor(tree.tokens, device=logits.device)
        p = probabilities(logits, self.sampling)  # [T, V]
        entropy = -(p * torch.log(p.clamp_min(1e-20))).sum(dim=-1)
        threshold = torch.clamp(cfg.posterior_alpha * torch.exp(-entropy), max=cfg.posterior_threshold)
        paths, valid = _padded(shape)
        cand = p[paths[:, :-1], tokens[paths[:, 1:]]]  # [P, D] probability of each path node
        ok = (cand > threshold[paths[:, :-1]]) & valid
        run = ok.cumprod(dim=1)
        lengths = run.sum(dim=1)
        score = (torch.log(cand.clamp_min(1e-20)) * run).sum(dim=1)
        score = torch.where(lengths == lengths.max(), score, torch.full_like(score, float("-inf")))
        best = int(score.argmax())
        nodes = list(shape.paths[best][: int(lengths[best]) + 1])
        new = tokens[nodes[1:]].tolist()
        new.append(int(torch.multinomial(p[nodes[-1]], 1, generator=gen)))
        return nodes, new


@functools.lru_cache(maxsize=32)
def _padded(shape: TreeShape) -> tuple[torch.Tensor, torch.Tensor]:
    """The tree's root-to-leaf paths as one [P, D+1] tensor (short ones padded with the root,
    to gather with) and [P, D] bool: the path has a node at depth j+1."""
    width = shape.max_depth + 1
    rows = [list(p) + [0] * (width - len(p)) for p in shape.paths]
    valid = [[j < len(p) - 1 for j in range(width - 1)] for p in shape.paths]
    dev = shape.mask.device
    return torch.tensor(rows, device=dev), torch.tensor(valid, dtype=torch.bool, device=dev)
