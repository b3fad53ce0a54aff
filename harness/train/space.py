"""SPACE semi-autoregressive fine-tuning (SAR-SFT) of any causal LM, and its export.

The fine-tune teaches the model to fill k mask tokens ``[M]`` with the tokens after the
next one (what ``methods/space.py`` decodes with). Upstream builds one example per
sequence: ``prefix + target[:s] + [M]*(k+1)`` with probability ``mask_prob``, else a plain
AR example. This module uses the packed variant instead, which gives more signal per
CPU second: every training block ``x[0:L+1]`` keeps its ordinary next-token loss on all
L positions, and ``mask_groups`` groups of k masks are appended after it::

    x_0 .. x_{L-1} | M M M M M (split p_1) | M M M M M (split p_2) | ...

A 4-D attention mask lets the masks of the group with split point p see ``x[0:p]`` and the
earlier masks of their own group only (never the other groups; no real token sees a
mask), and explicit position ids put mask m of that group at position p+m. So mask m is
exactly upstream's mask m of the example ``x[0:p] + [M]*(k+1)``: it is labelled with
``x[p+m+1]`` (the last real token ``x[p-1]`` predicts ``x[p]``, which the AR loss already
covers). Upstream's (k+1)-th mask carries no label and no later row attends to it, so it
cannot change any loss and is left out. A block's groups are labelled with probability
``mask_prob`` (upstream's per-example mix); unlabelled groups are computed and ignored.

Loss = AR cross-entropy (mean over the L positions) + ``mask_weight`` x mask
cross-entropy (mean over labelled mask positions). For code-corpus blocks (no
prompt/answer split) the split point p is uniform in ``[1, L-k]``. On the target's
self-distilled records (``data=auto|selfdistill``: corpus prompt + the target's own
continuation, right-padded; the SPACE paper fine-tunes on model-style outputs) p is uniform
over the continuation, so every mask label is a token the target wrote; padding carries no
loss.

The decoder reads k and the mask id from the checkpoint: they are stored in the saved
config as ``space_k`` and ``space_mask_token_id``.

Files: ``out_dir/checkpoint.pt`` (the generic loop's resumable checkpoint) and
``out_dir/model_init/`` (the config with the SPACE fields and the tokenizer with its mask
token, written at the first start); :func:`export` writes fp16 safetensors, tokenizer,
config, ``training.json``, ``quality.json`` and a card ``README.md`` to ``export_dir``.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from harness.paths import default_cache_dir, export_dir, replace_dir, resolve_repo_path
from harness.train.data import DataSpec, RecordBatches, check_data_choice, load_training_data
from harness.train.lm import TokenBlockBatches
from harness.train.loop import TrainLoopConfig, TrainResult, load_checkpoint, train
from harness.train.space_batch import IGNORE, pack_space_batch, packed_logits
from harness.train.space_quality import space_quality

INIT_DIR = "model_init"  # under out_dir: config + tokenizer of the model being fine-tuned


@dataclass
class SpaceTrainConfig(TrainLoopConfig):
    """One SPACE fine-tune: the loop's settings (lr, max_minutes, ...) plus the ones below."""

    base: str = "zoo/target"  # causal LM to fine-tune (hub id or local dir; relative: also tried from the repo root)
    data: str = "auto"  # auto (the base's self-distilled records if present, else corpus) | selfdistill | corpus
    selfdistill_dir: str = ""  # self-distilled records ("" = <cache>/zoo-data/selfdistill/<base dir name>)
    data_dir: str = ""  # token data with train.npy / heldout_*.npy ("" = <cache>/zoo-data/tokens)
    out_dir: str = ""  # checkpoint dir ("" = <cache>/train/space)
    export_dir: str = "zoo/target-space"  # where export() writes the model (relative = from the repo root)
    k: int = 5  # mask tokens per group = candidates per decoding step
    mask_prob: float = 0.5  # probability that a block's mask groups carry a loss (upstream's per-example mix)
    mask_weight: float = 1.0  # weight of the mask loss beside the AR loss
    mask_groups: int = 8  # mask groups appended per block (each at its own random split point)
    mask_token: str = "<mask>"  # added to the tokenizer (embeddings resized) if it has no mask token
    batch_size: int = 16  # blocks per optimiser step
    seq_len: int = 256  # real tokens per block (the AR part); longer self-distilled records are cut to it
    lr: float = 5e-4  # peak learning rate (a small model fine-tuned briefly)
    warmup_steps: int = 20  # linear warm-up steps
    weight_decay: float = 0.0  # no decay pulling a pretrained model towards zero
    max_minutes: float = 60.0  # wall-clock budget over all resumed runs (max_steps = 0)
    export_dtype: str = "float16"  # float16 | bfloat16 | float32 weights on disk
    evaluate: bool = True  # quality figures at export (held-out ppl, mask accuracy, HumanEval parse share)
    eval_tokens_per_lang: int = 20000  # held-out tokens per language for ppl and mask accuracy (0 = all)
    humaneval_limit: int = 0  # HumanEval prompts for the parse share (0 = all 164, -1 = skip)
    max_new_tokens: int = 128  # greedy completion length for the parse share


