"""The zoo draft distilled from the target (the ``draft_distill`` stage).

    from harness.train.distill import DraftDistillConfig, run_draft_distill
    run_draft_distill(DraftDistillConfig(init_from="<train_root>/draft", out_dir="<train_root>/draft-distill"))

Three losses (``loss``), all on the target's self-distilled records (``harness.zoo.selfdistill``:
corpus prompts and the target's continuations, greedy and sampled at T 0.7 / 1.0, generated once):

- ``ce``: sequence-level knowledge distillation (Kim & Rush 2016; DistillSpec's "fixed
  teacher-generated data", Zhou et al. 2024): next-token cross-entropy on the target's outputs.
  No target forward per step. Two thirds of the records are sampled, so a label is often not the
  token the target would say greedily. (The shipped draft's first phase.)
- ``kl``: token-level forward KL(target || draft) at every counted position, the target run under
  ``no_grad`` on the same batch (DistillSpec's white-box distillation): the target's whole
  next-token distribution, not one sample of it.
- ``top1``: cross-entropy against the target's argmax at every counted position, the target run
  on the same batch. Greedy speculation accepts a drafted token exactly when it is the target's
  top-1, so this is the surrogate of the acceptance itself; a 0.95M draft has little capacity to
  spare on the rest of a 3.4M target's distribution. (The shipped draft's second phase,
  ``draft_top1`` in ``harness zoo build``.)

Measured before choosing (6-minute pilots side by side from the CE-distilled draft, lr 2e-4, one
thread each, continuation tokens only; greedy agreement along the target's continuations of
HumanEval's tuning problems, 0.631 before): ``top1`` 0.651 after 650 steps, ``kl`` 0.626 after 567
(``scripts/drafter_figures.py``, ``results/drafter-figures.json``). A target forward
costs about 0.5 s beside a 0.65 s draft step (16 records padded to ~310 tokens, one thread), so a
``kl`` / ``top1`` step costs about 1.8 ``ce`` steps; ``group_by_length`` wins that back (records
of similar length batched together: a random batch of these records is about half padding).

Counted positions: the continuation tokens (weight 1) and the prompt tokens (``prompt_weight``
each; 0 by default: the prompts are corpus text, where the target's behaviour is not what a
draft meets after a prompt). Each row is one record (prompt + continuation), right-padded; padded
positions carry no loss.

Initialised from the draft's weights (``init_from``: a checkpoint dir or an exported model),
resumable through the generic loop (:mod:`harness.train.loop`); the checkpoint has the LM
trainer's layout, so ``harness.zoo.build.export_model`` ships it as ``zoo/draft`` (the
``distillation`` entry of its ``extra`` puts the recipe on the card).
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.train.data import PaddedBatch, load_records, selfdistill_dir, selfdistill_problem, weights_sha
from harness.train.lm import continue_model
from harness.train.loop import TrainLoopConfig, TrainResult, train


@dataclass
class DraftDistillConfig(TrainLoopConfig):
    """``draft_distill`` settings of ``harness zoo build``: the loop's fields plus these."""

    lr: float = 5e-4  # peak learning rate (a fine-tune: a sixth of the draft's from-scratch 3e-3)
    warmup_steps: int = 20  # linear warm-up steps
    weight_decay: float = 0.0  # no decay towards 0 in a short fine-tune
    # (the shipped run's time and records: zoo/draft/training.json)
    max_steps: int = 5000  # optimiser steps (the cosine runs over them; 5,000 x 16 records = 6.5 passes over 12,288)
    threads: int = 1  # torch threads (0 = leave as is)
    batch_size: int = 16  # records per step (one record per row)
    seq_len: int = 320  # longest row (prompt <= 192 + continuation <= 128: records are kept whole)
    loss: str = "ce"  # ce (next-token CE on the target's outputs) | kl (forward KL to the target's distribution)
    prompt_weight: float = 0.0  # loss weight of a prompt token relative to a continuation token (0 = continuation only)
    group_by_length: bool = False  # batch records of similar length together (less padding per step)
    init_from: str = ""  # the draft's weights (checkpoint dir or exported model; "" in zoo build = <train_root>/draft)
    target: str = "zoo/target"  # the target whose self-distilled data is used (its weights must have generated it; zoo build: the zoo's)
    selfdistill_dir: str = ""  # self-distilled records ("" = <cache>/zoo-data/selfdistill/<target dir name>)
    out_dir: str = ""  # checkpoint dir ("" in zoo build = <train_root>/draft-distill)


