"""EAGLE head training on a frozen target: EAGLE-1/2 (``version=1``) and
EAGLE-3 (``version=3``) heads of ``harness.drafters.eagle``, resumable, exported with a card.

    from harness.train.eagle import EagleTrainConfig, run_eagle_training, export_eagle
    run_eagle_training(EagleTrainConfig(version=1, max_minutes=45, threads=1))   # again = resume
    export_eagle(EagleTrainConfig(version=3))     # latest checkpoint -> zoo/target-eagle3 + card

The target never learns: each batch goes through it under ``no_grad`` to give the features
(v1: its last hidden state after the final norm, what its LM head reads; v3: the hidden
states of ``fused_layers``, concatenated) and its own next-token distributions.

Data: the target's self-distilled continuations (``harness.zoo.selfdistill``; records of
prompt + continuation, each batch row one record, right-padded) when they exist for this
target, otherwise windows of the tokenised corpus (``data=auto``; ``selfdistill`` / ``corpus``
force one). Every real position of a record is trained on (the prompt's too: its features
and distributions are the target's all the same).

Alignment (as the head's docstring): pair ``j`` = (feature of token ``x_j``, token ``x_{j+1}``)
is at position id ``j``; its output estimates feature ``j+1``, whose logits predict ``x_{j+2}``.

v1 loss (upstream EAGLE-1): ``feature_weight * smoothL1(out_j, f_{j+1}) + token_weight *
CE(softmax(target_lm_head(f_{j+1})), target_lm_head(out_j))``, the input features with uniform
noise. The token term uses the target's own next-token *distribution* (soft labels), not the
data's token: the drafter is accepted by agreeing with the target (greedy: its argmax;
sampling: acceptance = sum min(p, q)), the soft labels carry that whole distribution, and on
corpus text the next token is often not what the target would say.

v3 loss (upstream EAGLE-3, "training-time test"): no feature loss; the head is unrolled
``ttt_steps`` times, step k reading its own outputs of step k-1 (fc only on the target's
features at step 0), the token ``x_{j+1+k}`` and position id ``j + k``. Attention mirrors
drafting a chain from root j: a step-k query at j sees the step-0 keys of positions <= j
(real features, as the head's cache holds after verification) and its own chain's keys (steps
1..k at j). Step k's loss is CE against the target's distribution of ``x_{j+2+k}`` restricted
to the draft vocabulary, on positions whose target argmax is in it (others cannot be accepted
greedily); steps are weighted ``step_decay ** k``. The draft vocabulary (``d2t`` / ``t2d``) is
the ``draft_vocab_size`` most frequent tokens of the training data.

Figures: teacher-forced chain acceptance on held-out prompts. For each held-out language,
``eval_prompts`` windows of ``eval_prompt_len`` tokens are continued greedily by the target
(``eval_new_tokens``); on those sequences the target's argmax is the data, so unrolling the head
with the data's tokens (the structure above) is exactly a greedy chain draft. Acceptance at
depth d = share of roots in the continuation whose first d drafted tokens all equal the
target's argmax; ``1 + sum_d`` of them is the mean tokens per step a chain of that depth gets.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from harness.drafters.eagle import (EagleHead, EagleHeadConfig, HeadCache, describe, save_head, target_features,
                                    vocab_map)  # fmt: skip
from harness.paths import default_cache_dir, export_component
from harness.train.data import (PaddedBatch, as_padded, check_data_choice, data_spec, load_training_data, selfdistill_dir,
                                tokens_dir)  # fmt: skip
from harness.train.loop import TrainLoopConfig, TrainResult, load_checkpoint, run_record, train
from harness.train.medusa import load_base


@dataclass
class EagleTrainConfig(TrainLoopConfig):
    """``harness train eagle`` settings: the loop's fields plus these."""

    version: int = 1  # 1 = EAGLE-1/2 head (feature regression + CE); 3 = EAGLE-3 head (fused layers, training-time test)
    lr: float = 1e-3  # peak learning rate
    weight_decay: float = 0.0  # upstream uses none
    grad_clip: float = 0.5  # max global grad norm (upstream 0.5)
    max_minutes: float = 60.0  # wall-clock budget over all resumed runs
    base: str = "zoo/target"  # frozen target (hub id or local dir; relative = from the repo root)
    data: str = "auto"  # auto (self-distilled if present for this target, else corpus) | selfdistill | corpus
    selfdistill_dir: str = ""  # self-distilled records ("" = <cache>/zoo-data/selfdistill/<base dir name>)
    data_dir: str = ""  # tokenised corpus with train.npy / heldout_*.npy ("" = <cache>/zoo-data/tokens)
    out_dir: str = ""  # checkpoint dir ("" = <cache>/train/eagle, or eagle3 for version 3)
    export_dir: str = ""  # shipped head ("" = zoo/target-eagle, or zoo/target-eagle3 for version 3)
    batch_size: int = 8  # rows per step (self-distilled records or corpus windows)
    seq_len: int = 512  # corpus window length; longer records are cut to it
    feature_weight: float = 1.0  # v1: weight of the smooth-L1 feature loss (upstream 1.0)
    token_weight: float = 0.1  # v1: weight of the CE on the target's distribution (upstream 0.1)
    noise: float = 0.2  # v1: input features + U(-noise/2, noise/2) per element (upstream 0.2, there also x 512/length)
    ttt_steps: int = 7  # v3: steps the head is unrolled on its own outputs (upstream 7)
    step_decay: float = 0.8  # v3: weight of step k = step_decay ** k (upstream 0.8)
    draft_vocab_size: int = 0  # v3: draft vocabulary size (0 = EagleHeadConfig.from_target's default)
    export_at_end: bool = True  # export when the plan / budget is finished
    eval_prompts: int = 8  # held-out prompts per language for the acceptance figures (0 = skip them)
    eval_prompt_len: int = 64  # tokens per held-out prompt
    eval_new_tokens: int = 96  # greedy tokens the target adds to each (the positions measured)
    eval_depth: int = 4  # acceptance measured at depths 1..eval_depth
    device: str = "cpu"  # cpu | cuda | auto (where the target and the head run)