def loop_config(cfg: SpaceTrainConfig) -> TrainLoopConfig:
    return TrainLoopConfig(**{f.name: getattr(cfg, f.name) for f in fields(TrainLoopConfig)})


def cache_path(value: str, default: Path) -> Path:
    return Path(value).expanduser() if value else default


def paths_of(cfg: SpaceTrainConfig, kind: str = "space") -> tuple[Path, Path]:
    """(data_dir, out_dir) with the defaults filled in (``kind``: the fine-tune's name, its default out_dir)."""
    root = default_cache_dir()
    return cache_path(cfg.data_dir, root / "zoo-data" / "tokens"), cache_path(cfg.out_dir, root / "train" / kind)


# ----------------------------------------------------------------------------- the mask token


def ensure_mask_token(model, tokenizer, token: str = "<mask>") -> int:
    """The tokenizer's mask token id, adding ``token`` as its mask token (and resizing the
    model's embeddings) when it has none. Returns the id."""
    if tokenizer.mask_token_id is None:
        tokenizer.add_special_tokens({"mask_token": token})
    mask_id = int(tokenizer.mask_token_id)
    rows = model.get_input_embeddings().weight.shape[0]
    if mask_id >= rows:
        model.resize_token_embeddings(len(tokenizer))
    return mask_id


