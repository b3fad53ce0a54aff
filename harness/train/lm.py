"""Causal-LM pretraining on the code corpus: token data, Llama configs, batches, loss, eval.

Everything here takes plain dataclasses; the Hydra CLI lives in ``harness.cli_train``.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from harness.train.loop import TrainLoopConfig, TrainResult, load_checkpoint, train


@dataclass
class ModelConfig:
    """Shape of a Llama causal LM (the vocabulary comes from the tokenizer)."""

    name: str = "target"  # zoo name (output dirs use it)
    hidden_size: int = 192  # model width
    num_hidden_layers: int = 6  # transformer blocks
    num_attention_heads: int = 6  # attention heads
    num_key_value_heads: int = 0  # KV heads (0 = same as attention heads)
    intermediate_size: int = 512  # MLP width
    max_position_embeddings: int = 2048  # longest position the RoPE config advertises
    rope_theta: float = 10000.0  # RoPE base
    tie_word_embeddings: bool = True  # share input embedding and LM head
    initializer_range: float = 0.02  # init std


TARGET = ModelConfig()
DRAFT = ModelConfig(name="draft", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384)


def llama_config(mc: ModelConfig, tokenizer) -> Any:
    from transformers import LlamaConfig  # noqa: PLC0415

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=mc.hidden_size,
        num_hidden_layers=mc.num_hidden_layers,
        num_attention_heads=mc.num_attention_heads,
        num_key_value_heads=mc.num_key_value_heads or mc.num_attention_heads,
        intermediate_size=mc.intermediate_size,
        max_position_embeddings=mc.max_position_embeddings,
        rope_theta=mc.rope_theta,
        tie_word_embeddings=mc.tie_word_embeddings,
        initializer_range=mc.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        attention_bias=False,
        mlp_bias=False,
    )


def build_model(config) -> torch.nn.Module:
    from transformers import LlamaForCausalLM  # noqa: PLC0415

    return LlamaForCausalLM(config)


# ----------------------------------------------------------------------------- token data


def encode_corpus(docs, tokenizer, out_dir: str | os.PathLike, seed: int = 0) -> dict:
    """Tokenise documents into ``train.npy`` (one stream, documents in a seeded random order,
    each as ``<s> ... </s>``) and ``heldout_<lang>.npy``; returns token counts per language."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    backend = tokenizer.backend_tokenizer
    texts = [d.text for d in docs]
    ids = [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    order = np.random.default_rng(seed).permutation(len(docs))
    counts: dict[str, dict[str, int]] = {}
    train_parts: list[np.ndarray] = []
    held: dict[str, list[np.ndarray]] = {}
    dtype = np.uint16 if len(tokenizer) < 65536 else np.int32
    for i in order:
        d = docs[i]
        arr = np.asarray([bos, *ids[i], eos], dtype=dtype)
        c = counts.setdefault(d.lang, {"train_tokens": 0, "heldout_tokens": 0, "train_files": 0, "heldout_files": 0})
        if d.split == "heldout":
            held.setdefault(d.lang, []).append(arr)
            c["heldout_tokens"] += len(arr)
            c["heldout_files"] += 1
        else:
            train_parts.append(arr)
            c["train_tokens"] += len(arr)
            c["train_files"] += 1
    np.save(out / "train.npy", np.concatenate(train_parts) if train_parts else np.zeros(0, dtype))
    for lang, parts in held.items():
        np.save(out / f"heldout_{lang}.npy", np.concatenate(parts))
    meta = {"token_counts": counts, "train_tokens": int(sum(c["train_tokens"] for c in counts.values())),
            "heldout_tokens": int(sum(c["heldout_tokens"] for c in counts.values())), "seed": seed}
    (out / "data_meta.json").write_text(json.dumps(meta, indent=1))
    return meta


class TokenBlockBatches:
    """Batches of ``[batch_size, seq_len + 1]`` windows of a token stream.

    The stream is cut into non-overlapping windows (stride ``seq_len``); each epoch visits
    them in a seeded permutation. The position (epoch, cursor) is the resumable state.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0):
        n_windows = (len(tokens) - 1) // seq_len
        if n_windows < batch_size:
            raise ValueError(f"only {n_windows} windows of {seq_len} tokens for a batch of {batch_size}")
        self.tokens = tokens
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.n_windows = n_windows
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        if self.cursor + self.batch_size > self.n_windows:
            self.epoch += 1
            self.cursor = 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.cursor : self.cursor + self.batch_size]
        self.cursor += self.batch_size
        L = self.seq_len
        rows = [self.tokens[i * L : i * L + L + 1] for i in idx]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "n_windows": self.n_windows}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_windows") != self.n_windows:
            raise ValueError("the training data changed since the checkpoint (window count differs)")
        self.epoch, self.cursor = state["epoch"], state["cursor"]
        self._perm = self._permutation(self.epoch)

    @property
    def epochs_done(self) -> float:
        return self.epoch + self.cursor / self.n_windows


class MixedBatches:
    """Batches whose rows come from two token streams in a fixed proportion.

    Each batch holds ``n_second`` windows of ``second`` (the function-level stream) and
    ``batch_size - n_second`` of ``first`` (the file-level stream), each stream walked by its
    own :class:`TokenBlockBatches`; the pair of positions is the resumable state.
    """

    def __init__(self, first: np.ndarray, second: np.ndarray, batch_size: int, seq_len: int, share: float, seed: int = 0):
        n_second = int(round(batch_size * share))
        if not 0 < n_second < batch_size:
            raise ValueError(f"train.function_share={share} gives {n_second} of {batch_size} rows: "
                             "choose a share that leaves at least one row to each stream")
        self.first = TokenBlockBatches(first, batch_size - n_second, seq_len, seed=seed)
        self.second = TokenBlockBatches(second, n_second, seq_len, seed=seed + 1)
        self.n_windows = self.first.n_windows  # epochs are counted on the file-level stream

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return torch.cat([next(self.first), next(self.second)])

    def state_dict(self) -> dict:
        return {"first": self.first.state_dict(), "second": self.second.state_dict(),
                "epoch": self.first.epoch, "cursor": self.first.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.first.load_state_dict(state["first"])
        self.second.load_state_dict(state["second"])

    @property
    def epochs_done(self) -> float:
        return self.first.epochs_done


def lm_loss(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Next-token cross-entropy on a ``[B, L+1]`` block."""
    x, y = batch[:, :-1], batch[:, 1:]
    logits = model(input_ids=x).logits
    loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1))
    return loss, y.numel()