def resolve_paths(cfg: EagleTrainConfig) -> tuple[Path, Path, Path]:
    """(corpus token dir, self-distillation dir, checkpoint dir) with the defaults filled in."""
    out = Path(cfg.out_dir).expanduser() if cfg.out_dir else default_cache_dir() / "train" / ("eagle" if cfg.version == 1 else "eagle3")
    return tokens_dir(cfg.data_dir), selfdistill_dir(cfg.selfdistill_dir, cfg.base), out


def export_path(cfg: EagleTrainConfig) -> str:
    """The export directory as configured, or the version's shipped one (``export_dir`` resolves it)."""
    return cfg.export_dir or ("zoo/target-eagle" if cfg.version == 1 else "zoo/target-eagle3")


def check_config(cfg: EagleTrainConfig) -> None:
    if cfg.version not in (1, 3):
        raise ValueError(f"eagle version={cfg.version}: choose 1 (EAGLE-1/2 head) or 3 (EAGLE-3 head)")
    check_data_choice(cfg.data, "eagle")
    if cfg.version == 3 and cfg.ttt_steps < 1:
        raise ValueError(f"eagle ttt_steps={cfg.ttt_steps}: the training-time test needs at least 1 step")


# ----------------------------------------------------------------------------- the target's side


@dataclass
class TargetPass:
    """What one frozen-target forward gives the head."""

    features: torch.Tensor  # [B, T, F] the head's input features (v1: h, v3: 3 fused layers)
    last: torch.Tensor  # [B, T, h] last hidden state after the final norm (v1's regression target)
    logits: torch.Tensor  # [B, T, V] float32 target logits


@torch.no_grad()
def target_pass(base: torch.nn.Module, ids: torch.Tensor, head_cfg: EagleHeadConfig) -> TargetPass:
    out = base.get_decoder()(input_ids=ids, output_hidden_states=True)
    hs = [h.float() for h in out.hidden_states]
    logits = base.get_output_embeddings()(hs[-1]).float()
    return TargetPass(target_features(hs, head_cfg), hs[-1], logits)


def chain_mask(length: int, step: int, device: torch.device | str = "cpu") -> Optional[torch.Tensor]:
    """Attention of unrolled step ``step`` over the ``(step + 1) * length`` keys of steps
    0..step: causal over step 0's (real features), the same position only in steps 1..step (the
    query's own chain). None for step 0 (plain causal)."""
    if step == 0:
        return None
    causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
    own = torch.eye(length, dtype=torch.bool, device=device)
    return torch.cat([causal] + [own] * step, dim=1)


