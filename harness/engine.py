"""The execution layer every method runs on.

It owns the model, its device and dtype, and the KV cache. Methods call
``Engine.forward(ids, positions, cache, mask)`` and the cache's ``truncate`` and
``keep``; nothing else in the project touches transformers' cache or mask internals.

The model is a stock transformers causal LM (no forked modeling file, no patching): a
custom attention mask is passed as the 4-D float mask transformers accepts
(``[1, 1, new, cached + new]``, 0 = attend, -inf = blocked) together with explicit
position ids, which is how trees and SPACE chunks are verified in one forward.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, DynamicCache

from harness.config import ModelConfig
from harness.paths import resolve_repo_path

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(Exception):
    """The model or tokenizer could not be loaded; the message says why and what to do."""


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [new_tokens, vocab], float32
    hidden: Optional[torch.Tensor] = None  # [new_tokens, hidden] last hidden state, if asked


class KVCache:
    """A transformers ``DynamicCache`` with the two edits speculative methods need.

    ``truncate(n)`` drops everything after the first n entries (rollback).
    ``keep(indices)`` makes the cache equal to ``cache[indices]`` along the sequence,
    moving only the entries that are not already in place (tree / SPACE compaction).
    """

    def __init__(self, config):
        self.inner = DynamicCache(config=config)

    def __len__(self) -> int:
        return self.inner.get_seq_length()

    def truncate(self, length: int) -> None:
        extra = len(self) - length
        if extra < 0:
            raise ValueError(f"cannot truncate a cache of {len(self)} entries to {length}")
        if extra > 0:
            self.inner.crop(-extra)

    @torch.inference_mode()
    def keep(self, indices: list[int] | torch.Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        n = len(self)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n or (idx[1:] <= idx[:-1]).any()):
            raise ValueError(f"keep() needs strictly increasing indices in [0, {n}), got {idx.tolist()}")
        target = torch.arange(idx.numel())
        moved = (idx != target).nonzero().flatten()
        if moved.numel():
            start = int(moved[0])  # entries before this one are already in place
            src = idx[start:]
            for layer in self.inner.layers:
                for tensor in (layer.keys, layer.values):
                    tensor[:, :, start : idx.numel()] = tensor.index_select(2, src.to(tensor.device))
        self.truncate(idx.numel())


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class Engine:
    """One loaded model (and its tokenizer) on one device, with timing helpers."""

    def __init__(self, model, tokenizer, cfg: ModelConfig, device: torch.device):
        self.model = model
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.device = device
        self.dtype = DTYPES[cfg.dtype]
        self.config = model.config
        self.forwards = 0  # forwards since creation; methods count their own per sample
        self.forward_seconds = 0.0  # wall time spent inside forward() (see sync_each_forward)
        # CUDA: synchronise after each forward so forward times are real (every method syncs
        # once per step anyway to read its accepted tokens)
        self.sync_each_forward = device.type == "cuda"
        self.forward_log: Optional[list[tuple[int, float]]] = None  # (new tokens, seconds) per forward, when a list

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: ModelConfig) -> "Engine":
        if cfg.dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype '{cfg.dtype}'; use one of {', '.join(DTYPES)} (model.dtype=...)")
        device = select_device(cfg.device)
        source = str(resolve_repo_path(cfg.path)) if cfg.path else ""
        if not source:
            raise ModelLoadError("no model path given; set model.path=<hub id or local dir> or pick --model NAME")
        common = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(resolve_repo_path(cfg.tokenizer or source)), **common)
            if cfg.random_init:
                config = AutoConfig.from_pretrained(source, **common)
                torch.manual_seed(cfg.seed)
                model = AutoModelForCausalLM.from_config(
                    config, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation
                )
            else:
                model = AutoModelForCausalLM.from_pretrained(
                    source, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation, **common
                )
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ModelLoadError(
                f"cannot load model '{cfg.path}': {first} "
                "(give a local directory with config.json or a hub id reachable offline; model.path=...)"
            ) from exc
        model.to(device).eval()
        model.requires_grad_(False)
        return cls(model, tokenizer, cfg, device)

    @classmethod
    def from_model(cls, model, tokenizer, cfg: Optional[ModelConfig] = None) -> "Engine":
        """Wrap an already built model (tests, training code)."""
        cfg = cfg or ModelConfig(name="in-memory", path="", dtype=_dtype_name(model.dtype))
        model.eval()
        return cls(model, tokenizer, cfg, next(model.parameters()).device)

    # ---- properties ----------------------------------------------------------------
    @property
    def max_length(self) -> int:
        return int(getattr(self.config, "max_position_embeddings", 0) or 10**9)

    @property
    def eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.config):
            value = getattr(source, "eos_token_id", None) if source is not None else None
            if value is None:
                continue
            ids.update(value if isinstance(value, (list, tuple)) else [value])
        if not ids and self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ---- the forward -------------------------------------------------------------------
    def new_cache(self) -> KVCache:
        return KVCache(self.config)

    @torch.inference_mode()
    def forward(
        self,
        ids: list[int] | torch.Tensor,
        cache: KVCache,
        positions: Optional[list[int] | torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        hidden: bool = False,
        last_only: bool = False,
        keep_last: int = 0,
    ) -> ForwardOutput:
        """Run ``ids`` after the ``len(cache)`` cached entries and append them to the cache.

        positions: explicit position ids (default: consecutive after the cache).
        mask: boolean ``[new, cached + new]``, True = may attend; default causal.
        hidden: also return the last hidden state (Medusa heads need it).
        last_only: compute logits for the last token only (plain decoding).
        keep_last: compute logits (and hidden) for the last ``keep_last`` tokens only (0 = all).
        """
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        past = len(cache)
        new = ids_t.shape[1]
        if positions is None:
            pos_t = torch.arange(past, past + new, device=self.device).view(1, -1)
        else:
            pos_t = torch.as_tensor(positions, dtype=torch.long, device=self.device).view(1, -1)
        attn = None
        if mask is not None:
            if tuple(mask.shape) != (new, past + new):
                raise ValueError(f"mask must be [{new}, {past + new}], got {list(mask.shape)}")
            attn = torch.zeros((1, 1, new, past + new), dtype=self.dtype, device=self.device)
            attn.masked_fill_(~mask.to(self.device).view(1, 1, new, past + new), torch.finfo(self.dtype).min)
        self.forwards += 1
        start = time.perf_counter()
        try:
            return self._forward(ids_t, pos_t, attn, cache, hidden, 1 if last_only else keep_last)
        finally:
            if self.sync_each_forward:
                self.synchronize()
            seconds = time.perf_counter() - start
            self.forward_seconds += seconds
            if self.forward_log is not None:
                self.forward_log.append((new, seconds))

    def _forward(self, ids_t, pos_t, attn, cache: KVCache, hidden: bool, keep: int) -> ForwardOutput:
        if not hidden:
            out = self.model(
                input_ids=ids_t,
                position_ids=pos_t,
                attention_mask=attn,
                cache=cache.inner,
                use_cache=True,
                logits_to_keep=keep,
            )
            return ForwardOutput(logits=out.logits[0].float())
        base = self.model.get_decoder()
        out = base(input_ids=ids_t, position_ids=pos_t, attention_mask=attn, cache=cache.inner, use_cache=True)
        h = out.last_hidden_state[0]
        if keep:
            h = h[-keep:]
        logits = self.model.get_output_embeddings()(h)
        return ForwardOutput(logits=logits.float(), hidden=h)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def clock(self) -> float:
        """A monotonic time stamp taken after the device has finished queued work."""
        self.synchronize()
        return time.perf_counter()

    def reset_peak_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            reset_peak_rss()

    def peak_memory_bytes(self) -> Optional[int]:
        """Peak CUDA allocation, or the process's peak RSS on CPU, since reset_peak_memory()."""
        if self.device.type == "cuda":
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss()


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) for this process, where Linux allows it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    return "float32"