def space_losses(model, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(AR loss, mask loss, labelled mask positions) of a packed batch."""
    logits = packed_logits(model, batch)
    labels = batch["labels"].to(logits.device)
    L, V = batch["n_real"], logits.shape[-1]
    ar = F.cross_entropy(logits[:, :L].reshape(-1, V), labels[:, :L].reshape(-1))
    mask_labels = labels[:, L:].reshape(-1)
    n_mask = int((mask_labels != IGNORE).sum())
    if n_mask == 0:
        return ar, ar.new_zeros(()), 0
    mask = F.cross_entropy(logits[:, L:].reshape(-1, V), mask_labels, ignore_index=IGNORE)
    return ar, mask, n_mask


def make_space_loss(mask_weight: float) -> Callable:
    def loss_fn(model, batch):
        ar, mask, _ = space_losses(model, batch)
        return ar + mask_weight * mask, batch["n_tokens"]

    return loss_fn


class SpaceBatches:
    """Packed SAR batches over corpus windows (:class:`TokenBlockBatches`) or self-distilled
    records (:class:`RecordBatches`); resumable through them (the split points of a batch are
    seeded by its place in the data, not by a global RNG)."""

    def __init__(self, blocks: TokenBlockBatches | RecordBatches, k: int, groups: int, mask_prob: float, mask_id: int,
                 seed: int = 0):  # fmt: skip
        self.blocks = blocks
        self.k, self.groups, self.mask_prob, self.mask_id, self.seed = k, groups, mask_prob, mask_id, seed

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, Any]:
        place = [self.seed, self.blocks.epoch, self.blocks.cursor]
        block = next(self.blocks)
        return self.pack(block, np.random.default_rng(place))

    def pack(self, block, rng: np.random.Generator) -> dict[str, Any]:
        """One packed batch of ``block`` (subclasses pack other layouts over the same AR part)."""
        return pack_space_batch(block, self.k, self.groups, self.mask_prob, self.mask_id, rng)

    def state_dict(self) -> dict:
        return self.blocks.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.blocks.load_state_dict(state)


# ----------------------------------------------------------------------------- training


def _load_for_training(cfg: SpaceTrainConfig, out_dir: Path, log, kind: str = "space"):
    """The model to train and its tokenizer: from ``out_dir/model_init`` when resuming,
    else from the base (mask token added, ``<kind>_k`` / ``<kind>_mask_token_id`` set, model_init written)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    init = out_dir / INIT_DIR
    if (init / "config.json").exists() and load_checkpoint(out_dir) is not None:
        config = AutoConfig.from_pretrained(str(init))
        saved_k = int(getattr(config, f"{kind}_k"))
        if saved_k != cfg.k:
            raise ValueError(f"{out_dir} holds a {kind} fine-tune with k={saved_k}; resume it with k={saved_k} "
                             "or pick another out_dir")
        tok = AutoTokenizer.from_pretrained(str(init))
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)  # weights come from the checkpoint
        return model, tok, int(getattr(config, f"{kind}_mask_token_id"))
    base = str(resolve_repo_path(cfg.base))
    log(f"[{kind}] fine-tuning {base}")
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    mask_id = ensure_mask_token(model, tok, cfg.mask_token)
    setattr(model.config, f"{kind}_k", cfg.k)
    setattr(model.config, f"{kind}_mask_token_id", mask_id)
    setattr(model.config, f"{kind}_base_model", cfg.base)
    if init.exists():
        shutil.rmtree(init)
    init.mkdir(parents=True)
    model.config.save_pretrained(str(init))
    if model.generation_config is not None:
        model.generation_config.save_pretrained(str(init))
    tok.save_pretrained(str(init))
    return model, tok, mask_id


