"""Medusa-1 head training: the base model frozen, only the heads learn (resumable).

    from harness.train.medusa import MedusaTrainConfig, run_medusa_training, export_medusa
    run_medusa_training(MedusaTrainConfig(max_minutes=60, threads=1))   # again = resume
    export_medusa(MedusaTrainConfig())                                  # fp16 heads + card -> zoo/target-medusa

Loss = sum over heads i of w_i * loss_i, w_i = ``head_decay ** i`` unless ``head_weights`` is
given, loss_i per ``loss``:

- ``ce``: cross-entropy of head i's logits at t against the token at t+i+2 (Medusa-1);
- ``kl``: forward KL from the base's own next-token distribution at t+i+1 (its LM head on the
  hidden state that has read tokens 0..t+i+1, which predicts token t+i+2) to head i's at t:
  Medusa-2's self-distillation, the heads learning what the base would say there, not one
  sample of it. Greedy Medusa accepts head i's token when it is the base's top-1 at that place.
  The base forward that gives the hidden states gives these distributions too: no extra cost;
- ``top1``: cross-entropy against the base's argmax at t+i+1 (the token greedy Medusa accepts
  there, given the record's tokens up to t+i+1).

The base model runs under ``no_grad`` to give the last hidden states; the loop is the shared
one in ``harness.train.loop``. ``init_from``: exported heads (a ``zoo/target-medusa``-style dir)
to start from instead of heads initialised from the base's LM head.

Data (``harness.train.data``, the rule EAGLE follows): the target's self-distilled records
(prompt + its own continuation, one record per row, right-padded; Medusa-2's self-distillation
recipe for the heads, the target frozen) when they exist for this target's weights
(``data=auto``), otherwise windows of the tokenised corpus; ``selfdistill`` / ``corpus`` force
one. Every real position is trained on; padded positions, and labels past a row's end, are not
(each head's CE is the mean over its real labels). ``greedy_only`` (the zoo's second phase,
``medusa_greedy``): the greedy records alone, and only labels whose tokens from t+1 on are the
continuation's: head i at t is accepted when it foresees the target's greedy token at t+i+2 after
greedy tokens t+1..t+i+1, which a greedy continuation holds and a sampled one does not (nor the
target's argmax after sampled tokens). Measured from the shipped CE heads (top-1 against the
target's greedy tokens along its continuations of HumanEval's tuning problems, heads 0/1/2:
0.362 / 0.231 / 0.173 before): the first checkpoint (5 minutes, lr still at its 3e-4 peak) of a
``loss=top1`` run on all records 0.349 / 0.224 / 0.154 (stopped there), a 6-minute
``greedy_only`` pilot (cosine over the 6 minutes) 0.380 / 0.257 / 0.192 (``scripts/drafter_figures.py``,
``results/drafter-figures.json``).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from harness.drafters.medusa import MedusaHeads, MedusaHeadsConfig, load_heads, save_heads
from harness.paths import default_cache_dir, export_component, resolve_repo_path
from harness.train.data import as_padded, check_data_choice, data_spec, load_training_data, tokens_dir
from harness.train.distill import check_loss, per_token_loss
from harness.train.loop import TrainLoopConfig, TrainResult, load_checkpoint, require_checkpoint, run_record, train


@dataclass
class MedusaTrainConfig(TrainLoopConfig):
    """``harness train medusa`` settings: the loop's fields plus these."""

    lr: float = 1e-3  # peak learning rate (upstream Medusa-1: 1e-3)
    weight_decay: float = 0.0  # upstream uses none
    max_minutes: float = 60.0  # wall-clock budget over all resumed runs
    base: str = "zoo/target"  # frozen base model (hub id or local dir; relative = from the repo root)
    data: str = "auto"  # auto (self-distilled if present for this base's weights, else corpus) | selfdistill | corpus
    selfdistill_dir: str = ""  # self-distilled records ("" = <cache>/zoo-data/selfdistill/<base dir name>)
    data_dir: str = ""  # tokenised corpus with train.npy / heldout_*.npy ("" = <cache>/zoo-data/tokens)
    out_dir: str = ""  # checkpoint dir ("" = <cache>/train/medusa)
    export_dir: str = "zoo/target-medusa"  # where export writes the shipped heads
    num_heads: int = 3  # K: head i predicts the token i+2 ahead
    num_layers: int = 1  # L: ResBlocks per head
    head_decay: float = 0.8  # loss weight of head i = head_decay ** i ...
    head_weights: list[float] = field(default_factory=list)  # ... unless given explicitly (K values)
    loss: str = "ce"  # ce (the token i+2 ahead) | kl (the base's distribution there: Medusa-2 self-distillation) | top1 (its argmax)
    init_from: str = ""  # exported heads to start from ("" = fresh heads from the base's LM head)
    group_by_length: bool = False  # self-distilled records: batch records of similar length together (less padding)
    # self-distilled records: the greedy ones only, and only labels whose tokens from t+1 on are the target's
    # (head i at t is accepted when tokens t+1..t+i+2 are the target's greedy choices: on a greedy continuation
    # the token at t+i+2 is exactly that; on a sampled one it is not, nor is the base's argmax after sampled tokens)
    greedy_only: bool = False
    batch_size: int = 8  # rows per step (self-distilled records or corpus windows)
    seq_len: int = 512  # corpus window length; longer records are cut to it
    export_at_end: bool = True  # export when the plan / budget is finished
    eval_tokens: int = 20000  # held-out tokens per language for the accuracy figures (0 = all)
    device: str = "cpu"  # cpu | cuda | auto (where the base and the heads run)


