"""Chimera drafter training: the target frozen, only the drafter learns (resumable).

    harness train chimera max_minutes=35 threads=1     # again = resume; exports to zoo/target-chimera at the end

Loss = sum over heads j of ``head_decay ** j`` * cross-entropy of head j at position t against
the token t+2+j (head j predicts the token j+1 after the root x_{t+1}, which the target chose
from h_t), each the mean over its real labels. The target runs under ``no_grad`` for its last
hidden states; the loop is the shared one (``harness.train.loop``); the data the shared rule
(``harness.train.data``: the target's self-distilled records when they exist for its weights,
else corpus windows).

Evaluation (the card): on the held-out corpus (``heldout_*.npy``), teacher-forced, per head: top-1
accuracy, and the chain acceptance at depth j+1 (heads 0..j all right: what a top-1 chain accepts).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from harness.drafters.chimera import ChimeraConfig, ChimeraDrafter, ngram_ids, parameter_count, save_drafter
from harness.paths import export_component
from harness.train.data import as_padded, check_data_choice, data_spec, load_training_data, tokens_dir
from harness.paths import default_cache_dir
from harness.train.loop import TrainLoopConfig, TrainResult, load_checkpoint, run_record, train
from harness.train.medusa import base_hidden, load_base


JOB = "chimera"  # its checkpoint dir: <cache>/train/chimera

@dataclass
class FrozenTargetTrainConfig(TrainLoopConfig):
    """Settings shared by the trainers of a small module on a frozen target (chimera, llm-to-slm):
    the loop's fields plus these."""

    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_minutes: float = 35.0  # wall-clock budget over all resumed runs
    base: str = "zoo/target"  # the frozen target (relative = from the repo root)
    data: str = "auto"  # auto (self-distilled if present for this target's weights, else corpus) | selfdistill | corpus
    selfdistill_dir: str = ""  # self-distilled records ("" = <cache>/zoo-data/selfdistill/<target dir name>)
    data_dir: str = ""  # tokenised corpus with train.npy / heldout_*.npy ("" = <cache>/zoo-data/tokens)
    out_dir: str = ""  # checkpoint dir ("" = <cache>/train/<the job's name>)
    export_dir: str = ""  # where export writes the shipped module
    batch_size: int = 8  # rows per step
    seq_len: int = 512  # corpus window length; longer records are cut to it
    group_by_length: bool = True  # self-distilled records: batch records of similar length together
    export_at_end: bool = True  # export when the budget is spent
    eval_tokens: int = 20000  # held-out tokens evaluated per language (0 = all)
    device: str = "cpu"  # cpu | cuda | auto


def out_path(cfg: FrozenTargetTrainConfig, job: str) -> Path:
    """The checkpoint dir: ``cfg.out_dir``, else ``<cache>/train/<job>``."""
    return Path(cfg.out_dir).expanduser() if cfg.out_dir else default_cache_dir() / "train" / job


@dataclass
class ChimeraTrainConfig(FrozenTargetTrainConfig):
    """``harness train chimera`` settings."""

    export_dir: str = "zoo/target-chimera"  # where export writes the shipped drafter
    num_heads: int = 4  # K: head j predicts the token j+1 after the root
    ngram: int = 3  # tokens the trigram encoder reads
    attention_heads: int = 4  # heads of the full-context encoder
    head_decay: float = 0.8  # loss weight of head j = head_decay ** j


def new_drafter(base: torch.nn.Module, cfg: ChimeraTrainConfig) -> ChimeraDrafter:
    lm_head = base.get_output_embeddings().weight
    shape = ChimeraConfig(hidden_size=lm_head.shape[1], vocab_size=lm_head.shape[0], num_heads=cfg.num_heads,
                          ngram=cfg.ngram, attention_heads=cfg.attention_heads, base_model_name_or_path=cfg.base)  # fmt: skip
    return ChimeraDrafter(shape).to(lm_head.device)


