"""Token-tree speculative decoding with a draft model (SpecInfer, Miao et al. 2024; LLMCad).

The draft model of ``speculative`` (same loading and checks: ``DraftModelMethod``) proposes a
*tree* of ``max_nodes`` tokens instead of a chain; the target verifies the whole tree in one
forward with the tree mask (methods/tree.py ``TreeVerifier``: acceptance, commit, cache
compaction, counts).

State between steps: the committed tokens ``x[0:n]``, the target cache holding ``x[0:n-1]``
(the verifier's invariant) and the draft cache holding a prefix of ``x`` (not ``x[n-1]``).

One step:
  1. the draft catches up on the committed tokens it has not seen (1 or 2; the prompt at
     first); the last row is its distribution after the root ``x[n-1]``;
  2. level by level, depth d = 0, 1, ...: every frontier node (the root at depth 0) gets the
     draft's top ``branching[d]`` tokens as children, each scored by the draft's log-probability
     of its whole path (at ``score_temperature``: under greedy verification the draft's top-1
     is the target's choice more often than its probability says, so a sharper score that
     favours depth places the budget better). The tree is the ``max_nodes`` best-scored nodes of all drafted (a child
     never scores above its parent, so they form a tree; with a calibrated draft it is the
     tree of that size with the most expected accepted tokens, and the chain is one of the
     trees it chooses from). The new nodes that are among the best ``max_nodes`` so far (the
     others can never enter the tree) are fed to the draft in ONE forward over its cache, each
     at position n-1+depth under a tree mask (the prefix, its ancestors and itself), which gives
     their children: one draft forward per depth, whatever the width;
  3. the target verifies the tree in one forward (``TreeVerifier.verify``);
  4. the draft cache keeps the prefix and the accepted nodes it was fed (``KVCache.keep``):
     every accepted node but possibly the last had children, so was fed.

LLMCad's option (``confidence`` > 0): step 2 stops going deeper as soon as no node of the depth
just drafted has a path probability under the draft (temperature 1) of at least ``confidence``, so
the target verifies early where the draft is unsure and late where it is sure (LLMCad also
overlaps drafting with verifying, which one CPU thread cannot: not done here).

The tree never goes deeper than the tokens still allowed (``TreeVerifier.room``), so no step
uses a position past prompt + max_new_tokens.

Acceptance: the children are deterministic (the draft's top-k, distinct siblings), so greedy
takes the longest root path the target agrees with plus one target token, and sampling uses the
verifier's one-hot multi-candidate rule (child c accepted with probability p'(c) / sum(p'), p'
without the siblings already rejected): both lossless. Chosen over children drawn i.i.d. from the
draft's q (SpecInfer's min(1, p/q) rule, also lossless) because deterministic children can be
ranked and cut to the budget in both modes (a sampled tree cannot be reranked by its own values
without breaking that rule), and because i.i.d. draws repeat tokens under the peaked
distributions of code, spending the budget twice on one token; the price is a lower acceptance
when p is spread out (p(c) instead of min(1, p(c)/q(c))).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.kvcache import KVCache
from harness.stops import StopRule
from methods.base import Generation, LoopEnd
from methods.speculative import DraftModelMethod
from methods.tree import DraftTree, TreeVerifier


@dataclass
class SpeculativeTreeConfig(MethodConfig):
    name: str = "speculative-tree"
    draft: Optional[str] = None  # draft model: registry name or hub id / local path; None = the target's `draft`
    # children drafted per node, per depth (the draft's top-k; its length is the deepest a tree goes)
    branching: list[int] = field(default_factory=lambda: [4, 2, 2, 1, 1, 1])
    # draft tokens per tree: the best-scored drafted nodes (the draft budget); the fastest on HumanEval's
    # tuning split in results/speculative-tree.md (make tables-spec-tree)
    max_nodes: int = 2
    # temperature of the draft distribution that scores paths (ranking only; acceptance never reads it):
    # < 1 favours depth. Of 1, 0.5, 0.3, 0.15 on 8 HumanEval tuning problems (zoo, greedy), 0.5 was best at
    # 3-4 draft tokens and within 0.03 accepted tokens of the best (0.3) at 6
    score_temperature: float = 0.5
    # LLMCad's confidence-driven verification (Xu et al. 2023): drafting goes one depth deeper only while
    # the best node of the last depth has a path probability under the draft (temperature 1) of at least
    # this, then the target verifies; 0 = off (always as deep as `branching`). The tree is still the best
    # `max_nodes` drafted nodes
    confidence: float = 0.0


class SpeculativeTreeError(ValueError):
    """Settings speculative-tree cannot run with; the message names the field and the fix."""


@dataclass
class DraftedTree:
    """One step's proposal and where its nodes sit in the draft cache."""

    tree: DraftTree  # node tokens and parents
    base: int  # draft cache length before the first fed node (the committed prefix)
    fed: dict[int, int]  # tree node -> its entry in the draft cache after ``base`` (nodes fed to the draft)
    forwards: int  # draft forwards this step took