def _shift(x: torch.Tensor, k: int, fill: Any) -> torch.Tensor:
    """``x[:, k:]`` right-padded with ``fill`` back to ``x``'s length (dim 1)."""
    if k == 0:
        return x
    pad = x.new_full((x.shape[0], k, *x.shape[2:]), fill)
    return torch.cat((x[:, k:], pad), dim=1)


def unroll(head: EagleHead, base: torch.nn.Module, tp: TargetPass, ids: torch.Tensor, steps: int,
           noise: float = 0.0) -> list[torch.Tensor]:  # fmt: skip
    """The head's outputs ``[B, T-1, h]`` for steps 0..steps-1 (pairs j = 0..T-2; step k reads
    token ``x_{j+1+k}`` (0 past the end), position ``j + k``, its own step k-1 outputs)."""
    embed = base.get_input_embeddings()
    length = ids.shape[1] - 1
    feats = tp.features[:, :-1]
    if noise > 0:
        feats = feats + (torch.rand_like(feats) - 0.5) * noise
    positions = torch.arange(length, device=ids.device)
    cache = HeadCache()
    outs = []
    for k in range(steps):
        tokens = _shift(ids[:, 1:], k, 0)
        hidden = head(feats, tokens, embed, positions + k, cache=cache, mask=chain_mask(length, k, ids.device))
        outs.append(hidden)
        feats = hidden
    return outs


