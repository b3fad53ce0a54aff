"""COrAL decoding (Xie et al. 2024, "COrAL: Order-Agnostic Language Modeling for Efficient
Iterative Refinement"): a sliding block of positions ahead of the committed text, filled and
refined by the model in one forward with the verification of the last step's drafts.

The model has been fine-tuned (``harness.train.coral``) so that a block of 2k+1 slots after a
context, holding drafts and mask tokens and attending to each other in any order, outputs at
every slot the token at that slot's position. Every step feeds the chunk::

    [x_{n-1}] c_0 .. c_{k-1} | s_0 .. s_{2k}        s_j = c_j (j < k), else the mask token

``x_{n-1}, c_0 .. c_{k-1}`` are causal rows at positions n-1 .. n+k-1 (they see the cache and
each other in order, never the block): the target's own next-token rows for the drafts. Slot
``s_j`` sits at position n+j and sees the cache, ``x_{n-1}`` and every slot (the block is
order-agnostic: later drafts inform earlier positions, backward reconstruction, and earlier
ones later positions, forward prediction); nothing outside the block sees a slot.

1. Accept, by one of two modes (``mode``):
   - ``strict`` (lossless): the causal rows go to the shared chain acceptance
     (``ChainVerifier.accept``: greedy: argmax match; sampling: the one-hot-draft rule, exact
     because the drafts are a deterministic function of the committed text), which commits the
     accepted prefix ``c_0..c_{a-1}`` and one target token;
   - ``paper`` (LOSSY, every Generation marked so): the paper's self-consistency acceptance.
     ``c_0`` is checked against the target's row of ``x_{n-1}``; every later ``c_i`` is kept
     while it equals the block's refinement ``r_i`` (the slot's argmax); the refinement ``r_a``
     of the first slot that disagrees (the target's token when ``c_0`` is rejected) is
     committed after them. Greedy only.
2. Slide: the refined slots ``r_{a+1} .. r_{a+k}`` (the positions right after the last committed
   token, refined from a block that held the old drafts) become the next drafts.
3. KV: keep the cache, ``x_{n-1}`` and the accepted drafts' causal rows (they are contiguous, so a
   truncate); the block's entries go. The last committed token is fed next step as ``x_{n-1}``.

The prefill runs ``prompt + s_0..s_{2k}`` (all masks; the prompt causal, the block seeing all of
it and itself): the last prompt row gives the first token, slots 1..k the first drafts.

k and the mask id come from the method config, else from the checkpoint's config
(``coral_k``, ``coral_mask_token_id``, written by ``harness train coral``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.acceptance import ChainVerifier
from methods.base import BLOCK_FINETUNE, Generation, Method
from methods.space import resolve_k_and_mask

MODES = ("strict", "paper")


@dataclass
class CoralConfig(MethodConfig):
    name: str = "coral"
    mode: str = "strict"  # strict (lossless: the target's rows verify the drafts) | paper (self-consistency; lossy)
    k: Optional[int] = None  # drafts per step (the block has 2k+1 slots); None = the checkpoint's coral_k
    mask_id: Optional[int] = None  # the mask id; None = config.coral_mask_token_id, else the tokenizer's mask token


@dataclass(frozen=True)
class BlockLayout:
    """Where everything sits in the chunk of one step, for one k (positions relative to x_{n-1})."""

    k: int
    visible: torch.Tensor  # bool [L, L]: row may attend to column (inside the chunk)
    rel_pos: torch.Tensor  # long [L]: position id minus the position of x_{n-1}
    slots: int  # first row of the block (rows slots .. slots + 2k)

    @property
    def length(self) -> int:
        return 3 * self.k + 2


@functools.lru_cache(maxsize=None)
def block_layout(k: int) -> BlockLayout:
    """The chunk's visibility matrix and positions for k (built once, cached)."""
    if k < 1:
        raise ValueError(f"COrAL needs k >= 1 drafts per step, got {k}")
    chain, width = k + 1, 2 * k + 1  # x_{n-1} + drafts; the block
    size = chain + width
    visible = torch.zeros(size, size, dtype=torch.bool)
    visible[:chain, :chain] = torch.ones(chain, chain, dtype=torch.bool).tril()  # causal rows
    visible[chain:, 0] = True  # every slot sees x_{n-1} ...
    visible[chain:, chain:] = True  # ... and the whole block
    rel = torch.cat((torch.arange(chain), torch.arange(1, width + 1)))  # c_i at n+i, s_j at n+j
    return BlockLayout(k=k, visible=visible, rel_pos=rel, slots=chain)