def cache_paths(cfg: MedusaTrainConfig) -> tuple[Path, Path]:
    """(data_dir, out_dir) with the defaults filled in."""
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else default_cache_dir() / "train" / "medusa"
    return tokens_dir(cfg.data_dir), out


def head_weights(cfg: MedusaTrainConfig) -> list[float]:
    if cfg.head_weights:
        if len(cfg.head_weights) != cfg.num_heads:
            raise ValueError(f"head_weights has {len(cfg.head_weights)} values for {cfg.num_heads} heads")
        return [float(w) for w in cfg.head_weights]
    return [cfg.head_decay**i for i in range(cfg.num_heads)]


def load_base(path: str, device: str = "cpu") -> torch.nn.Module:
    """The frozen base causal LM in float32 (through the engine's loader)."""
    from harness.config import ModelConfig  # noqa: PLC0415
    from harness.engine import Engine  # noqa: PLC0415

    engine = Engine.load(ModelConfig(name="medusa-base", path=path, dtype="float32", device=device))
    return engine.model


def new_heads(base: torch.nn.Module, num_heads: int, num_layers: int, name: str = "") -> MedusaHeads:
    """Heads sized for ``base`` whose output layers start as its LM head."""
    lm_head = base.get_output_embeddings().weight
    cfg = MedusaHeadsConfig(num_heads=num_heads, num_layers=num_layers, hidden_size=lm_head.shape[1],
                            vocab_size=lm_head.shape[0], base_model_name_or_path=name)  # fmt: skip
    heads = MedusaHeads(cfg).to(lm_head.device)
    heads.init_from_lm_head(lm_head.detach().float())
    return heads


def initial_heads(cfg: MedusaTrainConfig, shape: MedusaHeadsConfig) -> dict[str, torch.Tensor]:
    """The state of the heads ``cfg.init_from`` names: a training checkpoint dir or exported heads."""
    src = resolve_repo_path(cfg.init_from)
    ckpt = load_checkpoint(src)
    if ckpt is not None:
        found = MedusaHeadsConfig(**ckpt["extra"]["heads"])
        state = ckpt["model"]
    else:
        start = load_heads(src, hidden_size=shape.hidden_size, vocab_size=shape.vocab_size)
        found, state = start.config, start.state_dict()
    if (found.num_heads, found.num_layers, found.hidden_size, found.vocab_size) != (
            shape.num_heads, shape.num_layers, shape.hidden_size, shape.vocab_size):  # fmt: skip
        raise ValueError(f"medusa.init_from={cfg.init_from} holds {found.num_heads} heads x {found.num_layers} layers "
                         f"({found.hidden_size} -> {found.vocab_size}), the config asks for {shape.num_heads} x "
                         f"{shape.num_layers} on this base: match them or drop init_from")  # fmt: skip
    return state