@torch.no_grad()
def heldout_loss(model, tokens: np.ndarray, seq_len: int = 512, batch_size: int = 8, max_tokens: int = 0) -> tuple[float, int]:
    """Mean next-token loss over non-overlapping windows of ``tokens`` (and the token count)."""
    was_training = model.training
    model.eval()
    n = len(tokens)
    if max_tokens:
        n = min(n, max_tokens + 1)
    starts = list(range(0, max(0, n - 1), seq_len))
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        chunk = [tokens[s : min(s + seq_len + 1, n)] for s in starts[i : i + batch_size]]
        full = [c for c in chunk if len(c) == seq_len + 1]
        rest = [c for c in chunk if 1 < len(c) < seq_len + 1]  # ragged last window: run alone
        groups = ([np.stack(full)] if full else []) + [c[None] for c in rest]
        for g in groups:
            b = torch.from_numpy(g.astype(np.int64))
            logits = model(input_ids=b[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), b[:, 1:].reshape(-1), reduction="sum")
            total += float(loss)
            count += b[:, 1:].numel()
    if was_training:
        model.train()
    return (total / max(1, count)), count


def heldout_report(model, data_dir: str | os.PathLike, seq_len: int = 512, max_tokens_per_lang: int = 0) -> dict:
    """Held-out loss and perplexity per language and overall (token-weighted)."""
    import math  # noqa: PLC0415

    out: dict[str, Any] = {"per_language": {}}
    tot, cnt = 0.0, 0
    for p in sorted(Path(data_dir).glob("heldout_*.npy")):
        lang = p.stem[len("heldout_"):]
        loss, n = heldout_loss(model, np.load(p), seq_len=seq_len, max_tokens=max_tokens_per_lang)
        out["per_language"][lang] = {"loss": round(loss, 4), "ppl": round(math.exp(loss), 2), "tokens": n}
        tot += loss * n
        cnt += n
    if cnt:
        out["loss"] = round(tot / cnt, 4)
        out["ppl"] = round(math.exp(tot / cnt), 2)
        out["tokens"] = cnt
    return out