class SpeculativeTree(DraftModelMethod):
    """Token-tree speculative decoding: a draft model proposes a tree of its top tokens, one target forward verifies it."""

    config_class = SpeculativeTreeConfig
    main_settings = ("max_nodes", "branching")
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)

    def __init__(self, cfg: SpeculativeTreeConfig, engine: Engine, sampling: SamplingConfig,
                 draft: Optional[Engine] = None):  # fmt: skip
        if not cfg.branching or any(int(b) < 1 for b in cfg.branching):
            raise SpeculativeTreeError(f"method.{cfg.name}.branching needs one count >= 1 per depth, "
                                       f"got {list(cfg.branching)}")  # fmt: skip
        if cfg.max_nodes < 1:
            raise SpeculativeTreeError(f"method.{cfg.name}.max_nodes must be >= 1, got {cfg.max_nodes}")
        if cfg.score_temperature <= 0:
            raise SpeculativeTreeError(f"method.{cfg.name}.score_temperature must be > 0, got {cfg.score_temperature}")
        if not 0 <= cfg.confidence < 1:
            raise SpeculativeTreeError(f"method.{cfg.name}.confidence must be in [0, 1) (0 = off), got {cfg.confidence}")
        super().__init__(cfg, engine, sampling, draft)
        self.branching = [int(b) for b in cfg.branching]

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The steps; the ``LoopEnd`` also holds the draft cache (a prefix of prompt + tokens, for the tests)."""
        self.check_context(len(prompt_ids), stop)
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed)
        cache = self.draft.new_cache()
        forwards = 0
        verifier.prefill()
        while not verifier.done:
            # 1-2. the draft catches up and drafts the tree, one forward per depth
            drafted = self.draft_tree(cache, verifier.seq, verifier.room())
            forwards += drafted.forwards
            # 3. one target forward over the tree; acceptance, commit, target cache compaction
            step = verifier.verify(drafted.tree)
            # 4. the draft keeps the prefix and the accepted nodes it has seen
            if drafted.fed:
                kept = [drafted.base + drafted.fed[n] for n in step.nodes[1:] if n in drafted.fed]
                cache.keep(list(range(drafted.base)) + kept)
        extra = {"branching": list(self.branching), "max_nodes": self.cfg.max_nodes, "confidence": self.cfg.confidence}
        return LoopEnd(verifier.result(draft_forwards=forwards, extra=extra), verifier.cache, draft_cache=cache)

    def draft_tree(self, cache: KVCache, seq: list[int], room: int) -> DraftedTree:
        """The step's token tree (module doc, steps 1-2); ``room``: the deepest it may go."""
        root, budget = seq[-1], self.cfg.max_nodes
        depth_limit = min(len(self.branching), room)
        if depth_limit <= 0:
            return DraftedTree(DraftTree([root], (-1,)), len(cache), {}, 0)
        tokens, parents, score = [root], [-1], [0.0]  # score: the draft's log-probability of the node's path
        sure = [0.0]  # the same at temperature 1 (LLMCad's confidence)
        floor = math.log(self.cfg.confidence) if self.cfg.confidence > 0 else -math.inf
        # 1. catch up: the last row is the draft's distribution after the root
        logits = self.draft.forward(seq[len(cache) :], cache, last_only=True).logits
        forwards, base = 1, len(cache)
        fed: dict[int, int] = {}  # node -> its entry in the draft cache after base
        columns: dict[int, list[int]] = {0: []}  # node -> draft cache entries (after base) of its path
        frontier = [0]
        for d in range(depth_limit):
            # 2a. the frontier's top-k children, scored by their path's draft log-probability
            scores = torch.log_softmax(logits.float() / self.cfg.score_temperature, dim=-1)
            logp, kids = scores.topk(self.branching[d], dim=-1)
            raw = torch.log_softmax(logits.float(), dim=-1).gather(-1, kids)
            host = torch.stack((kids.double(), logp.double(), raw.double())).tolist()  # one transfer per depth (ids exact)
            level = []
            for row, node in enumerate(frontier):
                for token, lp, rp in zip(host[0][row], host[1][row], host[2][row]):
                    level.append(len(tokens))
                    tokens.append(int(token))
                    parents.append(node)
                    score.append(score[node] + lp)
                    sure.append(sure[node] + rp)
            if d + 1 == depth_limit or max(sure[n] for n in level) < floor:
                break  # as deep as allowed, or the draft is no longer confident: the target verifies
            # 2b. the new nodes still among the best `budget` get children: one draft forward
            best = set(_best(score, budget))
            frontier = [n for n in level if n in best]
            if not frontier:
                break
            for n in frontier:
                fed[n] = len(fed)
                columns[n] = columns[parents[n]] + [fed[n]]
            mask = torch.zeros(len(frontier), base + len(fed), dtype=torch.bool)
            mask[:, :base] = True
            for row, n in enumerate(frontier):
                mask[row, [base + c for c in columns[n]]] = True
            positions = [len(seq) + d] * len(frontier)  # depth d + 1, after the root at len(seq) - 1
            ids = [tokens[n] for n in frontier]
            logits = self.draft.forward(ids, cache, positions=positions, mask=mask.to(self.draft.device)).logits
            forwards += 1
        # 2c. the tree: the best `budget` nodes, in drafting order (parents before children)
        keep = sorted(_best(score, budget))
        where = {old: new for new, old in enumerate([0] + keep)}
        tree = DraftTree([root] + [tokens[n] for n in keep], (-1,) + tuple(where[parents[n]] for n in keep))
        return DraftedTree(tree, base, {where[n]: i for n, i in fed.items() if n in where}, forwards)


def _best(score: list[float], budget: int) -> list[int]:
    """The ``budget`` best-scored nodes after the root (ties: the earlier node, so a parent comes
    before a child of equal score and the set is always a tree)."""
    return sorted(range(1, len(score)), key=lambda n: (-score[n], n))[:budget]
