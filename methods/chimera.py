"""Chimera (Zeng et al. 2024): a lightweight drafter on the frozen target's features guesses
several future tokens at once; the guesses form a tree the target verifies.

The drafter (harness/drafters/chimera.py) reads the embeddings of the last few committed
tokens (trigram encoder) and every hidden state of the target so far (full-context encoder:
its keys and values are kept and extended with the rows each step adds), and each of its K
residual heads gives a distribution over the token j+1 after the root.

One step:
  1. drafter: the fused state of (last tokens, all target states); head j's top-k fills the
     tree's nodes at depth j+1 (Medusa's ``choices`` trees: rank r at depth d -> the r-th
     best token of head d-1, not conditioned on the path);
  2. the shared tree step (methods/tree.py): one target forward over the tree, the longest
     root path the target agrees with plus one token, commit through the stop rules, cache
     compaction; the kept nodes' hidden states extend the drafter's context.

Greedy: lossless (the target's argmax decides). Sampling: the tree step's rule for
deterministic candidates, so the output is distributed exactly as sampling the target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.drafters.chimera import ChimeraDrafter, load_drafter
from harness.engine import DraftClock, Engine
from harness.paths import resolve_repo_path
from harness.stops import StopRule
from methods.base import CHIMERA_DRAFTER, Generation, LoopEnd, Method
from methods.eagle import EagleVerifier
from methods.medusa import build_tree, tree_choices
from methods.tree import DraftTree, TreeError


@dataclass
class ChimeraMethodConfig(MethodConfig):
    name: str = "chimera"
    drafter: str = "zoo/target-chimera"  # directory of the trained drafter (`harness train chimera`)
    tree: str = "small"  # chain | small | large: Medusa's `choices` trees (methods.medusa.TREES), 3 deep
    choices: Optional[list[list[int]]] = None  # explicit tree (top-k ranks per depth), e.g. [[0],[1],[0,0]]


class ContextState:
    """The drafter's view of one generation: the projected keys and values of every target
    hidden state so far, the last one, and the committed tokens' embeddings it reads."""

    def __init__(self, drafter: ChimeraDrafter, hidden: torch.Tensor):
        self.drafter = drafter
        self.keys, self.values = drafter.context.keys_values(hidden[None])
        self.last = hidden[-1:]  # [1, H] the state that chose the last committed token

    def extend(self, hidden: torch.Tensor) -> None:
        """Append the target states of newly kept positions (root + accepted nodes)."""
        k, v = self.drafter.context.keys_values(hidden[None])
        self.keys, self.values = torch.cat((self.keys, k), dim=2), torch.cat((self.values, v), dim=2)
        self.last = hidden[-1:]

    def head_states(self, ngram_embeds: torch.Tensor) -> torch.Tensor:
        """[K, H] for the root: the heads' inputs to the LM head."""
        last = self.last[None]  # [1, 1, H]
        context = self.drafter.context(last, self.keys, self.values, causal=False)
        z = self.drafter.fused(ngram_embeds[None, None], last, context)
        return self.drafter.head_states(z)[:, 0, 0]


class Chimera(Method):
    """Chimera: a light drafter over the last tokens and the target's states proposes a tree of future tokens."""

    config_class = ChimeraMethodConfig
    needs = (CHIMERA_DRAFTER,)
    main_settings = ("drafter", "tree")
    cfg: ChimeraMethodConfig
    verifier_class = EagleVerifier  # the shared tree step, its prefill keeping every prompt row's state

    def __init__(self, cfg: ChimeraMethodConfig, engine: Engine, sampling: SamplingConfig,
                 drafter: Optional[ChimeraDrafter] = None):  # fmt: skip
        super().__init__(cfg, engine, sampling)
        lm_head = engine.model.get_output_embeddings().weight
        if drafter is None:
            drafter = load_drafter(resolve_repo_path(cfg.drafter), hidden_size=lm_head.shape[1], vocab_size=lm_head.shape[0])
        self.drafter = drafter.to(device=engine.device, dtype=engine.dtype).eval()
        self.embed = engine.model.get_input_embeddings()
        self.lm_head = engine.model.get_output_embeddings()
        self.tree = build_tree(tree_choices(cfg), str(engine.device))
        if self.tree.max_depth > drafter.num_heads:
            raise TreeError(f"the tree is {self.tree.max_depth} deep but the Chimera drafter has {drafter.num_heads} heads")
        self.draft_clock = DraftClock(engine)  # the drafter's forwards are the step's draft forwards

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    def headroom(self) -> int:
        """The deepest nodes of the last step reach depth - 1 positions past a full-length output."""
        return self.tree.max_depth - 1

    @torch.inference_mode()
    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The steps; the ``LoopEnd``'s cache then holds prompt + tokens but the last."""
        self.check_context(len(prompt_ids), stop)
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed, hidden=True)
        # 1. prefill: every prompt row's state (the drafter's context) and the first token (the root)
        context = ContextState(self.drafter, verifier.prefill().hidden)
        while not verifier.done:
            # 2. the drafter's top-k per head at the root fill the tree's nodes
            with self.engine.phase("tree"):
                tokens = self.candidates(verifier.seq, context)
            # 3. one target forward over the tree, acceptance, commit, cache compaction
            step = verifier.verify(DraftTree(tokens, self.tree.shape.parents))
            # 4. the kept nodes' states (root + accepted) join the drafter's context
            with self.draft_clock.timed(len(step.hidden)):
                context.extend(step.hidden)
        extra = {"tree": "custom" if self.cfg.choices else self.cfg.tree, "tree_size": self.tree.size,
                 "tree_depth": self.tree.max_depth}  # fmt: skip
        return LoopEnd(verifier.result(extra=extra), verifier.cache)

    def candidates(self, seq: list[int], context: ContextState) -> torch.Tensor:
        """Token of every tree node: the root, then the heads' top-k picked by (depth, rank)."""
        n = self.drafter.config.ngram
        last = seq[-n:]
        last = [last[0]] * (n - len(last)) + last  # the first token repeated before the start
        embeds = self.embed(torch.tensor(last, device=self.engine.device))  # [ngram, H]
        with self.draft_clock.timed(1):
            logits = self.lm_head(context.head_states(embeds)[: self.tree.max_depth])  # [depth, V]
        top = torch.topk(logits, self.tree.top_k, dim=-1).indices.flatten()
        return torch.cat((top.new_tensor([seq[-1]]), top[self.tree.gather]))
