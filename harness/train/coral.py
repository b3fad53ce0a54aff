"""COrAL-style order-agnostic fine-tune (Xie et al. 2024, "COrAL: Order-Agnostic Language
Modeling for Efficient Iterative Refinement") of any causal LM, and its export.

The fine-tune teaches the model to fill and refine a *block* of W = 2k+1 positions after a
context in any order (what ``methods/coral.py`` decodes with). It is SPACE's packed fine-tune
(``harness.train.space``: same AR part, same loss, same loop, checkpoint and export) with
another kind of group appended behind each training block::

    x_0 .. x_{L-1} | s_0 s_1 .. s_{W-1} (split p_1) | s_0 .. s_{W-1} (split p_2) | ...

Slot m of the group with split point p sits at position p+m and is labelled with the token
*at* its position, ``x[p+m]``. It holds one of:

- ``x[p+m]`` itself (a right draft), for the first ``f`` slots, ``f`` uniform in 0..k;
- a corrupted draft: with probability ``corrupt_prob`` a filled slot holds a token drawn from
  elsewhere in the same row instead (so the model learns to repair wrong drafts);
- the mask token, for the slots after the filled ones.

A slot sees ``x[0:p]`` and *every* slot of its own group, before and after it (the group is
order-agnostic: later drafts inform earlier positions, the paper's backward reconstruction,
and earlier ones the later, its forward prediction); real tokens never see a slot, and groups
never see each other. At decoding time the block holds the k drafts of the last step and k+1
masks, and its outputs are the refined drafts for the next step.

The decoder reads k and the mask id from the checkpoint's config (``coral_k``,
``coral_mask_token_id``). Files: as SPACE's (``out_dir/checkpoint.pt``, ``out_dir/model_init/``);
:func:`export` writes fp16 safetensors, tokenizer, config, ``training.json``, ``quality.json``
(held-out per-position acceptance, :mod:`harness.train.coral_quality`) and the card ``README.md``.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from harness.train.data import PaddedBatch, as_padded
from harness.train.loop import TrainResult
from harness.train.space import (SpaceBatches, SpaceTrainConfig, finetune_record, load_finetuned, run_mask_finetune,
                                 save_finetuned)  # fmt: skip
from harness.train.space_batch import IGNORE, split_bounds


@dataclass
class CoralTrainConfig(SpaceTrainConfig):
    """One COrAL fine-tune: SPACE's settings (base, data, loop, export) with the block's below.
    SPACE's quality settings (eval_tokens_per_lang, humaneval_limit, max_new_tokens) are not read:
    the export measures the held-out acceptance below instead."""

    out_dir: str = ""  # checkpoint dir ("" = <cache>/train/coral)
    export_dir: str = "zoo/target-coral"  # where export() writes the model (relative = from the repo root)
    k: int = 3  # drafts per decoding step; a block has 2k+1 slots (k drafts + k+1 masks at decoding time)
    mask_prob: float = 1.0  # probability that a block's groups carry a loss
    mask_groups: int = 6  # blocks of 2k+1 slots appended per training row (each at its own split point)
    corrupt_prob: float = 0.25  # probability that a filled slot holds a wrong token (drawn from the same row)
    max_minutes: float = 40.0  # wall-clock budget over all resumed runs
    eval_problems: int = 20  # HumanEval prompts (tuning split) for the held-out per-position acceptance at export
    eval_new_tokens: int = 64  # greedy tokens decoded per prompt for it


def block_slots(k: int) -> int:
    """Slots of one block: the k drafts of a step plus the k+1 positions they may be followed by."""
    return 2 * k + 1


def pack_coral_batch(block: torch.Tensor | PaddedBatch, k: int, groups: int, mask_prob: float, corrupt_prob: float,
                     mask_id: int, rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """The packed batch of ``block`` ``[B, L+1]``: AR part plus ``groups`` order-agnostic blocks of
    2k+1 slots. Same keys as SPACE's :func:`~harness.train.space_batch.pack_space_batch` (so its
    loss applies unchanged), ``splits`` ``[B, groups]`` and ``filled`` ``[B, groups]`` added."""
    padded = as_padded(block)
    ids = padded.ids
    B, L = ids.shape[0], ids.shape[1] - 1
    W = block_slots(k)
    if L < W:
        raise ValueError(f"blocks of {L} tokens are too short for k={k} (need at least 2k+1 = {W})")
    x = ids[:, :L]
    # 1. split points: slot m at p+m is labelled x[p+m], so p + W - 1 must be a real index
    lo, hi = split_bounds(padded, W - 1)
    usable = hi >= lo
    span = torch.where(usable, hi - lo + 1, 1)
    lo = torch.where(usable, lo, 1)
    draws = torch.from_numpy(rng.random((B, groups)))
    splits = lo[:, None] + (draws * span[:, None]).long().clamp(max=span[:, None] - 1)
    slot_pos = splits[:, :, None] + torch.arange(W)  # [B, G, W]
    truth = ids.gather(1, slot_pos.reshape(B, groups * W)).view(B, groups, W)
    # 2. slot contents: f right drafts (some corrupted), then masks
    filled_n = torch.from_numpy(rng.integers(0, k + 1, (B, groups)))
    filled = torch.arange(W) < filled_n[:, :, None]
    n_real = padded.valid.sum(1)
    noise_at = (torch.from_numpy(rng.random((B, groups * W))) * n_real[:, None]).long()
    noise = ids.gather(1, noise_at).view(B, groups, W)
    corrupt = filled & torch.from_numpy(rng.random((B, groups, W)) < corrupt_prob)
    slots = torch.where(filled, torch.where(corrupt, noise, truth), torch.full_like(truth, mask_id))
    # 3. labels: every slot the token at its position (rows without a usable split: none)
    labels_slots = truth.reshape(B, groups * W).clone()
    labelled = torch.from_numpy(rng.random(B) < mask_prob) & usable
    labels_slots[~labelled] = IGNORE
    labels_ar = ids[:, 1:].masked_fill(~padded.valid[:, 1:], IGNORE)
    n_slots = groups * W
    T = L + n_slots
    # 4. attention: causal real part; a slot sees the tokens before its split and its whole group
    visible = torch.zeros(B, T, T, dtype=torch.bool)
    visible[:, :L, :L] = torch.ones(L, L, dtype=torch.bool).tril()
    visible[:, L:, :L] = torch.arange(L).view(1, 1, L) < splits.repeat_interleave(W, dim=1)[:, :, None]
    group = torch.arange(n_slots) // W
    visible[:, L:, L:] = group[:, None] == group[None, :]
    return {"input_ids": torch.cat((x, slots.reshape(B, n_slots)), dim=1),
            "position_ids": torch.cat((torch.arange(L).expand(B, L), slot_pos.reshape(B, n_slots)), dim=1),
            "labels": torch.cat((labels_ar, labels_slots), dim=1), "visible": visible, "splits": splits,
            "filled": filled_n, "n_real": L, "n_tokens": int(padded.valid[:, 1:].sum())}


class CoralBatches(SpaceBatches):
    """SPACE's resumable batches with COrAL's blocks instead of SPACE's mask groups."""

    def __init__(self, blocks, cfg: CoralTrainConfig, mask_id: int):
        super().__init__(blocks, cfg.k, cfg.mask_groups, cfg.mask_prob, mask_id, seed=cfg.seed)
        self.corrupt_prob = cfg.corrupt_prob

    def pack(self, block, rng: np.random.Generator) -> dict[str, Any]:
        return pack_coral_batch(block, self.k, self.groups, self.mask_prob, self.corrupt_prob, self.mask_id, rng)


