"""EAGLE-2 (Li et al. 2024): the EAGLE head with a dynamic draft tree.

The head and its cache are EAGLE's (``methods/eagle.py``: ``HeadDrafter``); only the tree
differs. One step:

  1. the head runs the pending pairs; the root's top-``top_k`` tokens are the first level,
     each scored by its draft log-probability;
  2. for ``depth - 1`` more levels: the head runs the ``top_k`` best nodes of the last level
     (the frontier; one forward), each gets its ``top_k`` best tokens as children, scored by
     the cumulative log-probability along the path (the product of draft probabilities, a
     proxy of the chance the whole path is accepted); the ``top_k`` best children are the
     next frontier;
  3. every drafted node is reranked by that score and the best ``total_tokens`` are verified
     (ties: the earlier node, so a node's parent always ranks above it and the kept nodes
     form a tree);
  4. EAGLE's verify step (one target forward with the tree mask, acceptance, commit).

Dynamic depth (``stop_below``, from Dynamic Depth Decoding, Brown et al. 2024): before each
expansion, drafting stops when the frontier's paths are unlikely, i.e. when the sum of their
cumulative draft probabilities is below ``stop_below``; a confident step drafts all ``depth``
levels, an unsure one stops early and saves head forwards. 0 (never stop) is EAGLE-2 as
published. The tree stays a tree of drafted nodes, so verification and losslessness are as above.

Head forwards per step: at most ``depth``; tree: at most ``total_tokens`` + 1 nodes, ``depth`` deep.
Sampling: the candidates are the head's top-k (deterministic), verified with the
multi-candidate one-hot rule (lossless); the ranking selects among them, which an i.i.d. draw
from q would not allow without bias. Defaults: chosen on the tuning split (README).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from methods.eagle import Eagle, EagleConfig, HeadDrafter
from methods.tree import DraftTree, TreeError


@dataclass
class Eagle2Config(EagleConfig):
    name: str = "eagle2"
    # top_k, depth, total_tokens and stop_below: the fastest job of make tables-eagle2 (HumanEval's tuning split, results/eagle2-trees.md)
    top_k: int = 4  # children per expanded node, and nodes expanded per level
    depth: int = 6  # levels drafted at most (= head forwards per step; the tree's maximum depth)
    total_tokens: int = 8  # draft nodes verified per step (the best by cumulative draft log-probability)
    stop_below: float = 0.7  # dynamic depth: no deeper level once the frontier's summed path probability is below this
    candidates: str = "topk"  # fixed: dynamic trees verify deterministic top-k candidates (module doc)


class Eagle2(Eagle):
    """EAGLE-2: the EAGLE head drafts a dynamic tree, the nodes of highest draft probability."""

    config_class = Eagle2Config
    main_settings = ("depth", "top_k", "total_tokens", "stop_below")

    def check_settings(self) -> None:
        cfg = self.cfg
        for name in ("top_k", "depth", "total_tokens"):
            if int(getattr(cfg, name)) < 1:
                raise TreeError(f"method.{cfg.name}.{name} must be >= 1, got {getattr(cfg, name)}")
        if not 0.0 <= float(cfg.stop_below) < 1.0:
            raise TreeError(f"method.{cfg.name}.stop_below must be in [0, 1) (a probability; 0 = always draft `depth` levels), "
                            f"got {cfg.stop_below}")  # fmt: skip
        if cfg.candidates != "topk":
            raise ValueError(f"method.{cfg.name}.candidates must be topk: a dynamic tree selects its candidates by "
                             "their draft scores, which sampled candidates do not allow losslessly")  # fmt: skip
        self.max_depth = int(cfg.depth)

    def describe(self) -> dict:
        cfg = self.cfg
        return {"top_k": cfg.top_k, "depth": cfg.depth, "total_tokens": cfg.total_tokens, "stop_below": cfg.stop_below,
                "candidates": "topk"}  # fmt: skip

    def propose(self, drafter: HeadDrafter, root: int, depth: int, draw: Optional[torch.Generator]) -> DraftTree:
        k = int(self.cfg.top_k)
        logits = drafter.start(root)
        if depth < 1:
            return drafter.finish()
        top = torch.topk(torch.log_softmax(logits, dim=-1), k)
        scores = [0.0] + top.values.tolist()  # per drafter node: cumulative draft log-probability (root 0)
        frontier = [drafter.node(0, token) for token in top.indices.tolist()]
        for _ in range(depth - 1):
            frontier_scores = [scores[n] for n in frontier]
            if self.unlikely(frontier_scores):
                break
            top = torch.topk(torch.log_softmax(drafter.expand(frontier), dim=-1), k, dim=-1)  # [len(frontier), k]
            base = torch.tensor(frontier_scores, device=top.values.device)
            cum = (base[:, None] + top.values).flatten().tolist()
            tokens = top.indices.flatten().tolist()
            children = [drafter.node(frontier[i // k], token) for i, token in enumerate(tokens)]
            scores.extend(cum)
            best = sorted(range(len(children)), key=lambda i: (-cum[i], i))[:k]
            frontier = [children[i] for i in sorted(best)]
        return self.rerank(drafter, scores)

    def unlikely(self, frontier_scores: list[float]) -> bool:
        """Dynamic depth: the frontier's summed path probability is below ``stop_below``."""
        stop = float(self.cfg.stop_below)
        return stop > 0.0 and sum(math.exp(s) for s in frontier_scores) < stop

    def rerank(self, drafter: HeadDrafter, scores: list[float]) -> DraftTree:
        """The root and the best ``total_tokens`` drafted nodes, in drafting order (parents first)."""
        ranked = sorted(range(1, len(scores)), key=lambda n: (-scores[n], n))
        keep = [0] + sorted(ranked[: int(self.cfg.total_tokens)])
        index = {n: i for i, n in enumerate(keep)}
        drafter.release()
        parents = tuple(-1 if n == 0 else index[drafter.parents[n]] for n in keep)
        return DraftTree(torch.tensor([drafter.tokens[n] for n in keep]), parents)
