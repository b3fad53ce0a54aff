"""SPACE auto-correct decoding (Yi et al. 2024, "Smart Parallel Auto-Correct dEcoding").

The model has been fine-tuned (``harness.train.space``) so that k mask tokens ``[M]``
placed after a sequence guess the tokens that follow its next token. One target
forward then both verifies the previous step's guesses and makes new ones.

Every step feeds the chunk (layout built once per k, see :func:`chunk_layout`)::

    [x_{n-1}] G_0  c_0 G_1  c_1 G_2 ... c_{k-1} G_k        G_j = k mask tokens

``c_i`` sees the prefix and ``c_0..c_{i-1}``; a mask of ``G_j`` sees the prefix,
``c_0..c_{j-1}`` and the earlier masks of its own group (every mask group is hidden
from all later rows). ``c_i`` sits at position n+i, mask m of ``G_j`` at n+j+m.

1. Verify: the rows of ``x_{n-1}, c_0, .., c_{k-1}`` go to the shared chain acceptance
   (``ChainVerifier.accept``: greedy: argmax match; sampling: the one-hot-draft rule, exact
   because argmax candidates are a deterministic draft).
   The accepted prefix ``c_0..c_{a-1}`` and one target token (the bonus) are committed.
2. Guess: the argmax of the k mask rows of ``G_a`` (the group that saw exactly the
   accepted prefix) become the next candidates; they guess the k tokens after the bonus.
3. KV: keep the prefix, ``x_{n-1}`` and the accepted candidates (strided by k+1 in the
   chunk) with ``KVCache.keep``, which moves only those a entries; the bonus is fed
   next step as the new ``x_{n-1}``.

The prefill runs ``prompt + G_0`` causally (the masks are last, so nothing needs hiding):
its last prompt row gives the first token and ``G_0`` the first candidates, so the
first real step already verifies guesses.

k and the mask id come from the method config, else from the checkpoint's config
(``space_k``, ``space_mask_token_id``, written by ``harness.train.space``), else (mask
id only) from the tokenizer's mask token. Released checkpoints without those fields
(cteant's vicuna-v1.3-7b-space: mask id 32002, k = 5) need ``method.space.k=5
method.space.mask_id=32002``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.acceptance import ChainVerifier
from methods.base import MASK_FINETUNE, Generation, Method


@dataclass
class SpaceConfig(MethodConfig):
    name: str = "space"
    # mask tokens per group = candidates per step (at most the checkpoint's config.space_k); the fastest on
    # HumanEval's tuning split in results/space-k.md (make tables-space); None = the checkpoint's space_k
    k: Optional[int] = 1
    mask_id: Optional[int] = None  # the [M] id; None = config.space_mask_token_id, else the tokenizer's mask token


class SpaceSetupError(ValueError):
    """k or the mask id is missing or invalid for this model; the message says how to fix it."""


@dataclass(frozen=True)
class ChunkLayout:
    """Where everything sits in the chunk of one step, for one k (positions relative to x_{n-1})."""

    k: int
    visible: torch.Tensor  # bool [L, L]: row may attend to column (inside the chunk)
    rel_pos: torch.Tensor  # long [L]: position id minus the position of x_{n-1}
    verify_rows: tuple[int, ...]  # rows of x_{n-1}, c_0, .., c_{k-1}
    cand_rows: tuple[int, ...]  # rows of c_0, .., c_{k-1}
    groups: tuple[tuple[int, ...], ...]  # rows of G_0, .., G_k (k rows each)

    @property
    def length(self) -> int:
        return 1 + self.k * (self.k + 2)


@functools.lru_cache(maxsize=None)
def chunk_layout(k: int) -> ChunkLayout:
    """The chunk's visibility matrix and positions for k (built once, cached)."""
    if k < 1:
        raise SpaceSetupError(f"SPACE needs k >= 1 mask tokens per group, got {k}")
    group_of: list[int] = [-1]  # -1: a real token (x_{n-1} or a candidate)
    rel: list[int] = [0]
    cand_rows: list[int] = []
    groups: list[tuple[int, ...]] = []
    for j in range(k + 1):
        if j > 0:  # c_{j-1} at n + j - 1, i.e. j after x_{n-1}
            cand_rows.append(len(group_of))
            group_of.append(-1)
            rel.append(j)
        groups.append(tuple(range(len(group_of), len(group_of) + k)))
        for m in range(k):  # mask m of G_j at n + j + m
            group_of.append(j)
            rel.append(1 + j + m)
    g = torch.tensor(group_of)
    size = len(group_of)
    causal = torch.ones(size, size, dtype=torch.bool).tril()
    # a column inside a mask group is visible only to rows of the same group
    col_is_mask = (g >= 0).view(1, -1)
    same_group = g.view(-1, 1) == g.view(1, -1)
    visible = causal & (~col_is_mask | same_group)
    return ChunkLayout(
        k=k,
        visible=visible,
        rel_pos=torch.tensor(rel),
        verify_rows=(0, *cand_rows),
        cand_rows=tuple(cand_rows),
        groups=tuple(groups),
    )


def vocab_size(engine: Engine) -> int:
    return int(engine.config.get_text_config().vocab_size)