def run_coral_training(cfg: CoralTrainConfig, log: Optional[Callable[[str], None]] = None) -> tuple[TrainResult, dict]:
    """Fine-tune (or resume); returns the loop result and a summary (also ``summary.json``)."""
    if not 0.0 <= cfg.corrupt_prob <= 1.0:
        raise ValueError(f"corrupt_prob must be in [0, 1], got {cfg.corrupt_prob}")
    return run_mask_finetune(cfg, "coral", lambda blocks, mask_id: CoralBatches(blocks, cfg, mask_id), log)


# ----------------------------------------------------------------------------- export


def export(cfg: CoralTrainConfig, log: Optional[Callable[[str], None]] = None,
           evaluate: Optional[Callable[[Any, int, int], dict[str, Any]]] = None) -> Path:
    """Write the latest checkpoint to ``cfg.export_dir``: ``export_dtype`` safetensors, tokenizer
    (with the mask token), config (``coral_k``, ``coral_mask_token_id``), ``training.json``, with
    ``evaluate`` the held-out per-position acceptance in ``quality.json``, and the card.
    ``evaluate(engine)``: that measure (it runs ``methods/coral.py``, which training code does not
    import; ``harness.cli_train`` passes ``harness.heldout.coral_heldout_acceptance``); None: no quality file."""
    from harness.engine import Engine  # noqa: PLC0415

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    model, tok, ckpt = load_finetuned(cfg, "coral")
    info = finetune_record(ckpt, cfg, model.config, tok, "coral")
    quality = None
    if cfg.evaluate and evaluate is not None:
        t0 = time.time()
        quality = evaluate(Engine.from_model(model, tok), cfg.eval_problems, cfg.eval_new_tokens)
        log(f"[coral] held-out acceptance {quality['acceptance']} in {time.time() - t0:.0f} s")
    files = {"training.json": info, **({"quality.json": quality} if quality is not None else {})}
    final = save_finetuned(model, tok, cfg, files, lambda d: (d / "README.md").write_text(card(cfg, info, quality)))
    log(f"[coral] exported step {info['step']}/{info['planned_steps']} (k={info['k']}) -> {final}")
    return final