# ----------------------------------------------------------------------------- the job


@dataclass
class LMTrainConfig(TrainLoopConfig):
    """Loop settings plus the LM batch shape (the ``train`` group of ``harness train lm``)."""

    batch_size: int = 16  # sequences per optimiser step
    seq_len: int = 512  # tokens per sequence (batch_size * seq_len ~ 8k tokens/step)
    eval_at_end: bool = True  # compute held-out loss when training finishes
    # share of each batch's rows taken from the function-level stream (train_functions.npy:
    # whole functions ending in </s>), the rest from the file-level stream; 0 = files only
    function_share: float = 0.0
    init_from: str = ""  # start from these weights when there is no checkpoint yet: a checkpoint dir or an exported model dir ("" = random init)


@dataclass
class LMTrainJob:
    """One LM training run (what ``harness train lm`` runs)."""

    model: ModelConfig = field(default_factory=ModelConfig)  # architecture
    loop: TrainLoopConfig = field(default_factory=TrainLoopConfig)  # optimisation
    data_dir: str = ""  # tokenised data (train.npy, heldout_*.npy)
    tokenizer_dir: str = ""  # tokenizer to build the model for
    out_dir: str = ""  # checkpoint dir
    batch_size: int = 16  # sequences per step
    seq_len: int = 512  # tokens per sequence
    eval_at_end: bool = True  # held-out loss after training
    function_share: float = 0.0  # share of each batch's rows from the function-level stream (see LMTrainConfig)
    init_from: str = ""  # initial weights when out_dir has no checkpoint (see LMTrainConfig)


def run_lm_training(job: LMTrainJob, log=None) -> tuple[TrainResult, dict]:
    """Build (or resume) the model and train it; returns the loop result and a summary."""
    from harness.zoo.tokenizer import load_tokenizer  # noqa: PLC0415

    log = log or (lambda s: print(s, flush=True))
    if job.loop.threads > 0:
        torch.set_num_threads(job.loop.threads)
    tok = load_tokenizer(job.tokenizer_dir)
    ckpt = load_checkpoint(job.out_dir)
    from transformers import LlamaConfig  # noqa: PLC0415

    init = None
    if ckpt is not None and "llama_config" in ckpt.get("extra", {}):
        config = LlamaConfig.from_dict(ckpt["extra"]["llama_config"])
    elif job.init_from:
        init = load_initial_weights(job.init_from, len(tok))
        config = init.config
        job.model = replace(job.model, **{k: getattr(config, k, getattr(job.model, k)) for k in asdict(job.model)
                                          if k not in ("name", "num_key_value_heads", "rope_theta")})
    else:
        config = llama_config(job.model, tok)
    init_info = ckpt.get("extra", {}).get("init") if ckpt is not None else None
    ckpt = None
    torch.manual_seed(job.loop.seed)
    model = build_model(config)
    if init is not None:
        model.load_state_dict(init.state_dict)
        init_info = init.info
        log(f"[train {job.model.name}] starting from {init.info['source']} ({init.info.get('training_tokens') or '?'} tokens of training)")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"[train {job.model.name}] {n_params / 1e6:.2f}M parameters, out_dir {job.out_dir}")
    corpus = corpus_batches(job.data_dir, job.batch_size, job.seq_len, job.function_share, job.loop.seed)
    batches = corpus.batches
    extra = {"llama_config": config.to_dict(), "model": asdict(job.model), "n_params": n_params,
             "data_dir": str(job.data_dir), "tokenizer_dir": str(job.tokenizer_dir),
             "batch_size": job.batch_size, "seq_len": job.seq_len, "train_stream_tokens": corpus.stream_tokens,
             "function_share": job.function_share,
             "function_stream_tokens": corpus.function_tokens, "init": init_info}
    result = train(model, lm_loss, batches, job.loop, job.out_dir, extra_state=extra, desc=f"train {job.model.name}", log=log)
    summary: dict[str, Any] = {"step": result.step, "tokens": result.tokens, "epochs": round(batches.epochs_done, 3),
                               "elapsed_min": round(result.elapsed_s / 60, 2), "finished": result.finished}
    if job.eval_at_end and result.finished:
        rep = heldout_report(model, job.data_dir, seq_len=job.seq_len)
        summary["heldout"] = rep
        (Path(job.out_dir) / "heldout.json").write_text(json.dumps({"step": result.step, **rep}, indent=1))
        log(f"[train {job.model.name}] held-out loss {rep.get('loss')} (ppl {rep.get('ppl')})")
    return result, summary