def run_mask_finetune(cfg: SpaceTrainConfig, kind: str, make_batches: Callable[[Any, int], Any],
                      log: Optional[Callable[[str], None]] = None) -> tuple[TrainResult, dict]:  # fmt: skip
    """Fine-tune (or resume) the base with appended mask tokens; ``make_batches(blocks, mask_id)``
    packs the data (SPACE's groups or another layout over the same AR part and loss). Returns the
    loop result and a summary (also ``summary.json``)."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    if not 0.0 <= cfg.mask_prob <= 1.0:
        raise ValueError(f"mask_prob must be in [0, 1], got {cfg.mask_prob}")
    if cfg.k < 1 or cfg.mask_groups < 1:
        raise ValueError(f"k and mask_groups must be >= 1, got k={cfg.k}, mask_groups={cfg.mask_groups}")
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    check_data_choice(cfg.data, kind)
    data_dir, out_dir = paths_of(cfg, kind)
    model, _tok, mask_id = _load_for_training(cfg, out_dir, log, kind)
    spec = DataSpec(cfg.data, cfg.base, cfg.selfdistill_dir, str(data_dir), cfg.batch_size, cfg.seq_len,
                    seed=cfg.seed + 1)  # not the base's order  # fmt: skip
    data = load_training_data(spec, log, kind)
    log(f"[{kind}] on {data.source} data ({data.rows:,} rows, {data.tokens:,} tokens from {data.path})")
    batches = make_batches(data.batches, mask_id)
    extra = {kind: asdict(cfg), "mask_id": mask_id, "data_dir": str(data_dir), "data": data.describe(),
             "n_params": sum(p.numel() for p in model.parameters())}
    result = train(model, make_space_loss(cfg.mask_weight), batches, loop_config(cfg), out_dir,
                   extra_state=extra, desc=f"train {kind}", log=log)
    summary = {"step": result.step, "planned_steps": result.planned_steps, "tokens": result.tokens,
               "epochs": round(data.batches.epochs_done, 3), "elapsed_min": round(result.elapsed_s / 60, 2),
               "finished": result.finished, "last_loss": result.last_loss, "k": cfg.k, "mask_id": mask_id}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return result, summary


def run_space_training(cfg: SpaceTrainConfig, log: Optional[Callable[[str], None]] = None) -> tuple[TrainResult, dict]:
    """Fine-tune (or resume) and return the loop result and a summary (also ``summary.json``)."""

    def make_batches(blocks, mask_id: int) -> SpaceBatches:
        return SpaceBatches(blocks, cfg.k, cfg.mask_groups, cfg.mask_prob, mask_id, seed=cfg.seed)

    return run_mask_finetune(cfg, "space", make_batches, log)


# ----------------------------------------------------------------------------- export


EXPORT_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=1, default=str), encoding="utf-8")


def load_finetuned(cfg: SpaceTrainConfig, kind: str):
    """(model, tokenizer, checkpoint) of the latest checkpoint of a ``kind`` fine-tune, the weights
    rounded to ``export_dtype`` and back to float32 (figures then describe what ships), eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig  # noqa: PLC0415

    _data_dir, out_dir = paths_of(cfg, kind)
    ckpt = load_checkpoint(out_dir)
    init = out_dir / INIT_DIR
    if ckpt is None or not (init / "config.json").exists():
        raise FileNotFoundError(f"no {kind} checkpoint in {out_dir}; run the fine-tune first (harness train {kind})")
    if cfg.export_dtype not in EXPORT_DTYPES:
        raise ValueError(f"export_dtype must be one of {', '.join(EXPORT_DTYPES)}, got {cfg.export_dtype!r}")
    tok = AutoTokenizer.from_pretrained(str(init))
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(init)), dtype=torch.float32)
    model.load_state_dict(ckpt["model"])
    model.eval()
    model.to(EXPORT_DTYPES[cfg.export_dtype]).float()
    if (init / "generation_config.json").exists():
        model.generation_config = GenerationConfig.from_pretrained(str(init))
    return model, tok, ckpt


def save_finetuned(model, tok, cfg: SpaceTrainConfig, files: dict[str, Any], card: Callable[[Path], None]) -> Path:
    """Write ``model`` in ``export_dtype`` with its tokenizer, the JSON ``files`` and the card
    (``card(dir)`` writes README.md) to ``cfg.export_dir``, replacing it whole; returns it."""
    final = export_dir(cfg.export_dir)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.to(EXPORT_DTYPES[cfg.export_dtype])
    model.config.dtype = cfg.export_dtype
    model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    for name, obj in files.items():
        _write_json(tmp / name, obj)
    card(tmp)
    replace_dir(tmp, final)
    return final


def export(cfg: SpaceTrainConfig, log: Optional[Callable[[str], None]] = None) -> Path:
    """Write the latest checkpoint to ``cfg.export_dir`` as a loadable model: weights in
    ``export_dtype`` safetensors, tokenizer (with the mask token), config (with
    ``space_k`` / ``space_mask_token_id``), ``training.json``, and, with ``evaluate``,
    ``quality.json``; then the card ``README.md``. Returns the directory."""
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    data_dir, _out_dir = paths_of(cfg)
    model, tok, ckpt = load_finetuned(cfg, "space")
    info = finetune_record(ckpt, cfg, model.config, tok, "space")
    quality = None
    if cfg.evaluate:
        base = AutoModelForCausalLM.from_pretrained(str(resolve_repo_path(info["base_model"])), dtype=torch.float32)
        quality = space_quality(model, base, tok, data_dir, info["k"], info["mask_token_id"], cfg, log=log)
    files = {"training.json": info, **({"quality.json": quality} if quality is not None else {})}
    final = save_finetuned(model, tok, cfg, files, lambda d: write_card(d, cfg.export_dir, info, quality))
    log(f"[space] exported step {info['step']}/{info['planned_steps']} (k={info['k']}, mask id "
        f"{info['mask_token_id']}) -> {final}")
    return final


