"""LLM-to-SLM projector training: the large model (the target) and the small model (the zoo
draft) frozen, only the projector learns (resumable).

    harness train llm-to-slm max_minutes=30 threads=1    # again = resume; exports to zoo/target-llm-to-slm at the end

Per row: the target reads it (causal, so a prompt position's state depends on the prompt only);
the projection of its states is added to the small model's embeddings at the *prompt* positions
(the rest get none, as at decode time); loss = the small model's cross-entropy on the
continuation tokens. Rows: the target's self-distilled records (prompt + its own continuation:
the small model learns to write what the target would) when they exist for its weights, else
corpus windows whose first half is taken as the prompt.

Evaluation (the card): on the held-out corpus, windows cut in half (first half the prompt),
teacher-forced over the second half: the small model's top-1 agreement with the target's own
argmax, with the projection and without it (the untrained small model), per offset bucket.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from harness.drafters.projector import Projector, ProjectorConfig, save_projector
from harness.paths import export_component
from harness.train.chimera import FrozenTargetTrainConfig, heldout_rows, out_path
from harness.train.data import PaddedBatch, as_padded, check_data_choice, data_spec, load_training_data
from harness.train.loop import TrainLoopConfig, TrainResult, load_checkpoint, run_record, train
from harness.train.medusa import base_hidden, load_base


JOB = "llm-to-slm"  # its checkpoint dir: <cache>/train/llm-to-slm

@dataclass
class LlmToSlmTrainConfig(FrozenTargetTrainConfig):
    """``harness train llm-to-slm`` settings (``base`` is the large model, frozen; its
    self-distilled records are the data)."""

    max_minutes: float = 30.0  # wall-clock budget over all resumed runs
    small: str = "zoo/draft"  # the small model, frozen: it writes the answers
    inner: int = 256  # the projector's inner width
    export_dir: str = "zoo/target-llm-to-slm"  # where export writes the shipped projector


def prompt_mask(batch: PaddedBatch) -> torch.Tensor:
    """The prompt positions of each row: the tokens the target did not generate, or (corpus
    windows) the first half."""
    if batch.generated is not None:
        return batch.valid & ~batch.generated
    mask = torch.zeros_like(batch.valid)
    mask[:, : batch.ids.shape[1] // 2] = True
    return mask


def small_logits(large: torch.nn.Module, small: torch.nn.Module, projector: Projector | None, ids: torch.Tensor,
                 prompt: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """The small model's logits [B, T, V] over ``ids``, its prompt embeddings conditioned on the large
    model's states through ``projector`` (None: unconditioned)."""
    embeds = small.get_input_embeddings()(ids).float()
    if projector is not None:
        embeds = embeds + projector(base_hidden(large, ids)) * prompt[..., None].to(embeds.dtype)
    return small(inputs_embeds=embeds).logits.float()


def llm_to_slm_loss_fn(large: torch.nn.Module, small: torch.nn.Module) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]:
    def loss_fn(projector: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        batch = as_padded(batch)
        prompt = prompt_mask(batch)
        logits = small_logits(large, small, projector, batch.ids, prompt)[:, :-1]
        labels = batch.ids[:, 1:]
        target = (batch.valid[:, 1:] & ~prompt[:, 1:]).reshape(-1).float()  # the continuation's tokens
        per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="none")
        return (per * target).sum() / target.sum().clamp(min=1.0), int(target.sum())

    return loss_fn