@dataclass
class InitialWeights:
    """Weights a training run starts from instead of a random init."""

    config: Any  # the LlamaConfig they belong to
    state_dict: dict  # float32 tensors
    info: dict  # where they came from (source, sha256, training tokens and steps behind them)


def load_initial_weights(source: str, vocab_size: int) -> InitialWeights:
    """Weights from a checkpoint directory (``checkpoint.pt``) or an exported model directory
    (``config.json`` + ``model.safetensors``, cast to float32)."""
    import hashlib  # noqa: PLC0415

    from transformers import LlamaConfig  # noqa: PLC0415

    from harness.paths import resolve_repo_path  # noqa: PLC0415

    src = resolve_repo_path(source)
    if (src / "checkpoint.pt").exists():
        ck = load_checkpoint(src)
        config = LlamaConfig.from_dict(ck["extra"]["llama_config"])
        state = ck["model"]
        info = {"source": str(src / "checkpoint.pt"), "kind": "checkpoint", "step": ck["step"],
                "training_tokens": ck["tokens"], "elapsed_s": ck["elapsed_s"]}
    elif (src / "model.safetensors").exists() and (src / "config.json").exists():
        from safetensors.torch import load_file  # noqa: PLC0415

        config = LlamaConfig.from_pretrained(str(src))
        state = {k: v.float() for k, v in load_file(str(src / "model.safetensors")).items()}
        if config.tie_word_embeddings and "lm_head.weight" not in state:
            state["lm_head.weight"] = state["model.embed_tokens.weight"]
        info = {"source": str(src), "kind": "exported model",
                "sha256": hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()}
        tj = src / "training.json"
        if tj.exists():
            t = json.loads(tj.read_text())
            info.update(step=t.get("step"), training_tokens=t.get("training_tokens"),
                        elapsed_s=round(60 * (t.get("wall_time_min") or 0), 1), exported_dtype=t.get("exported_dtype"))
            if t.get("distillation"):  # an earlier distillation phase: its recipe travels with the weights
                info["distillation"] = t["distillation"].get("method")
    else:
        raise FileNotFoundError(f"train.init_from={source!r}: neither a checkpoint dir (checkpoint.pt) "
                                "nor an exported model dir (config.json + model.safetensors)")
    if config.vocab_size != vocab_size:
        raise ValueError(f"train.init_from={source!r} has a vocabulary of {config.vocab_size}, the tokenizer "
                         f"{vocab_size}: initial weights must belong to the zoo's tokenizer")
    return InitialWeights(config, state, info)