def card(cfg: CoralTrainConfig, info: dict, quality: Optional[dict]) -> str:
    """README.md of an exported COrAL fine-tune."""
    s, k = info["settings"], info["k"]
    done = info["schedule_complete"]
    lines = [
        f"# {cfg.export_dir}",
        "",
        f"`{info['base_model']}` after a COrAL-style order-agnostic fine-tune (`harness/train/coral.py`): a block of "
        f"2k+1 = {2 * k + 1} slots behind a context, holding drafts and mask tokens `{info['mask_token']}` (id "
        f"{info['mask_token_id']}) that all see each other, outputs the token at every slot's position; "
        "`methods/coral.py` refines a sliding block with it while verifying the last drafts in the same forward. "
        "k and the mask id are in `config.json` (`coral_k`, `coral_mask_token_id`).",
        "",
        "**The fine-tune changes the model.** `coral` in strict mode is lossless with respect to *this* model: "
        "compare against `autoregressive` run on this directory (`--model zoo-coral`).",
        "",
        "## Training",
        "",
        f"Each row of {s.get('seq_len')} tokens keeps its next-token loss; {s.get('mask_groups')} blocks at random "
        f"split points in the continuation are appended, each with its first f slots (f uniform in 0..{k}) holding "
        f"the true tokens, each replaced by another token of the row with probability {s.get('corrupt_prob')}, the "
        f"rest masks; loss = AR loss + {s.get('mask_weight')} x slot loss. Data: {info['data'].get('source')} "
        f"({info['data'].get('rows', 0):,} rows, {info['data'].get('tokens', 0):,} tokens).",
        "",
        f"{info['step']:,} optimiser steps of {s.get('batch_size')} rows, {info['training_tokens']:,} tokens, "
        f"{info['wall_time_min']} minutes (fp32, one CPU thread on a shared machine); AdamW lr {s.get('lr')}, seed "
        f"{s.get('seed')}; {'the schedule ran to its end' if done else 'the schedule did NOT run to its end'}. "
        f"Training loss (EMA) at export: {round(info.get('loss_ema_at_export') or float('nan'), 4)}. Weights on "
        f"disk: {info['exported_dtype']}.",
        "",
    ]
    if quality:
        lines += [
            f"## Held-out acceptance (strict mode, greedy, the first {quality['problems']} prompts of HumanEval's "
            f"tuning split, {quality['new_tokens']} tokens each, {quality['steps']:,} steps)",
            "",
            "| draft j | " + " | ".join(str(j) for j in range(k)) + " |",
            "| --- |" + " --- |" * k,
            "| share of steps that committed it | " + " | ".join(f"{a:.3f}" for a in quality["acceptance"]) + " |",
            "",
            f"Tokens per target forward: {quality['tokens_per_forward']} (prefill included). Also in `quality.json`.",
            "",
        ]
    lines += ["## Use", "", "```bash", "harness run --model zoo-coral --methods autoregressive,coral --task humaneval",
              "```", "", "Rebuild: `harness train coral` (resumes from its checkpoint), or `harness zoo build "
              "stages=[coral]`.", ""]  # fmt: skip
    return "\n".join(lines)