def run_llm_to_slm_training(cfg: LlmToSlmTrainConfig, log: Callable[[str], None] | None = None) -> tuple[TrainResult, dict]:
    """Train (or resume) the projector; exports it when finished and ``export_at_end``."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_data_choice(cfg.data, "llm-to-slm")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    large, small = load_base(cfg.base, cfg.device), load_base(cfg.small, cfg.device)
    if large.config.vocab_size != small.config.vocab_size:
        raise ValueError(f"{cfg.base} and {cfg.small} have different vocabularies; LLM-to-SLM needs a shared tokenizer")
    torch.manual_seed(cfg.seed)
    shape = ProjectorConfig(large_hidden=large.config.hidden_size, small_hidden=small.config.hidden_size, inner=cfg.inner,
                            large_model=cfg.base, small_model=cfg.small)  # fmt: skip
    projector = Projector(shape).to(next(large.parameters()).device)
    data = load_training_data(data_spec(cfg), log, "train llm-to-slm")
    log(f"[train llm-to-slm] projector {shape.large_hidden} -> {shape.inner} -> {shape.small_hidden} on {data.source} data "
        f"({data.rows:,} rows, {data.tokens:,} tokens from {data.path}), out_dir {out_path(cfg, JOB)}")
    extra = {"projector": asdict(shape), "data": data.describe(), "batch_size": cfg.batch_size, "seq_len": cfg.seq_len,
             "n_params": sum(p.numel() for p in projector.parameters())}  # fmt: skip
    loop = TrainLoopConfig(**{k: getattr(cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    result = train(projector, llm_to_slm_loss_fn(large, small), data.batches, loop, out_path(cfg, JOB), extra_state=extra,
                   desc="train llm-to-slm", log=log)  # fmt: skip
    summary: dict[str, Any] = {"step": result.step, "tokens": result.tokens, "elapsed_min": round(result.elapsed_s / 60, 2),
                               "finished": result.finished, "last_loss": result.last_loss}  # fmt: skip
    if result.finished and cfg.export_at_end:
        summary["export"] = export_llm_to_slm(cfg, large, small, log=log)
    return result, summary


@torch.no_grad()
def agreement(large: torch.nn.Module, small: torch.nn.Module, projector: Projector, rows: list[np.ndarray]) -> dict:
    """Teacher-forced over the second half of each row (the first half the prompt): how often the
    small model's argmax is the large model's, with the projection and without it."""
    hits = {"projected": 0, "plain": 0}
    count = 0
    for row in rows:
        ids = torch.as_tensor(np.asarray(row, dtype=np.int64)).view(1, -1)
        if ids.shape[1] < 4:
            continue
        prompt = prompt_mask(PaddedBatch(ids, torch.ones_like(ids, dtype=torch.bool)))
        half = int(prompt.sum())
        want = large(input_ids=ids).logits[0, half - 1 : -1].argmax(-1)
        for name, proj in (("projected", projector), ("plain", None)):
            hits[name] += int((small_logits(large, small, proj, ids, prompt)[0, half - 1 : -1].argmax(-1) == want).sum())
        count += len(want)
    return {"positions": count, **{k: round(v / count, 4) if count else None for k, v in hits.items()}}


def export_llm_to_slm(cfg: LlmToSlmTrainConfig, large=None, small=None, log: Callable[[str], None] | None = None) -> dict:
    """The latest checkpoint's projector -> ``cfg.export_dir``: fp16 weights, config, training.json, card."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    ckpt = load_checkpoint(out_path(cfg, JOB))
    if ckpt is None:
        raise FileNotFoundError(f"no LLM-to-SLM checkpoint in {out_path(cfg, JOB)}: run `harness train llm-to-slm` first")
    extra = ckpt["extra"]
    shape = ProjectorConfig(**extra["projector"])
    large = large if large is not None else load_base(shape.large_model, cfg.device)
    small = small if small is not None else load_base(shape.small_model, cfg.device)
    projector = Projector(shape)
    projector.load_state_dict(ckpt["model"])
    projector.half().float().eval()  # measure what ships
    rows, where = heldout_rows(cfg)
    t0 = time.time()
    agree = agreement(large, small, projector, rows)
    log(f"[train llm-to-slm] held-out agreement with the target's argmax {agree} in {time.time() - t0:.0f} s")
    info = {"projector": extra["projector"], "parameters": extra["n_params"], "data": extra["data"], **run_record(ckpt),
            "heldout": where, "heldout_agreement": agree}  # fmt: skip
    final = export_component(cfg.export_dir, lambda d: save_projector(projector, d), info, projector_card, log, "llm-to-slm")
    return {"dir": str(final), "step": info["step"], "agreement": agree}


def projector_card(info: dict) -> str:
    p, agree, data = info["projector"], info["heldout_agreement"], info["data"]
    return f"""# LLM-to-SLM projector: `{p['large_model']}` -> `{p['small_model']}`

LLM-to-SLM (Bergner et al. 2024): the large model reads the prompt once; this MLP ({p['large_hidden']} -> {p['inner']}
-> {p['small_hidden']}, GELU; {info['parameters']:,} parameters, fp16) maps its final hidden states into the small
model's embedding space, added to the small model's prompt embeddings; the small model writes the answer alone.
**Lossy by design**: the output is the small model's. Both models frozen; only the projector was trained.

## Use
    harness run --model zoo-target --methods autoregressive,llm-to-slm   # labelled lossy in every table

## Training
Data: {data.get('source')} ({data.get('rows', 0):,} rows, {data.get('tokens', 0):,} tokens, `{data.get('path')}`);
loss: the small model's CE on the continuation, its prompt conditioned. {info['step']:,} steps of {info['batch_size']} rows,
{info['training_tokens']:,} tokens, {info['wall_time_min']} min on CPU; final loss (EMA) {info['loss_ema_at_export'] or float('nan'):.4f}.
Reproduce: `harness train llm-to-slm` (or the zoo's `llm_to_slm` stage).

## Held-out agreement ({info['heldout']}, windows cut in half, teacher-forced, {agree['positions']:,} positions)
| small model | top-1 = the large model's argmax |
| --- | --- |
| with the projection | {agree['projected']} |
| without (the plain small model) | {agree['plain']} |

Exported {info['exported_at']}.
"""