class Coral(Method):
    """COrAL: a fine-tuned model refines a sliding block of drafts, verified by its causal rows in the same forward."""

    config_class = CoralConfig
    needs = (BLOCK_FINETUNE,)
    main_settings = ("mode", "k")
    lossy_when = "mode=paper"  # shown by `harness list`
    # the shared chain acceptance (strict mode); a test swaps in a broken one as its negative control
    verifier_class = ChainVerifier

    def __init__(self, cfg: CoralConfig, engine: Engine, sampling: SamplingConfig):
        super().__init__(cfg, engine, sampling)
        if cfg.mode not in MODES:
            raise ValueError(f"method.coral.mode={cfg.mode!r}: use strict (lossless) or paper (the paper's, lossy)")
        if cfg.mode == "paper" and sampling.do_sample:
            raise ValueError("method.coral.mode=paper decodes greedily; set method.coral.mode=strict to sample")
        self.k, self.mask_id = resolve_k_and_mask(cfg, engine, "coral", "")
        self.layout = block_layout(self.k)
        self._visible = self.layout.visible.to(engine.device)
        self._rel_pos = self.layout.rel_pos.to(engine.device)

    def headroom(self) -> int:
        """The block's last slot sits 2k + 1 positions after x_{n-1}: 2k past a full-length output."""
        return 2 * self.k

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        self.check_context(len(prompt_ids), stop)
        engine, k = self.engine, self.k
        chain = self.verifier_class(engine, self.sampling, stop, prompt_ids, seed)
        cache = chain.cache
        paper = self.cfg.mode == "paper"

        # 1. prefill prompt + a block of masks: the last prompt row gives the first token, slots 1..k the drafts
        ids, positions, mask = self._prefill(chain.seq)
        logits = engine.forward(ids, cache, positions=positions, mask=mask, keep_last=2 * k + 2).logits
        chain.first_token(logits[0])
        drafts = self.propose(logits[2 : k + 2].argmax(dim=-1), chain.seq)
        cache.truncate(len(chain.seq) - 1)

        while not chain.done:
            # 2. one forward: the causal rows of x_{n-1}, c_0..c_{k-1}, then the block
            n = len(chain.seq)
            ids, positions, mask = self._chunk(chain.seq[-1], drafts, n, len(cache))
            logits = engine.forward(ids, cache, positions=positions, mask=mask).logits
            refined = logits[self.layout.slots :].argmax(dim=-1)  # r_0 .. r_{2k}
            # 3. accept: the target's rows (strict) or the block's self-consistency (paper)
            if paper:
                a = chain.commit(k, self.consistent(drafts, refined, logits[0]))
            else:
                a = chain.accept(drafts, logits[: k + 1])
            if chain.done:
                break
            # 4. slide: the refined slots after the last committed token are the next drafts
            drafts = self.propose(refined[a + 1 : a + 1 + k], chain.seq)
            cache.truncate(n + a)  # the cache, x_{n-1} and the accepted drafts' causal rows

        return chain.result(extra={"mode": self.cfg.mode, "k": k, "mask_id": self.mask_id,
                                   "chunk_tokens": self.layout.length}, lossy=paper)  # fmt: skip

    def propose(self, refined: torch.Tensor, seq: list[int]) -> torch.Tensor:
        """The next k drafts: the block's refined tokens at the k positions after ``seq`` (prompt +
        committed tokens). A test swaps in an oracle here."""
        return refined

    def consistent(self, drafts: torch.Tensor, refined: torch.Tensor, first_row: torch.Tensor) -> list[int]:
        """The paper mode's tokens: c_0 if the target's row agrees, then c_1.. while the block's
        refinement agrees, then the refinement of the first disagreeing slot (or the target's token)."""
        c, r = drafts.tolist(), refined.tolist()
        first = int(first_row.argmax())
        if c[0] != first:
            return [first]
        a = 1
        while a < len(c) and c[a] == r[a]:
            a += 1
        return c[:a] + [r[a]]

    def _prefill(self, prompt: list[int]):
        """ids, positions and mask of the prefill: the prompt causal, then 2k+1 masks that see it all."""
        device, p, width = self._visible.device, len(prompt), 2 * self.k + 1
        ids = torch.tensor(prompt + [self.mask_id] * width, device=device)
        mask = torch.ones(p + width, p + width, dtype=torch.bool, device=device)
        mask[:p, :p] = mask[:p, :p].tril()
        mask[:p, p:] = False
        return ids, torch.arange(p + width, device=device), mask

    def _chunk(self, last: int, drafts: torch.Tensor, n: int, past: int):
        """ids, positions and the [L, past + L] mask of one step (the cache holds x[0:n-1])."""
        k = self.k
        block = torch.cat((drafts, drafts.new_full((k + 1,), self.mask_id)))
        ids = torch.cat((drafts.new_tensor([last]), drafts, block))
        prefix = torch.ones(self.layout.length, past, dtype=torch.bool, device=self._visible.device)
        return ids, self._rel_pos + (n - 1), torch.cat((prefix, self._visible), dim=1)
