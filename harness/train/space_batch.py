"""The packed SAR batch of a SPACE fine-tune: a block's AR part plus groups of mask tokens,
with the 4-D attention mask and position ids that make each group one upstream example
(the layout is described in harness/train/space.py)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from harness.train.data import PaddedBatch, as_padded

IGNORE = -100  # label of positions without a loss


def split_bounds(batch: PaddedBatch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the lowest and highest split point p whose k masks are all labelled by real
    tokens (mask m predicts ``x[p+m+1]``, so p + k <= the last real index). When the batch marks
    the target's generated tokens (self-distilled records), p starts at the first of them: the
    masks then learn to guess the target's own continuation, not the corpus prompt."""
    n_real = batch.valid.sum(1)
    lo = torch.ones_like(n_real)
    if batch.generated is not None:
        lo = batch.generated.int().argmax(1).clamp(min=1)  # first generated index
    return lo, n_real - 1 - k


def pack_space_batch(block: torch.Tensor | PaddedBatch, k: int, groups: int, mask_prob: float, mask_id: int,
                     rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """The packed SAR batch of ``block`` ``[B, L+1]`` (corpus windows, or right-padded records
    as a :class:`PaddedBatch`): AR part plus ``groups`` mask groups.

    Returns input_ids, position_ids, labels ``[B, T]`` (T = L + groups*k; padding and unlabelled
    masks are ``IGNORE``), ``visible`` ``[B, T, T]`` (True = may attend), ``splits``
    ``[B, groups]`` (p of each group), ``n_real`` = L and ``n_tokens`` (labelled AR positions).
    A row too short for one group of k labels gets split points p = 1 and no mask labels.
    """
    padded = as_padded(block)
    ids = padded.ids
    B, L = ids.shape[0], ids.shape[1] - 1
    if L < k + 1:
        raise ValueError(f"blocks of {L} tokens are too short for k={k} (need at least k+1)")
    x = ids[:, :L]
    lo, hi = split_bounds(padded, k)
    usable = hi >= lo
    span = torch.where(usable, hi - lo + 1, 1)
    lo = torch.where(usable, lo, 1)
    draws = torch.from_numpy(rng.random((B, groups)))
    splits = lo[:, None] + (draws * span[:, None]).long().clamp(max=span[:, None] - 1)  # p uniform in [lo, hi]
    offs = torch.arange(k)
    mask_pos = (splits[:, :, None] + offs).reshape(B, groups * k)  # mask m of a group at p + m
    labels_mask = ids.gather(1, mask_pos + 1)  # ... predicts x[p+m+1]
    labelled = torch.from_numpy(rng.random(B) < mask_prob) & usable
    labels_mask[~labelled] = IGNORE
    labels_ar = ids[:, 1:].masked_fill(~padded.valid[:, 1:], IGNORE)
    n_mask = groups * k
    input_ids = torch.cat((x, torch.full((B, n_mask), mask_id, dtype=x.dtype)), dim=1)
    position_ids = torch.cat((torch.arange(L).expand(B, L), mask_pos), dim=1)
    labels = torch.cat((labels_ar, labels_mask), dim=1)
    T = L + n_mask
    visible = torch.zeros(B, T, T, dtype=torch.bool)
    visible[:, :L, :L] = torch.ones(L, L, dtype=torch.bool).tril()  # padding comes after the real tokens
    # mask rows see the real tokens before their group's split point ...
    visible[:, L:, :L] = torch.arange(L).view(1, 1, L) < splits.repeat_interleave(k, dim=1)[:, :, None]
    # ... and the earlier masks of their own group (block-diagonal lower triangles)
    group = torch.arange(n_mask) // k
    visible[:, L:, L:] = (group[:, None] == group[None, :]) & torch.ones(n_mask, n_mask, dtype=torch.bool).tril()
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels, "visible": visible,
            "splits": splits, "n_real": L, "n_tokens": int(padded.valid[:, 1:].sum())}


def attention_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, T]`` booleans -> the 4-D float mask transformers takes (0 / dtype min)."""
    bias = torch.zeros(visible.shape, dtype=dtype, device=visible.device)
    bias.masked_fill_(~visible, torch.finfo(dtype).min)
    return bias.unsqueeze(1)


def packed_logits(model, batch: dict[str, Any]) -> torch.Tensor:
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out = model(
        input_ids=batch["input_ids"].to(device),
        position_ids=batch["position_ids"].to(device),
        attention_mask=attention_bias(batch["visible"].to(device), dtype),
        use_cache=False,
    )
    return out.logits.float()