def head_logits(base: torch.nn.Module, drafter: ChimeraDrafter, ids: torch.Tensor) -> list[torch.Tensor]:
    """Head j's logits at every position t with a label (t + 2 + j < length): [B, length-2-j, V] each."""
    h = base_hidden(base, ids[:, :-1])  # h[:, t] chose the root x_{t+1}
    embed = base.get_input_embeddings()
    with torch.no_grad():
        grams = embed(ngram_ids(ids, drafter.config.ngram)[:, 1:])  # row t: x_{t+2-ngram} .. x_{t+1}
    states = drafter(grams.float(), h)  # [K, B, length-1, H]
    lm_head = base.get_output_embeddings()
    length = ids.shape[1]
    return [lm_head(states[j, :, : length - 2 - j]) for j in range(drafter.num_heads) if length - 2 - j > 0]


def chimera_loss_fn(base: torch.nn.Module, decay: float) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]:
    def loss_fn(drafter: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        batch = as_padded(batch)
        device = next(drafter.parameters()).device
        ids, valid = batch.ids.to(device), batch.valid.to(device)
        total = torch.zeros((), device=device)
        for j, logits in enumerate(head_logits(base, drafter, ids)):
            labels = ids[:, 2 + j :]
            per = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), reduction="none")
            real = valid[:, 2 + j :].reshape(-1).to(per.dtype)  # right padding: a real label has real inputs before it
            total = total + decay**j * (per * real).sum() / real.sum().clamp(min=1.0)
        return total, int(valid[:, 1:].sum())

    return loss_fn


def run_chimera_training(cfg: ChimeraTrainConfig, log: Callable[[str], None] | None = None) -> tuple[TrainResult, dict]:
    """Train (or resume) the drafter; exports it when finished and ``export_at_end``."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_data_choice(cfg.data, "chimera")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir = out_path(cfg, JOB)
    base = load_base(cfg.base, cfg.device)
    torch.manual_seed(cfg.seed)  # the drafter's initial weights
    drafter = new_drafter(base, cfg)
    ckpt = load_checkpoint(out_dir)
    if ckpt is not None and ckpt.get("extra", {}).get("drafter") != asdict(drafter.config):
        raise ValueError(f"the checkpoint in {out_dir} is of another drafter shape than the config asks for: use another out_dir")
    data = load_training_data(data_spec(cfg), log, "train chimera")
    n_params = parameter_count(drafter)
    log(f"[train chimera] {cfg.num_heads} heads, {n_params / 1e6:.2f}M parameters, on {data.source} data "
        f"({data.rows:,} rows, {data.tokens:,} tokens from {data.path}), out_dir {out_dir}")
    extra = {"drafter": asdict(drafter.config), "base": cfg.base, "data": data.describe(), "batch_size": cfg.batch_size,
             "seq_len": cfg.seq_len, "n_params": n_params, "head_decay": cfg.head_decay}  # fmt: skip
    loop = TrainLoopConfig(**{k: getattr(cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    result = train(drafter, chimera_loss_fn(base, cfg.head_decay), data.batches, loop, out_dir, extra_state=extra,
                   desc="train chimera", log=log)  # fmt: skip
    summary: dict[str, Any] = {"step": result.step, "tokens": result.tokens, "elapsed_min": round(result.elapsed_s / 60, 2),
                               "finished": result.finished, "last_loss": result.last_loss}  # fmt: skip
    if result.finished and cfg.export_at_end:
        summary["export"] = export_chimera(cfg, base=base, log=log)
    return result, summary


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def acceptance(base: torch.nn.Module, drafter: ChimeraDrafter, rows: list[np.ndarray]) -> dict:
    """Teacher-forced, per head j: top-1 accuracy against the token j+1 after the root, and the
    chain acceptance at depth j+1 (heads 0..j all right), over the positions where every head
    has a label."""
    k = drafter.num_heads
    hits, chain, count = np.zeros(k), np.zeros(k), 0
    for row in rows:
        ids = torch.as_tensor(np.asarray(row, dtype=np.int64)).view(1, -1)
        if ids.shape[1] < k + 2:
            continue
        logits = head_logits(base, drafter, ids)
        n = ids.shape[1] - 1 - k  # positions where the last head has a label
        right = torch.stack([logits[j][0, :n].argmax(-1) == ids[0, 2 + j : 2 + j + n] for j in range(k)])  # [K, n]
        hits += right.sum(dim=1).numpy()
        chain += right.int().cumprod(dim=0).sum(dim=1).numpy()
        count += n
    rate = lambda x: [round(float(v / count), 4) for v in x] if count else []  # noqa: E731
    return {"positions": count, "top1": rate(hits), "chain_acceptance": rate(chain)}


def heldout_rows(cfg: ChimeraTrainConfig) -> tuple[list[np.ndarray], str]:
    """Held-out evaluation rows: windows of the held-out corpus (``eval_tokens`` per language)."""
    rows, names = [], []
    for p in sorted(tokens_dir(cfg.data_dir).glob("heldout_*.npy")):
        toks = np.load(p)[: cfg.eval_tokens or None]
        rows += [toks[i : i + cfg.seq_len] for i in range(0, len(toks), cfg.seq_len)]
        names.append(p.stem[len("heldout_") :])
    return rows, f"held-out corpus ({', '.join(names)})"


def export_chimera(cfg: ChimeraTrainConfig, base: torch.nn.Module | None = None, log: Callable[[str], None] | None = None) -> dict:
    """The latest checkpoint's drafter -> ``cfg.export_dir``: fp16 weights, config, training.json, card."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    ckpt = load_checkpoint(out_path(cfg, JOB))
    if ckpt is None:
        raise FileNotFoundError(f"no Chimera checkpoint in {out_path(cfg, JOB)}: run `harness train chimera` first")
    extra = ckpt["extra"]
    base = base if base is not None else load_base(extra["base"], cfg.device)
    drafter = ChimeraDrafter(ChimeraConfig(**extra["drafter"]))
    drafter.load_state_dict(ckpt["model"])
    drafter.half().float().eval()  # measure what ships
    rows, where = heldout_rows(cfg)
    t0 = time.time()
    acc = acceptance(base, drafter, rows)
    log(f"[train chimera] held-out chain acceptance {acc['chain_acceptance']} in {time.time() - t0:.0f} s")
    info = {"base_model": extra["base"], "drafter": extra["drafter"], "parameters": extra["n_params"],
            "data": extra["data"], **run_record(ckpt), "heldout": where, "heldout_acceptance": acc}  # fmt: skip
    final = export_component(cfg.export_dir, lambda d: save_drafter(drafter, d), info, chimera_card, log, "chimera")
    return {"dir": str(final), "step": info["step"], "acceptance": acc}