@dataclass
class CorpusBatches:
    """The next-token batches of the tokenised corpus and the sizes of the streams behind them."""

    batches: "TokenBlockBatches | MixedBatches"
    stream_tokens: int  # tokens of the file-level stream (train.npy)
    function_tokens: int  # tokens of the function-level stream (train_functions.npy; 0 when unused)


def corpus_batches(data_dir: str | os.PathLike, batch_size: int, seq_len: int, function_share: float,
                   seed: int) -> CorpusBatches:  # fmt: skip
    """File-level windows of ``train.npy``, with ``function_share`` of every batch's rows from
    ``train_functions.npy`` when it is above 0."""
    tokens = np.load(Path(data_dir) / "train.npy", mmap_mode="r")
    if function_share <= 0:
        return CorpusBatches(TokenBlockBatches(tokens, batch_size, seq_len, seed=seed), int(len(tokens)), 0)
    fpath = Path(data_dir) / "train_functions.npy"
    if not fpath.exists():
        raise FileNotFoundError(f"{fpath} is missing: run `harness zoo prepare` to build the function-level samples")
    ftokens = np.load(fpath, mmap_mode="r")
    return CorpusBatches(MixedBatches(tokens, ftokens, batch_size, seq_len, function_share, seed=seed),
                         int(len(tokens)), int(len(ftokens)))


@dataclass
class ContinuedModel:
    """A model trained further: rebuilt from its own checkpoint (a resume) or from initial weights."""

    model: torch.nn.Module
    config: Any  # the LlamaConfig
    shape: "ModelConfig"  # the architecture fields, for training.json
    init_info: Optional[dict]  # where the first weights came from (``InitialWeights.info``)
    extra: dict  # the checkpoint's extra state ({} when starting)


def continue_model(name: str, out_dir: str | os.PathLike, init_from: str, vocab_size: int, seed: int,
                   missing_init: str, log: Callable[[str], None]) -> ContinuedModel:  # fmt: skip
    """The model of a fine-tune stage: its checkpoint in ``out_dir`` when there is one (the
    training loop then restores the weights), else ``init_from``'s weights; ``missing_init``
    is the error message when neither exists."""
    from transformers import LlamaConfig  # noqa: PLC0415

    ckpt = load_checkpoint(out_dir)
    if ckpt is not None:
        extra = ckpt["extra"]
        config, init_info, state = LlamaConfig.from_dict(extra["llama_config"]), extra.get("init"), None
    elif init_from:
        init = load_initial_weights(init_from, vocab_size)
        config, init_info, state, extra = init.config, init.info, init.state_dict, {}
    else:
        raise ValueError(missing_init)
    torch.manual_seed(seed)
    model = build_model(config)
    if state is not None:
        model.load_state_dict(state)
        log(f"[train {name}] starting from {init_info['source']}")
    shape = ModelConfig(name=name)
    shape = replace(shape, **{k: getattr(config, k) for k in asdict(shape) if k != "name" and hasattr(config, k)})
    return ContinuedModel(model, config, shape, init_info, extra)


def make_job(model: ModelConfig, train_cfg: LMTrainConfig, paths, out_dir: str = "") -> LMTrainJob:
    """An :class:`LMTrainJob` from CLI-level configs and the prepared data paths
    (``out_dir`` "" = ``<cache>/train/<model.name>``)."""
    out = Path(out_dir).expanduser() if out_dir else Path(paths.root) / "train" / model.name
    loop = TrainLoopConfig(**{k: getattr(train_cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    return LMTrainJob(model=model, loop=loop, data_dir=str(paths.tokens), tokenizer_dir=str(paths.tokenizer),
                      out_dir=str(out), batch_size=train_cfg.batch_size, seq_len=train_cfg.seq_len,
                      eval_at_end=train_cfg.eval_at_end, function_share=train_cfg.function_share,
                      init_from=train_cfg.init_from)