def _masked_mean(x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    m = m.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def eagle_loss_fn(base: torch.nn.Module, cfg: EagleTrainConfig) -> Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]]:
    """``loss_fn(head, batch)`` for the training loop (see the module doc for both versions)."""
    lm_head = base.get_output_embeddings()

    def v1_loss(head: EagleHead, batch: PaddedBatch) -> tuple[torch.Tensor, int]:
        tp = target_pass(base, batch.ids, head.config)
        m = batch.valid[:, 1:]  # pair j counts when token j+1 is real (its feature and distribution exist)
        out = unroll(head, base, tp, batch.ids, 1, noise=cfg.noise)[0]
        feature_loss = _masked_mean(F.smooth_l1_loss(out, tp.last[:, 1:], reduction="none").mean(-1), m)
        p = F.softmax(tp.logits[:, 1:], dim=-1)
        log_q = F.log_softmax(head.logits(out, lm_head).float(), dim=-1)
        token_loss = _masked_mean(-(p * log_q).sum(-1), m)
        return cfg.feature_weight * feature_loss + cfg.token_weight * token_loss, int(m.sum())

    def v3_loss(head: EagleHead, batch: PaddedBatch) -> tuple[torch.Tensor, int]:
        tp = target_pass(base, batch.ids, head.config)
        outs = unroll(head, base, tp, batch.ids, cfg.ttt_steps)
        total = tp.logits.new_zeros(())
        for k, out in enumerate(outs):
            m = _shift(batch.valid[:, 1:], k, False)  # step k at j predicts x_{j+2+k}: token j+1+k must be real
            target = _shift(tp.logits[:, 1:], k, 0.0)
            if head.config.maps_vocab:
                m = m & head.t2d[target.argmax(-1)]
                target = target[..., head.t2d]
            p = F.softmax(target, dim=-1)
            log_q = F.log_softmax(head.logits(out, lm_head).float(), dim=-1)
            total = total + cfg.step_decay**k * _masked_mean(-(p * log_q).sum(-1), m)
        return total, int(batch.valid[:, 1:].sum())

    def loss_fn(head: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
        batch = as_padded(batch)
        device = next(head.parameters()).device
        batch = PaddedBatch(batch.ids.to(device), batch.valid.to(device))
        return (v1_loss if cfg.version == 1 else v3_loss)(head, batch)

    return loss_fn


# ----------------------------------------------------------------------------- training


def new_head(base: torch.nn.Module, cfg: EagleTrainConfig, token_counts: Optional[np.ndarray] = None) -> EagleHead:
    """A head shaped for ``base`` (``EagleHeadConfig.from_target``), initialised from ``cfg.seed``;
    v3: the draft vocabulary from ``token_counts`` and its LM head started from those rows of the target's."""
    overrides = {"draft_vocab_size": cfg.draft_vocab_size} if cfg.version == 3 and cfg.draft_vocab_size else {}
    head_cfg = EagleHeadConfig.from_target(base.config, cfg.version, **overrides)
    device = next(base.parameters()).device
    with torch.random.fork_rng(devices=[]):  # the initial weights depend on cfg.seed only
        torch.manual_seed(cfg.seed)
        head = EagleHead(head_cfg).to(device)
    if cfg.version == 3:
        lm = base.get_output_embeddings().weight.detach()
        ids = torch.arange(head_cfg.vocab_size)
        if head_cfg.maps_vocab:
            if token_counts is None:
                raise ValueError("an EAGLE-3 head with a draft vocabulary needs the training data's token counts")
            ids = vocab_map(torch.as_tensor(token_counts[: head_cfg.vocab_size]), head_cfg.draft_vocab_size)
            head.set_vocab_map(ids)
        with torch.no_grad():
            head.lm_head.weight.copy_(lm[ids.to(lm.device)].float())
    return head


def run_eagle_training(cfg: EagleTrainConfig, log: Callable[[str], None] | None = None) -> tuple[TrainResult, dict]:
    """Train (or resume) the head; exports it when finished and ``export_at_end``.

    Returns the loop's result and a summary (with the export info when exported).
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_config(cfg)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    _, _, out_dir = resolve_paths(cfg)
    base = load_base(cfg.base, cfg.device).requires_grad_(False)
    data = load_training_data(data_spec(cfg), log, "train eagle", int(base.config.vocab_size))
    head = new_head(base, cfg, data.token_counts)
    ckpt = load_checkpoint(out_dir)
    if ckpt is not None:
        saved = ckpt.get("extra", {}).get("head")
        if saved != describe(head.config):
            raise ValueError(f"the checkpoint in {out_dir} holds another head ({_shape(saved)}) than the config asks for "
                             f"({_shape(describe(head.config))}): use another out_dir")  # fmt: skip
    n_params = sum(p.numel() for p in head.parameters())
    log(f"[train eagle] EAGLE-{cfg.version} head, {n_params / 1e6:.2f}M parameters, on {data.source} data "
        f"({data.rows:,} rows, {data.tokens:,} tokens from {data.path}), out_dir {out_dir}")
    extra = {"head": describe(head.config), "base": cfg.base, "data": data.describe(), "batch_size": cfg.batch_size,
             "seq_len": cfg.seq_len, "n_params": n_params, "loss": _loss_description(cfg)}  # fmt: skip
    loop = TrainLoopConfig(**{k: getattr(cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    result = train(head, eagle_loss_fn(base, cfg), data.batches, loop, out_dir, extra_state=extra,
                   desc=f"train eagle{'' if cfg.version == 1 else '3'}", log=log)  # fmt: skip
    summary = result.summary(data.batches.epochs_done)
    if result.finished and cfg.export_at_end:
        summary["export"] = export_eagle(cfg, base=base, log=log)
    return result, summary


def _shape(desc: Optional[dict]) -> str:
    if not desc:
        return "none"
    return f"version {desc.get('version')}, draft vocabulary {desc.get('draft_vocab_size')}, layers {desc.get('fused_layers')}"


def _loss_description(cfg: EagleTrainConfig) -> str:
    if cfg.version == 1:
        return (f"{cfg.feature_weight} x smoothL1(feature) + {cfg.token_weight} x CE(target distribution), "
                f"input noise U(+-{cfg.noise / 2})")
    return f"training-time test: {cfg.ttt_steps} steps, step k weighted {cfg.step_decay}^k, CE(target distribution on the draft vocabulary)"


# ----------------------------------------------------------------------------- evaluation


@dataclass
class ChainAcceptance:
    """Teacher-forced greedy chain acceptance of a head."""

    acceptance: list[float]  # [d-1] share of roots whose first d drafted tokens equal the target's argmax
    mean_accepted: float  # 1 + sum(acceptance): tokens per step of a chain of eval_depth (bonus included)
    roots: int  # positions measured


def greedy_eval_sequences(base: torch.nn.Module, tokens: np.ndarray, n_prompts: int, prompt_len: int,
                          new_tokens: int) -> tuple[torch.Tensor, list[int]]:  # fmt: skip
    """``n_prompts`` evenly spaced windows of ``tokens`` continued greedily by ``base``: the
    sequences ``[N, prompt_len + new_tokens]`` and each one's real length (through </s>)."""
    from harness.zoo.selfdistill import generate_batch  # noqa: PLC0415

    span = len(tokens) - prompt_len
    if span < 0 or n_prompts < 1:
        return torch.zeros((0, prompt_len + new_tokens), dtype=torch.long), []
    starts = np.linspace(0, span, n_prompts).astype(int) if n_prompts > 1 else np.array([0])
    prompts = [np.asarray(tokens[s : s + prompt_len], dtype=np.int64).tolist() for s in starts]
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    eos = base.config.eos_token_id
    conts = generate_batch(base, prompts, pad, eos, new_tokens, 0.0, 0)
    seqs = torch.full((len(prompts), prompt_len + new_tokens), pad, dtype=torch.long)
    lengths = []
    for r, (p, c) in enumerate(zip(prompts, conts)):
        row = p + c.ids
        seqs[r, : len(row)] = torch.tensor(row)
        lengths.append(len(row))
    return seqs, lengths


@torch.no_grad()
def chain_counts(base: torch.nn.Module, head: EagleHead, seqs: torch.Tensor, lengths: list[int], prompt_len: int,
                 depth: int) -> np.ndarray:  # fmt: skip
    """[depth + 1]: roots whose first d drafted tokens all agree with the target (d = 1..depth), then roots."""
    counts = np.zeros(depth + 1)
    if not len(lengths):
        return counts
    device = next(base.parameters()).device
    ids = seqs.to(device)
    tp = target_pass(base, ids, head.config)
    argmax = tp.logits.argmax(-1)  # [N, L]: the target's next token after each position
    outs = unroll(head, base, tp, ids, depth)
    lm_head = base.get_output_embeddings()
    agree = torch.ones_like(argmax[:, :-1], dtype=torch.bool)
    for k, out in enumerate(outs):
        drafted = head.to_target(head.logits(out, lm_head).argmax(-1))  # step k at root j drafts x_{j+2+k}
        agree = agree & (drafted == _shift(argmax[:, 1:], k, -1))
        for r, n in enumerate(lengths):
            roots = slice(prompt_len - 1, max(prompt_len - 1, n - depth))  # x_{j+1} generated, chain inside the row
            counts[k] += float(agree[r, roots].sum())
            if k == 0:
                counts[depth] += agree[r, roots].numel()
    return counts


def _acceptance(counts: np.ndarray) -> Optional[ChainAcceptance]:
    roots = int(counts[-1])
    if not roots:
        return None
    acc = [round(float(c / roots), 4) for c in counts[:-1]]
    return ChainAcceptance(acc, round(1.0 + sum(acc), 3), roots)


def heldout_chain_acceptance(base: torch.nn.Module, head: EagleHead, data_dir: Path, cfg: EagleTrainConfig) -> dict:
    """``chain_counts`` per held-out language (``heldout_<lang>.npy``) and pooled."""
    from dataclasses import asdict  # noqa: PLC0415

    per, total = {}, np.zeros(cfg.eval_depth + 1)
    was_training = head.training
    head.eval()
    try:
        for p in sorted(Path(data_dir).glob("heldout_*.npy")):
            seqs, lengths = greedy_eval_sequences(base, np.load(p), cfg.eval_prompts, cfg.eval_prompt_len, cfg.eval_new_tokens)
            counts = chain_counts(base, head, seqs, lengths, cfg.eval_prompt_len, cfg.eval_depth)
            res = _acceptance(counts)
            if res is not None:
                per[p.stem[len("heldout_") :]] = asdict(res)
            total += counts
    finally:
        head.train(was_training)
    res = _acceptance(total)
    return {"per_language": per, "all": asdict(res) if res is not None else None}


# ----------------------------------------------------------------------------- export


def export_eagle(cfg: EagleTrainConfig, base: torch.nn.Module | None = None, log: Callable[[str], None] | None = None) -> dict:
    """Write the latest checkpoint's head to the export dir: fp16 safetensors and config.json in
    the released format (``save_head``), training.json and a README.md card with the
    held-out chain acceptance (measured on the fp16 weights that ship)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    check_config(cfg)
    tokens_dir, _, out_dir = resolve_paths(cfg)
    ckpt = load_checkpoint(out_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no EAGLE checkpoint in {out_dir}: run harness train eagle version={cfg.version} first")
    extra = ckpt.get("extra", {})
    base = base if base is not None else load_base(extra.get("base", cfg.base), cfg.device).requires_grad_(False)
    head = EagleHead(EagleHeadConfig(**extra["head"]))
    head.load_state_dict(ckpt["model"])
    head.to(dtype=torch.float16).to(dtype=torch.float32, device=next(base.parameters()).device)  # measure what ships
    t0 = time.time()
    acc = heldout_chain_acceptance(base, head, tokens_dir, cfg) if cfg.eval_prompts > 0 else {"per_language": {}, "all": None}
    pooled = acc["all"] or {}
    log(f"[train eagle] held-out chain acceptance by depth {pooled.get('acceptance')} "
        f"(mean accepted {pooled.get('mean_accepted')}) in {time.time() - t0:.0f} s")
    info = {
        "base_model": extra.get("base", cfg.base),
        "version": head.config.version,
        "head_config": extra["head"],
        "parameters": extra.get("n_params"),
        "data": extra.get("data"),
        "loss": extra.get("loss"),
        **run_record(ckpt),
        "loss_history": ckpt.get("history", [])[:: max(1, len(ckpt.get("history", [])) // 40)],
        "eval": {"prompts_per_language": cfg.eval_prompts, "prompt_len": cfg.eval_prompt_len,
                 "new_tokens": cfg.eval_new_tokens, "depth": cfg.eval_depth},
        "heldout_chain_acceptance": acc,
    }
    extra = {"format": f"EAGLE-{head.config.version} head (harness), released layout", "base_model": info["base_model"]}
    final = export_component(export_path(cfg), lambda d: save_head(head, head.config, d, dtype=torch.float16, extra=extra),
                             info, eagle_card, log, "eagle")  # fmt: skip
    return {"dir": str(final), **{k: info[k] for k in ("step", "training_tokens", "wall_time_min")}, "acceptance": acc["all"]}


def eagle_card(info: dict) -> str:
    """The README.md of an exported head."""
    h = info["head_config"]
    acc = info["heldout_chain_acceptance"]
    ev = info["eval"]
    depth = ev["depth"]
    rows = []
    for name, a in [("all", acc["all"]), *sorted(acc["per_language"].items())]:
        if a:
            cells = " | ".join(f"{x:.3f}" for x in a["acceptance"])
            rows.append(f"| {name} | {a['roots']:,} | {cells} | {a['mean_accepted']:.2f} |")
    cols = " | ".join(f"depth {d}" for d in range(1, depth + 1))
    sep = " | ".join("---" for _ in range(depth + 1))
    done = info["planned_steps"] and info["step"] >= info["planned_steps"]
    data = info["data"] or {}
    v3 = info["version"] == 3
    arch = (f"EAGLE-3 head: fc({len(h['fused_layers'])} x {h['target_hidden_size']} -> {h['hidden_size']}) over the target's "
            f"hidden states {h['fused_layers']}, one fused decoder layer, its own LM head over a draft vocabulary of "
            f"{h['draft_vocab_size']:,} of the target's {h['vocab_size']:,} tokens (d2t / t2d: the most frequent in the training data)"
            if v3 else
            f"EAGLE-1/2 head: fc(2 x {h['hidden_size']} -> {h['hidden_size']}) over [embedding of the next token ; the target's "
            "last hidden state], one Llama decoder layer, the target's own LM head")  # fmt: skip
    table = "\n".join(rows) if rows else "| (not measured) | | |"
    return f"""# EAGLE-{info['version']} head for `{info['base_model']}`

{arch}. {info['parameters']:,} parameters, stored in fp16, trained on the frozen target.

## Use
    harness run --model zoo-target --methods {'eagle3' if v3 else 'eagle eagle2'}

`harness.drafters.eagle.load_head(dir, target_config)` loads it (the released EAGLE format:
`model.safetensors` + `config.json`).

## Training
Data: {data.get('source')} ({data.get('rows', 0):,} rows, {data.get('tokens', 0):,} tokens, `{data.get('path')}`).
Loss: {info['loss']}.
{info['step']:,} steps{'' if done else ' (schedule NOT complete)'} of {info['batch_size']} rows (up to {info['seq_len']} tokens;
{info['training_tokens']:,} trained positions), {info['wall_time_min']} min on CPU; final loss (EMA) {info['loss_ema_at_export'] or float('nan'):.4f}.

## Held-out chain acceptance (teacher-forced, greedy)
{ev['prompts_per_language']} held-out windows of {ev['prompt_len']} tokens per language, continued greedily by the target
for {ev['new_tokens']} tokens; at each root in the continuation the head drafts a chain from the target's features
(feeding itself its own outputs). Depth d = share of roots whose first d drafted tokens all equal the target's
argmax; mean accepted = 1 + their sum (tokens per target forward of a chain of {depth}, bonus included).

| split | roots | {cols} | mean accepted |
| --- | --- | {sep} |
{table}

Exported {info['exported_at']}.
"""