def resolve_k_and_mask(cfg, engine: Engine, kind: str = "space", hint: str = " (cteant's released checkpoints use "
                       "k=5, mask id 32002)") -> tuple[int, int]:  # fmt: skip
    """k and the mask id: method config, then the checkpoint config (``<kind>_k``,
    ``<kind>_mask_token_id``, written by ``harness train <kind>``), then (mask) the tokenizer."""
    model_cfg = engine.config
    k = cfg.k if cfg.k is not None else getattr(model_cfg, f"{kind}_k", None)
    if k is None:
        raise SpaceSetupError(
            f"this model's config has no {kind}_k (not a checkpoint from `harness train {kind}`); "
            f"give k explicitly: method.{kind}.k=<int>{hint}"
        )
    mask = cfg.mask_id if cfg.mask_id is not None else getattr(model_cfg, f"{kind}_mask_token_id", None)
    if mask is None and engine.tokenizer is not None:
        mask = engine.tokenizer.mask_token_id
    if mask is None:
        raise SpaceSetupError(
            f"no mask token id: the config has no {kind}_mask_token_id and the tokenizer no mask token; "
            f"set method.{kind}.mask_id=<int>{hint}"
        )
    k, mask = int(k), int(mask)
    if k < 1:
        raise SpaceSetupError(f"{kind} needs k >= 1, got k={k}")
    vocab = vocab_size(engine)
    if not 0 <= mask < vocab:
        raise SpaceSetupError(
            f"mask id {mask} is outside the model's vocabulary of {vocab} tokens "
            f"(wrong checkpoint, or the embeddings were never resized for [M]); set method.{kind}.mask_id"
        )
    return k, mask


class Space(Method):
    """SPACE: a fine-tuned model fills mask tokens with candidates and verifies earlier ones in the same forward."""

    config_class = SpaceConfig
    needs = (MASK_FINETUNE,)
    main_settings = ("k",)
    # the shared chain acceptance (greedy; sampling: the one-hot-draft rule, exactly the target's
    # distribution); a test swaps in a broken one as its negative control
    verifier_class = ChainVerifier

    def __init__(self, cfg: SpaceConfig, engine: Engine, sampling):
        super().__init__(cfg, engine, sampling)
        self.k, self.mask_id = resolve_k_and_mask(cfg, engine)
        self.layout = chunk_layout(self.k)
        dev = engine.device
        self._visible = self.layout.visible.to(dev)
        self._rel_pos = self.layout.rel_pos.to(dev)
        self._verify_rows = torch.tensor(self.layout.verify_rows, device=dev)
        self._groups = torch.tensor(self.layout.groups, device=dev)  # [k+1, k]

    def headroom(self) -> int:
        """The chunk's last masks sit 2k positions after x_{n-1}: 2k - 1 past a full-length output."""
        return 2 * self.k - 1

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        self.check_context(len(prompt_ids), stop)
        engine, k, mask_id = self.engine, self.k, self.mask_id
        chain = self.verifier_class(engine, self.sampling, stop, prompt_ids, seed)
        cache = chain.cache

        # 1. prefill prompt + G_0: the last prompt row gives the first token, G_0 the first candidates
        logits = engine.forward(chain.seq + [mask_id] * k, cache, keep_last=k + 1).logits  # rows: last prompt token, G_0
        chain.first_token(logits[0])
        cands = self.propose(logits[1:], chain.seq)
        cache.truncate(len(chain.seq) - 1)

        while not chain.done:
            # 2. one forward over the chunk: [x_{n-1}] G_0 c_0 G_1 ... c_{k-1} G_k
            n = len(chain.seq)
            ids, positions, mask = self._chunk(chain.seq[-1], cands, n, len(cache))
            logits = engine.forward(ids, cache, positions=positions, mask=mask).logits
            # 3. the shared chain acceptance on the rows of x_{n-1}, c_0..c_{k-1}: accepted prefix + one target token
            a = chain.accept(cands, logits.index_select(0, self._verify_rows))
            if chain.done:
                break
            # 4. new candidates from G_a; keep prefix, x_{n-1} and the accepted candidates' KV
            cands = self.propose(logits.index_select(0, self._groups[a]), chain.seq)
            if a:
                cache.keep(list(range(n)) + [n - 1 + r for r in self.layout.cand_rows[:a]])
            else:
                cache.truncate(n)  # only x_{n-1} stays: nothing to move

        return chain.result(extra={"k": k, "mask_id": mask_id, "chunk_tokens": self.layout.length})

    def propose(self, group_logits: torch.Tensor, seq: list[int]) -> torch.Tensor:
        """The k candidates that guess the tokens after ``seq`` (prompt + committed tokens):
        the argmax of the k mask rows that saw all of ``seq`` but its last token."""
        return group_logits.argmax(dim=-1)

    def _chunk(self, last: int, cands: torch.Tensor, n: int, past: int):
        """ids, positions and the [L, past + L] mask of one step (cache holds x[0:n-1])."""
        k = self.k
        masks = cands.new_full((k, k), self.mask_id)
        body = torch.cat((cands.view(k, 1), masks), dim=1).flatten()  # c_i + G_{i+1}
        ids = torch.cat((cands.new_tensor([last]), masks[0], body))
        positions = self._rel_pos + (n - 1)
        prefix = torch.ones(self.layout.length, past, dtype=torch.bool, device=self._visible.device)
        return ids, positions, torch.cat((prefix, self._visible), dim=1)