LOSSES = ("ce", "kl", "top1")
# the recipe line each loss puts in the checkpoint (and so in the exported training.json)
METHODS = {
    "ce": "sequence-level KD: next-token CE on the target's own continuations (fixed teacher-generated data)",
    "kl": "token-level KD: forward KL(target || draft) at every counted position of the target's self-distilled "
          "records, the target run on each batch",
    "top1": "token-level KD: CE against the target's argmax at every counted position of the target's self-distilled "
            "records, the target run on each batch",
}


def check_loss(loss: str, key: str) -> None:
    """Refuse a loss name that is not one of ``LOSSES`` (``key`` names the setting)."""
    if loss not in LOSSES:
        raise ValueError(f"{key}={loss!r}: choose ce, kl or top1")


def per_token_loss(logits: torch.Tensor, loss: str, labels: torch.Tensor | None = None,
                   teacher_logp: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """``[N]`` losses of ``logits [N, V]``: ``ce`` against ``labels [N]``; ``kl`` the forward KL
    from the teacher's log-probabilities ``[N, V]``; ``top1`` CE against the teacher's argmax."""
    if loss == "ce":
        return F.cross_entropy(logits, labels, reduction="none")
    if loss == "top1":
        return F.cross_entropy(logits, teacher_logp.argmax(-1), reduction="none")
    return F.kl_div(F.log_softmax(logits, dim=-1), teacher_logp, log_target=True, reduction="none").sum(-1)


def distill_loss_fn(prompt_weight: float, teacher: torch.nn.Module | None = None, loss: str = "ce",
                    ) -> Callable[[torch.nn.Module, PaddedBatch], tuple[torch.Tensor, int]]:  # fmt: skip
    """``loss_fn(model, batch)``: at every label position that is a real token, ``ce``: next-token
    CE against the record's token; ``kl``: the forward KL from ``teacher``'s next-token
    distribution to the model's; ``top1``: CE against ``teacher``'s argmax there. Weighted 1 for a
    continuation token and ``prompt_weight`` for a prompt token, averaged by those weights (the
    batch's positions pooled, so a row counts by its tokens)."""
    check_loss(loss, "draft_distill.loss")
    if (loss != "ce") != (teacher is not None):
        raise ValueError(f"draft_distill.loss={loss!r} {'needs' if loss != 'ce' else 'takes no'} teacher model")

    def loss_fn(model: torch.nn.Module, batch: PaddedBatch) -> tuple[torch.Tensor, int]:
        device = next(model.parameters()).device
        ids = batch.ids.to(device)
        real = batch.valid[:, 1:].to(device)
        gen = batch.generated[:, 1:].to(device) if batch.generated is not None else real
        weight = ((gen & real).float() + prompt_weight * (real & ~gen).float()).reshape(-1)
        logits = model(input_ids=ids[:, :-1]).logits.float()  # right padding: real positions never see a pad
        logits = logits.reshape(-1, logits.shape[-1])
        t_logp = None
        if teacher is not None:
            with torch.no_grad():
                t_logp = F.log_softmax(teacher(input_ids=ids[:, :-1]).logits.float().reshape(logits.shape), dim=-1)
        per_token = per_token_loss(logits, loss, ids[:, 1:].reshape(-1), t_logp)
        return (per_token * weight).sum() / weight.sum().clamp(min=1e-9), int((weight > 0).sum())

    return loss_fn


def data_fingerprint(cfg: DraftDistillConfig) -> str:
    """What identifies the self-distilled data (its manifest's settings and shards)."""
    import hashlib  # noqa: PLC0415
    import json  # noqa: PLC0415

    from harness.zoo.selfdistill import MANIFEST  # noqa: PLC0415

    man = selfdistill_dir(cfg.selfdistill_dir, cfg.target) / MANIFEST
    if not man.exists():
        return "none"
    m = json.loads(man.read_text())
    key = json.dumps([m.get("settings_key"), m.get("weights_sha256"), sorted(m.get("shards", {}))], sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()


def run_draft_distill(cfg: DraftDistillConfig, log: Callable[[str], None] | None = None,
                      name: str = "draft-distill") -> tuple[TrainResult, dict]:  # fmt: skip
    """Fine-tune ``cfg.init_from`` on ``cfg.target``'s self-distilled records into ``cfg.out_dir``
    (or resume the checkpoint there). Returns the loop result and a summary."""
    from transformers import AutoConfig  # noqa: PLC0415

    from harness.paths import resolve_repo_path  # noqa: PLC0415

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not cfg.out_dir:
        raise ValueError("draft_distill.out_dir is empty: give the checkpoint dir")
    if cfg.prompt_weight < 0:
        raise ValueError(f"draft_distill.prompt_weight={cfg.prompt_weight}: give a weight >= 0 (0 = continuation only)")
    check_loss(cfg.loss, "draft_distill.loss")  # before loading models and data
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    distill_dir = selfdistill_dir(cfg.selfdistill_dir, cfg.target)
    why = selfdistill_problem(distill_dir, cfg.target)
    if why:
        raise FileNotFoundError(f"draft_distill: {why}")
    target_cfg = AutoConfig.from_pretrained(str(resolve_repo_path(cfg.target)))
    cont = continue_model(name, cfg.out_dir, cfg.init_from, int(target_cfg.vocab_size), cfg.seed, log=log, missing_init=(
        "draft_distill needs init_from: the draft's checkpoint dir or exported model (in `harness zoo build`: run "
        "the draft stage first, or set draft_distill.init_from)"))  # fmt: skip
    model, config, init_info = cont.model, cont.config, cont.init_info
    pad = target_cfg.pad_token_id if target_cfg.pad_token_id is not None else 0
    batches = load_records(distill_dir, cfg.batch_size, cfg.seq_len, cfg.seed, pad_id=pad, group_by_length=cfg.group_by_length)
    teacher = None
    if cfg.loss != "ce":
        from transformers import AutoModelForCausalLM  # noqa: PLC0415

        teacher = AutoModelForCausalLM.from_pretrained(str(resolve_repo_path(cfg.target)), dtype=torch.float32).eval()
        teacher.requires_grad_(False)
    n_cont = sum(len(r) - s for r, s in zip(batches.records, batches.starts))
    n_tokens = sum(len(r) for r in batches.records)
    n_params = sum(p.numel() for p in model.parameters())
    recipe = {
        "method": METHODS[cfg.loss],
        "loss": cfg.loss, "group_by_length": cfg.group_by_length,
        "data": {"source": "selfdistill", "path": str(distill_dir), "rows": len(batches.records), "tokens": n_tokens,
                 "continuation_tokens": n_cont},
        "target": cfg.target, "target_weights_sha256": weights_sha(cfg.target), "prompt_weight": cfg.prompt_weight,
    }
    extra: dict[str, Any] = {
        "llama_config": config.to_dict(), "model": asdict(cont.shape), "n_params": n_params, "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len, "function_share": 0.0, "init": init_info, "distillation": recipe,
    }
    log(f"[train {name}] {n_params / 1e6:.2f}M parameters on {len(batches.records):,} self-distilled records "
        f"({n_tokens:,} tokens, {n_cont:,} of them the target's) from {distill_dir}, out_dir {cfg.out_dir}")
    loop = TrainLoopConfig(**{k: getattr(cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    result = train(model, distill_loss_fn(cfg.prompt_weight, teacher, cfg.loss), batches, loop, Path(cfg.out_dir), extra_state=extra,
                   desc=f"train {name}", log=log)  # fmt: skip
    summary = result.summary(batches.epochs_done)
    return result, summary