def base_hidden(base: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Last hidden states ``[B, T, H]`` of the frozen base (no graph)."""
    with torch.no_grad():
        return base.get_decoder()(input_ids=ids).last_hidden_state.float()


def medusa_loss_fn(base: torch.nn.Module, weights: list[float], loss: str = "ce", continuation_only: bool = False,
                   ) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]:  # fmt: skip
    """``loss_fn(heads, batch)`` for the training loop: ``batch`` a ``[B, T+1]`` tensor of corpus
    windows or a right-padded :class:`PaddedBatch` of records; head i's loss (``ce`` against the
    token at t+i+2, ``kl`` from the base's distribution at t+i+1, ``top1`` against its argmax) is the mean over the
    positions whose label (t+i+2) is a real token (``continuation_only``: and whose tokens from t+1
    on are the record's continuation, i.e. generated by the target)."""
    check_loss(loss, "medusa loss")

    def loss_fn(heads: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        batch = as_padded(batch)
        device = next(heads.parameters()).device
        ids, valid = batch.ids.to(device), batch.valid.to(device)
        length = ids.shape[1] - 1
        h = base_hidden(base, ids[:, :-1])  # h[:, t] has read tokens 0..t
        if loss != "ce":
            with torch.no_grad():
                base_logp = F.log_softmax(base.get_output_embeddings()(h).float(), dim=-1)  # [:, t] predicts t+1
        total = h.new_zeros(())
        for i, head in enumerate(heads):
            n = length - i - 1  # positions t with a label at t+i+2 <= length
            if n <= 0:
                continue
            logits = head(h[:, :n])
            logits = logits.reshape(-1, logits.shape[-1])
            # the base at t+i+1 predicts token t+i+2
            teacher = base_logp[:, i + 1 :].reshape(logits.shape) if loss != "ce" else None
            per = per_token_loss(logits, loss, ids[:, i + 2 :].reshape(-1), teacher)
            real = valid[:, i + 2 :]  # right padding: a real label has real inputs before it
            if continuation_only:  # the continuation is a suffix: token t+1 generated -> t+1..t+i+2 all are
                real = real & batch.generated[:, 1 : 1 + n].to(device)
            real = real.reshape(-1).to(per.dtype)
            total = total + weights[i] * (per * real).sum() / real.sum().clamp(min=1.0)
        return total, int(valid[:, 1:].sum())

    return loss_fn


def run_medusa_training(cfg: MedusaTrainConfig, log: Callable[[str], None] | None = None) -> tuple[TrainResult, dict]:
    """Train (or resume) the heads; exports them when finished and ``export_at_end``.

    Returns the loop's result and a summary (with the export info when exported).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_data_choice(cfg.data, "medusa")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    data_dir, out_dir = cache_paths(cfg)
    weights = head_weights(cfg)
    base = load_base(cfg.base, cfg.device)
    ckpt = load_checkpoint(out_dir)
    if ckpt is not None:
        shape = ckpt.get("extra", {}).get("heads", {})
        if (shape.get("num_heads"), shape.get("num_layers")) != (cfg.num_heads, cfg.num_layers):
            raise ValueError(f"the checkpoint in {out_dir} has {shape.get('num_heads')} heads x {shape.get('num_layers')} "
                             f"layers, the config asks for {cfg.num_heads} x {cfg.num_layers}: use another out_dir")  # fmt: skip
    check_loss(cfg.loss, "medusa.loss")
    heads = new_heads(base, cfg.num_heads, cfg.num_layers, name=cfg.base)
    if cfg.init_from and ckpt is None:
        heads.load_state_dict(initial_heads(cfg, heads.config))
        log(f"[train medusa] starting from the heads in {cfg.init_from}")
    data = load_training_data(data_spec(cfg), log, "train medusa")
    if cfg.greedy_only and data.source != "selfdistill":
        raise ValueError("medusa.greedy_only=true needs self-distilled records of this base (the zoo's selfdistill "
                         "stage), not corpus windows: generate them, or set greedy_only=false")  # fmt: skip
    batches = data.batches
    n_params = sum(p.numel() for p in heads.parameters())
    log(f"[train medusa] {cfg.num_heads} heads x {cfg.num_layers} layers, {n_params / 1e6:.2f}M parameters, "
        f"head weights {[round(w, 3) for w in weights]}, on {data.source} data ({data.rows:,} rows, "
        f"{data.tokens:,} tokens from {data.path}), out_dir {out_dir}")
    extra = {"heads": asdict(heads.config), "head_weights": weights, "base": cfg.base, "data_dir": str(data_dir),
             "data": data.describe(), "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "n_params": n_params,
             "loss": cfg.loss, "init_from": cfg.init_from, "greedy_only": cfg.greedy_only}  # fmt: skip
    loop = TrainLoopConfig(**{k: getattr(cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    result = train(heads, medusa_loss_fn(base, weights, cfg.loss, continuation_only=cfg.greedy_only), batches, loop, out_dir, extra_state=extra,
                   desc="train medusa", log=log)  # fmt: skip
    summary = result.summary(batches.epochs_done)
    if result.finished and cfg.export_at_end:
        summary["export"] = export_medusa(cfg, base=base, log=log)
    return result, summary


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def _accuracy_counts(base: torch.nn.Module, heads: torch.nn.Module, tokens, seq_len: int, top_k: int) -> np.ndarray:
    """[3, K+1] rows (top-1 hits, top-k hits, labels); column 0 is the base LM head."""
    device = next(base.parameters()).device
    dtype = next(heads.parameters()).dtype
    tokens = np.asarray(tokens, dtype=np.int64)
    counts = np.zeros((3, heads.num_heads + 1))
    for start in range(0, max(0, len(tokens) - 1), seq_len):
        window = torch.from_numpy(tokens[start : start + seq_len + 1]).to(device).view(1, -1)
        length = window.shape[1] - 1
        h = base_hidden(base, window[:, :-1])
        outputs = [base.get_output_embeddings()(h)] + [head(h.to(dtype)) for head in heads]
        for j, logits in enumerate(outputs):  # j = 0: base (offset 1); j = i + 1: head i (offset i + 2)
            n = length - j
            if n <= 0:
                continue
            labels = window[:, j + 1 :]
            top = torch.topk(logits[:, :n].float(), min(top_k, logits.shape[-1]), dim=-1).indices
            counts[0, j] += float((top[..., 0] == labels).sum())
            counts[1, j] += float((top == labels.unsqueeze(-1)).any(dim=-1).sum())
            counts[2, j] += n
    return counts


def _rates(counts: np.ndarray, top_k: int) -> dict:
    rate = lambda hits, n: round(float(hits / n), 4) if n else None  # noqa: E731
    k = counts.shape[1] - 1
    return {
        "base_top1": rate(counts[0, 0], counts[2, 0]),
        "top1": [rate(counts[0, j], counts[2, j]) for j in range(1, k + 1)],
        f"top{top_k}": [rate(counts[1, j], counts[2, j]) for j in range(1, k + 1)],
        "tokens": int(counts[2, 0]),
    }


def head_accuracy(base, heads: torch.nn.Module, tokens, seq_len: int = 512, top_k: int = 5) -> dict:
    """Top-1 and top-k accuracy of every head (head i against the token i+2 ahead) and of the
    base LM head (next token), teacher-forced on non-overlapping windows of ``tokens``.
    ``base``: a causal LM (or an ``Engine``)."""
    base = base if isinstance(base, torch.nn.Module) else base.model
    was_training = heads.training
    heads.eval()
    try:
        return _rates(_accuracy_counts(base, heads, tokens, seq_len, top_k), top_k)
    finally:
        heads.train(was_training)


def heldout_accuracy(base, heads, data_dir: Path, max_tokens_per_lang: int = 0, seq_len: int = 512, top_k: int = 5) -> dict:
    """``head_accuracy`` per held-out language (``heldout_<lang>.npy``) and pooled."""
    per, total = {}, None
    heads.eval()
    for p in sorted(Path(data_dir).glob("heldout_*.npy")):
        toks = np.load(p)
        if max_tokens_per_lang:
            toks = toks[: max_tokens_per_lang + 1]
        counts = _accuracy_counts(base, heads, toks, seq_len, top_k)
        per[p.stem[len("heldout_") :]] = _rates(counts, top_k)
        total = counts if total is None else total + counts
    return {"per_language": per, "all": _rates(total, top_k) if total is not None else None}


# ----------------------------------------------------------------------------- export


def export_medusa(cfg: MedusaTrainConfig, base: torch.nn.Module | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Write the latest checkpoint's heads to ``cfg.export_dir``: fp16 safetensors (upstream
    key layout), config.json, training.json and a README.md card with held-out accuracy."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    data_dir, out_dir = cache_paths(cfg)
    ckpt = require_checkpoint(out_dir, "Medusa")
    extra = ckpt.get("extra", {})
    base = base if base is not None else load_base(extra.get("base", cfg.base), cfg.device)
    heads = MedusaHeads(MedusaHeadsConfig(**extra["heads"]))
    heads.load_state_dict(ckpt["model"])
    heads.to(dtype=torch.float16).to(dtype=torch.float32, device=next(base.parameters()).device)  # measure what ships
    t0 = time.time()
    acc = heldout_accuracy(base, heads, data_dir, max_tokens_per_lang=cfg.eval_tokens, seq_len=cfg.seq_len)
    log(f"[train medusa] held-out top-1 per head {acc['all'] and acc['all']['top1']} "
        f"(base next-token {acc['all'] and acc['all']['base_top1']}) in {time.time() - t0:.0f} s")
    info = {
        "base_model": extra.get("base", cfg.base),
        "heads": extra["heads"],
        "head_weights": extra.get("head_weights"),
        "parameters": extra.get("n_params"),
        "loss": extra.get("loss", "ce"),
        "initialized_from": extra.get("init_from") or None,
        "greedy_only": extra.get("greedy_only", False),
        "data": extra.get("data") or {"source": "corpus", "path": extra.get("data_dir")},  # older checkpoints: corpus
        **run_record(ckpt),
        "heldout_accuracy": acc,
    }
    extra = {"format": "medusa-1 heads (harness); upstream key layout"}
    final = export_component(cfg.export_dir, lambda d: save_heads(heads, d, dtype=torch.float16, extra=extra), info,
                             medusa_card, log, "medusa")  # fmt: skip
    return {"dir": str(final), **{k: info[k] for k in ("step", "training_tokens", "wall_time_min")}, "accuracy": acc["all"]}


def _data_line(data: dict, greedy_only: bool = False) -> str:
    """The card's account of the training data."""
    if data.get("source") == "selfdistill" and greedy_only:
        return (f"the target's greedy self-distilled continuations only ({data.get('rows', 0):,} records of corpus "
                f"prompt + the target's own greedy continuation; {data.get('tokens', 0):,} tokens, `{data.get('path')}`), "
                "each head trained only where the tokens from t+1 on are the target's greedy ones (where its "
                "prediction is accepted); Medusa-2's self-distillation, the target frozen")
    if data.get("source") == "selfdistill":
        return (f"the target's self-distilled continuations ({data.get('rows', 0):,} records of corpus prompt + the "
                f"target's own continuation, greedy and sampled; {data.get('tokens', 0):,} tokens, `{data.get('path')}`), "
                "Medusa-2's self-distillation recipe for the heads (the target frozen); every real position trained on")
    rows = f"{data['rows']:,} windows, {data['tokens']:,} tokens, " if "rows" in data else ""
    return f"windows of the tokenised corpus ({rows}`{data.get('path')}`)"


def _loss_line(info: dict) -> str:
    """The card's account of the loss (and of the heads it started from)."""
    start = f"started from the heads in `{info['initialized_from']}`; " if info.get("initialized_from") else ""
    if info.get("loss") == "kl":
        return (f"Base frozen, {start}Medusa-2 self-distillation: loss = sum_i w_i * KL(base's next-token distribution "
                "at t+i+1 || head i at t), the base's own distribution over token t+i+2")
    if info.get("loss") == "top1":
        return (f"Base frozen, {start}self-distillation on the base's greedy choice: loss = sum_i w_i * CE(head i at t, "
                "the base's argmax at t+i+1), the token greedy Medusa accepts there")
    return f"Medusa-1 (base frozen), {start}loss = sum_i w_i * CE(head i, token t+i+2)"


def _greedy_note(info: dict) -> str:
    if not info.get("greedy_only"):
        return ""
    return ("\nThese heads learned the target's greedy tokens, not the corpus's, so the corpus figures above\n"
            "understate them: their top-1 against the target's own greedy tokens along its continuations of\n"
            "HumanEval's tuning problems is in `results/drafter-figures.json` (`scripts/drafter_figures.py`).")


def medusa_card(info: dict) -> str:
    """The README.md of exported heads."""
    h = info["heads"]
    acc = info["heldout_accuracy"]
    rows = []
    for name, a in [("all", acc["all"]), *sorted(acc["per_language"].items())]:
        if not a:
            continue
        topk_key = next(k for k in a if k.startswith("top") and k != "top1")
        cells = " | ".join(f"{t1:.3f} / {tk:.3f}" for t1, tk in zip(a["top1"], a[topk_key]))
        rows.append(f"| {name} | {a['tokens']:,} | {a['base_top1']:.3f} | {cells} |")
    topk_name = next((k for k in (acc["all"] or {}) if k.startswith("top") and k != "top1"), "top5")
    head_cols = " | ".join(f"head {i} (t+{i + 2})" for i in range(h["num_heads"]))
    sep = " | ".join("---" for _ in range(h["num_heads"]))
    done = info["planned_steps"] and info["step"] >= info["planned_steps"]
    return f"""# Medusa heads for `{info['base_model']}`

{h['num_heads']} Medusa-1 heads (Cai et al. 2024) trained on the frozen base model `{info['base_model']}`:
head i = ResBlock x {h['num_layers']} + Linear({h['hidden_size']}, {h['vocab_size']}) on the base model's last
hidden state, predicting the token i+2 positions ahead. {info['parameters']:,} parameters, stored in fp16.

## Use
    harness run --model zoo-target --methods medusa method.medusa.tree=small   # chain | small | large

`harness.drafters.medusa.load_heads(dir)` loads them (it also reads upstream's released format).

## Files
- `medusa_lm_head.safetensors`: keys `{{i}}.{{j}}.linear.weight|bias` (ResBlocks) and `{{i}}.{h['num_layers']}.weight`
  (output), the key layout of FasterDecoding/Medusa's `medusa_lm_head` files.
- `config.json`: `medusa_num_heads`, `medusa_num_layers`, `base_model_name_or_path`, sizes.
- `training.json`: training and evaluation figures.

## Training
Data: {_data_line(info.get('data') or {}, info.get('greedy_only', False))}.
{_loss_line(info)}, w = {[round(w, 3) for w in info['head_weights'] or []]};
{info['step']:,} steps{'' if done else ' (schedule NOT complete)'} of {info['batch_size']} x {info['seq_len']} tokens
({info['training_tokens']:,} tokens), {info['wall_time_min']} min on CPU; final loss (EMA) {info['loss_ema_at_export'] or float('nan'):.4f}.

## Held-out accuracy (top-1 / {topk_name}, teacher-forced on the held-out corpus)
| split | tokens | base next-token top-1 | {head_cols} |
| --- | --- | --- | {sep} |
{chr(10).join(rows)}

Each head guesses from one hidden state, without the tokens in between, so accuracy falls with the
offset. A tree node at depth d is accepted only when heads 0..d-1 all guessed right (at its ranks).{_greedy_note(info)}

Exported {info['exported_at']}.
"""