def finetune_record(ckpt: dict, cfg: SpaceTrainConfig, config, tok, kind: str) -> dict[str, Any]:
    """``training.json`` of an exported ``kind`` fine-tune: base, k, mask token, the run's steps,
    tokens, time, loss and data (from the checkpoint)."""
    data_dir, _out_dir = paths_of(cfg, kind)
    trained = ckpt.get("extra", {}).get(kind, {})
    mask_id = int(getattr(config, f"{kind}_mask_token_id"))
    return {
        "method": kind,
        "base_model": trained.get("base", cfg.base),
        "k": int(getattr(config, f"{kind}_k")),
        "mask_token_id": mask_id,
        "mask_token": tok.convert_ids_to_tokens(mask_id),
        "step": ckpt["step"],
        "planned_steps": ckpt["planned_steps"],
        "schedule_complete": bool(ckpt["planned_steps"]) and ckpt["step"] >= ckpt["planned_steps"],
        "training_tokens": ckpt["tokens"],
        "wall_time_min": round(ckpt["elapsed_s"] / 60, 1),
        "loss_ema_at_export": ckpt.get("loss_ema"),
        "settings": trained,
        "loss_history": ckpt.get("history", [])[:: max(1, len(ckpt.get("history", [])) // 50)],
        "n_params": ckpt.get("extra", {}).get("n_params"),
        "data": ckpt.get("extra", {}).get("data", {"source": "corpus", "path": str(data_dir)}),
        "exported_dtype": cfg.export_dtype,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _cell(x: Any) -> str:
    return "-" if x is None else str(x)


def _row(values: Optional[list], k: int) -> str:
    return " | ".join(_cell(v) for v in (values or [None] * k)) + " |"


def _data_sentence(data: dict) -> str:
    if data.get("source") == "selfdistill":
        return (f"Data: {data.get('rows', 0):,} self-distilled records of the base model ({data.get('tokens', 0):,} "
                "tokens: a corpus prompt + the base's own greedy or sampled continuation; `harness zoo build "
                "stages=[selfdistill]`); blocks are whole records, right-padded, and the masks' split points lie in "
                "the continuation, so they learn to guess what the base writes.")
    return f"Data: windows of the zoo's tokenised training corpus ({data.get('path', '')})."


def write_card(model_dir: Path, name: str, info: dict, quality: Optional[dict]) -> None:
    """README.md of an exported SPACE model (``name``: the path users load it by)."""
    s = info.get("settings", {})
    status = ("final: the cosine schedule ran to its end" if info.get("schedule_complete")
              else f"an intermediate checkpoint (step {info['step']} of {info['planned_steps']} planned)")
    lines = [
        f"# {name}",
        "",
        f"`{info['base_model']}` after a SPACE semi-autoregressive fine-tune (Yi et al. 2024): k = {info['k']} "
        f"mask tokens `{info['mask_token']}` (id {info['mask_token_id']}) placed after a sequence guess the "
        "tokens after its next one, so `methods/space.py` verifies the previous guesses and makes new ones in "
        "one forward. k and the mask id are in `config.json` (`space_k`, `space_mask_token_id`); the decoder "
        "reads them from there.",
        "",
        "**The fine-tune changes the model.** SPACE decoding is lossless with respect to *this* model "
        "(greedy: same tokens as greedy autoregressive decoding of this checkpoint), not with respect to the "
        "base model: compare against `autoregressive` run on this directory.",
        "",
        "## Training",
        "",
        f"Packed SAR fine-tune (`harness/train/space.py`): each block of {s.get('seq_len')} tokens keeps its "
        f"next-token loss on every position, and {s.get('mask_groups')} groups of k masks at random split points "
        "are appended behind it (a 4-D attention mask shows a group only the tokens before its split point and "
        "its own earlier masks; mask m of a group at split p sits at position p+m and predicts token p+m+1). "
        f"A block's groups carry a loss with probability {s.get('mask_prob')}; loss = AR loss + "
        f"{s.get('mask_weight')} x mask loss.",
        "",
        _data_sentence(info.get("data", {})),
        "",
        f"{info['step']:,} optimiser steps of {s.get('batch_size')} blocks, {info['training_tokens']:,} tokens, "
        f"{info['wall_time_min']} minutes (fp32, CPU); AdamW lr {s.get('lr')} (warm-up {s.get('warmup_steps')} "
        f"steps, cosine to {s.get('min_lr_ratio')} x), weight decay {s.get('weight_decay')}, seed {s.get('seed')}. "
        f"This export is {status}. Training loss (EMA) at export: "
        f"{round(info.get('loss_ema_at_export') or float('nan'), 4)}. Weights on disk: {info['exported_dtype']}.",
        "",
    ]
    if quality:
        b, f = quality["base"], quality["space"]
        lines += [
            "## Quality beside the base model (computed on the exported weights)",
            "",
            "| figure | base | SPACE fine-tune |",
            "| --- | --- | --- |",
            f"| held-out loss | {_cell(b['heldout'].get('loss'))} | {_cell(f['heldout'].get('loss'))} |",
            f"| held-out perplexity | {_cell(b['heldout'].get('ppl'))} | {_cell(f['heldout'].get('ppl'))} |",
        ]
        if "humaneval" in f:
            lines += [
                f"| HumanEval greedy completions that parse | {_cell(b['humaneval'].get('parse_rate'))} | "
                f"{_cell(f['humaneval'].get('parse_rate'))} |",
                f"| repeated 4-gram share | {_cell(b['humaneval'].get('repeated_4gram_share_mean'))} | "
                f"{_cell(f['humaneval'].get('repeated_4gram_share_mean'))} |",
            ]
        lines += [
            f"| next-token top-1 accuracy (held-out) | {_cell(b['mask'].get('ar_accuracy'))} | "
            f"{_cell(f['mask'].get('ar_accuracy'))} |",
            f"| mean leading run of masks agreeing with the model's own argmax | "
            f"{_cell(b['mask'].get('mean_leading_agreement'))} | {_cell(f['mask'].get('mean_leading_agreement'))} |",
            "",
            "Mask accuracy per offset on held-out tokens (mask j guesses the token j+2 after the last real "
            "token): *accuracy* against the true token, *agreement* against the model's own next-token argmax at "
            "that position (what greedy verification accepts, teacher-forced).",
            "",
            "| mask j | " + " | ".join(str(j) for j in range(info["k"])) + " |",
            "| --- |" + " --- |" * info["k"],
            "| accuracy, SPACE | " + _row(f["mask"].get("accuracy"), info["k"]),
            "| agreement, SPACE | " + _row(f["mask"].get("agreement"), info["k"]),
            "| accuracy, base | " + _row(b["mask"].get("accuracy"), info["k"]),
            "",
            f"Held-out data: up to {quality.get('eval_tokens_per_lang') or 'all'} tokens per language of the zoo's "
            "held-out files; all figures also in `quality.json`.",
            "",
        ]
    else:
        lines += ["## Quality", "", "Not evaluated in this export (`evaluate=false`).", ""]
    lines += [
        "## Use",
        "",
        "```bash",
        f"harness run --model {name} --methods space --task humaneval --limit 20",
        "```",
        "",
        "Rebuild: `run_space_training(SpaceTrainConfig(...))` then `export(...)` from `harness.train.space` "
        "(same settings; a second run resumes from the checkpoint).",
        "",
    ]
    (model_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")