def chimera_card(info: dict) -> str:
    d, acc, data = info["drafter"], info["heldout_acceptance"], info["data"]
    heads = " | ".join(f"head {j} (+{j + 1})" for j in range(d["num_heads"]))
    sep = " | ".join("---" for _ in range(d["num_heads"]))
    cells = lambda xs: " | ".join(f"{x:.3f}" for x in xs)  # noqa: E731
    return f"""# Chimera drafter for `{info['base_model']}`

Chimera (Zeng et al. 2024) on the frozen target `{info['base_model']}`: a trigram encoder over the
embeddings of the last {d['ngram']} tokens, a full-context encoder (one attention block, {d['attention_heads']}
heads) over the target's last hidden states, fused, and {d['num_heads']} residual heads read by the target's LM
head (head j predicts the token j+1 after the last committed one). {info['parameters']:,} parameters, fp16.
Module and alignment: `harness/drafters/chimera.py`.

## Use
    harness run --model zoo-target --methods chimera method.chimera.tree=small   # chain | small | large

## Training
Data: {data.get('source')} ({data.get('rows', 0):,} rows, {data.get('tokens', 0):,} tokens, `{data.get('path')}`).
Loss: sum_j 0.8^j * CE(head j at t, token t+2+j), target frozen. {info['step']:,} steps of {info['batch_size']} rows,
{info['training_tokens']:,} tokens, {info['wall_time_min']} min on CPU; final loss (EMA) {info['loss_ema_at_export'] or float('nan'):.4f}.
Reproduce: `harness train chimera` (or the zoo's `chimera` stage).

## Held-out acceptance ({info['heldout']}, teacher-forced, {acc['positions']:,} positions)
| | {heads} |
| --- | {sep} |
| top-1 | {cells(acc['top1'])} |
| chain acceptance (heads 0..j all right) | {cells(acc['chain_acceptance'])} |

Exported {info['exported_at']}.
"""
