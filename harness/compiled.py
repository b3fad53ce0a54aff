"""The compiled mode (``model.compile=true``): a static KV cache and ``torch.compile``.

The engine's interface does not change (``forward`` with explicit positions and custom
masks, the cache's ``truncate`` / ``keep`` / ``len``), so methods run unmodified. What
changes underneath:

* **Static cache.** ``StaticKVCache`` wraps transformers' ``StaticCache``: one buffer of
  ``static_len`` entries per layer, allocated once and reused from generation to
  generation (a small pool), so compiled graphs (and CUDA graphs) always see the same
  shapes and addresses. The logical length is a Python int: ``truncate`` only moves it,
  ``keep`` compacts in place (the inherited ``KVCache.keep``), and everything past it is
  hidden by the attention mask, which always spans the whole static length.
* **Buckets.** A forward of n tokens is padded to the smallest bucket >= n
  (``model.compile_buckets``, default 1, 4, 16, 64); padded rows come after the real ones,
  attend causally like them (so a real row never sees one), sit at position 0 and write
  their KV past the logical length, where the mask hides it. A forward longer than the
  largest bucket runs once, eagerly: a prompt on an empty cache over a fresh dynamic cache
  whose keys and values are then copied into the static one (its attention spans the prompt,
  not the static length: the zoo target's prefill 28 -> 18 ms), anything else over the static
  cache. So a run compiles one graph per bucket and model, never one per step or per prompt
  length.
* **Compiled forward.** One function, ``torch.compile(dynamic=False)``: set the write
  position of every cache layer, run the decoder, return the hidden states. Inductor on
  CPU; ``mode="reduce-overhead"`` (CUDA graphs) on CUDA. The LM head runs outside the
  graph on the rows asked for (the last one when decoding), which also gives Medusa its
  hidden state for free. After a shape's first call only the guards that tell the graphs
  apart are checked (``_call``): dynamo's full check costs more than a small model's step.
* **Warm-up.** ``warm_up()`` compiles every bucket (the runner calls it before timing);
  ``graphs`` counts what each engine compiled, ``compile_count()`` what the process did.

The CUDA branch (``mode="reduce-overhead"``, ``cudagraph_mark_step_begin``, the output
cloned before the next replay) follows PyTorch's documented CUDA-graph rules but has not
been run here (the project's machine has no GPU).

Limits: models with sliding-window layers are refused (a static sliding layer cannot roll
back), and so are models whose causal-LM head post-processes logits (soft-capping, a
logit scale), because the head runs here as the plain output projection.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from transformers import DynamicCache, StaticCache

from harness.kvcache import KVCache

# dynamo keeps at most this many graphs per compiled function (all engines of the process
# share one function): enough for every bucket of a target, its drafts and a cache regrowth
RECOMPILE_LIMIT = 64


class CompileSetupError(ValueError):
    """Compiled mode cannot run this model or these settings; the message says why and what to do."""


def compile_count() -> int:
    """Graphs ``torch.compile`` has compiled in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters  # noqa: PLC0415  (dynamo loads lazily)

    return int(counters["stats"]["unique_graphs"])


def compile_options(device: torch.device) -> dict:
    """``torch.compile`` arguments: fixed shapes; on CPU inductor's C++ wrapper (the graph's
    launcher in C++, not Python: a zoo-target step 15-25% faster, measured, for a longer first
    compile) and ``freezing`` (the weights become constants of the graph, so inductor prepacks
    them for oneDNN's matmuls: the zoo target's step another ~20% faster on one thread, measured
    side by side, for a first compile of ~100 s instead of ~60 s; the harness never changes
    weights after loading); on CUDA CUDA graphs (``mode="reduce-overhead"``, unverified here)."""
    if device.type == "cuda":
        return {"dynamic": False, "mode": "reduce-overhead"}
    return {"dynamic": False, "options": {"cpp_wrapper": True, "freezing": True}}


def bucket_for(n: int, buckets: tuple[int, ...]) -> int:
    """The smallest bucket that holds n tokens (n <= the largest bucket)."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} tokens exceed the largest bucket {buckets[-1]}")


class StaticKVCache(KVCache):
    """``KVCache`` over a ``StaticCache``: same ``len`` / ``truncate`` / ``keep``.

    ``len`` is the logical length (a Python int, moved by the forward, ``truncate`` and
    ``keep``); entries past it are stale and masked. The buffers go back to the engine's
    pool when the wrapper is dropped, for the next generation to reuse.
    """

    def __init__(self, owner: "CompiledForward", inner: StaticCache):  # not KVCache's: no DynamicCache here
        self.owner = owner
        self.inner = inner
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return self.inner.layers[0].max_cache_len

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} entries to {length}")
        self.length = length

    def __del__(self) -> None:
        owner = getattr(self, "owner", None)
        if owner is not None:
            owner.release(self.inner)


class CompiledForward:
    """The compiled forward of one model: static caches, bucketed shapes, graph count."""

    def __init__(self, model, device: torch.device, dtype: torch.dtype, buckets, static_len: int):
        text = model.config.get_text_config()
        if getattr(text, "final_logit_softcapping", None) or getattr(text, "logit_scale", None) not in (None, 1, 1.0):
            raise CompileSetupError("model.compile=true runs the LM head as a plain projection, but this model post-"
                                    "processes its logits (soft-capping, a logit scale); run it with model.compile=false")  # fmt: skip
        if any(StaticCache(config=model.config, max_cache_len=8).is_sliding):
            raise CompileSetupError("model.compile=true does not support sliding-window attention layers (a static "
                                    "sliding cache cannot roll back); run this model with model.compile=false")  # fmt: skip
        sizes = sorted({int(b) for b in buckets})
        if not sizes or sizes[0] < 1:
            raise CompileSetupError(f"model.compile_buckets must be positive token counts, got {list(buckets)}")
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = device
        self.dtype = dtype
        self.buckets = tuple(sizes)
        self.cuda = device.type == "cuda"
        self.graphs = 0  # graphs compiled by this engine's forwards (warm-up included)
        self._free: list[StaticCache] = []  # buffers of dropped caches, reused by new_cache()
        self._seen: set[tuple[int, int]] = set()  # (bucket, static length) already run with full guards
        self._resize(max(int(static_len), self.buckets[-1] + 1))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._step = torch.compile(self._decoder_forward, **compile_options(device))

    # ---- the static length -----------------------------------------------------------------
    def _resize(self, static_len: int) -> None:
        self.static_len = static_len
        self._free.clear()
        # cols - rows, [largest bucket, static_len]: a causal row r starting at slot s sees column c iff c - r <= s
        self._cols = torch.arange(static_len, device=self.device).view(1, -1)
        self._offsets = self._cols - self._rows(self.buckets[-1])
        self._zero = torch.zeros((), dtype=self.dtype, device=self.device)
        self._blocked = torch.tensor(torch.finfo(self.dtype).min, dtype=self.dtype, device=self.device)

    def reserve(self, tokens: int) -> None:
        """Size new caches for ``tokens`` entries plus one largest bucket of padding (before a
        run: prompt + max_new_tokens); shrinking or growing recompiles each bucket."""
        self._resize(tokens + self.buckets[-1])

    # ---- caches ----------------------------------------------------------------------------
    def new_cache(self) -> StaticKVCache:
        return StaticKVCache(self, self._free.pop() if self._free else self._allocate())

    def release(self, inner: StaticCache) -> None:
        if inner.layers[0].max_cache_len == self.static_len and len(self._free) < 4:
            self._free.append(inner)

    @torch.inference_mode()
    def _allocate(self) -> StaticCache:
        """A new static cache, its buffers created by one eager 1-token forward (a cache first
        seen uninitialised would make the compiled function trace a second graph)."""
        inner = StaticCache(config=self.model.config, max_cache_len=self.static_len)
        one = torch.zeros((1, 1), dtype=torch.long, device=self.device)
        mask = torch.where(self._offsets[:1] <= 0, self._zero, self._blocked).view(1, 1, 1, -1)
        self.decoder(input_ids=one, position_ids=one, attention_mask=mask, cache=inner, use_cache=True)
        return inner

    def _grow(self, cache: StaticKVCache, needed: int) -> None:
        """Move ``cache`` into a larger static cache (a longer prompt than reserved; recompiles)."""
        size = max(needed, 2 * self.static_len)
        warnings.warn(f"compiled mode: static KV cache grown from {self.static_len} to {size} entries "
                      "(each bucket recompiles); size it with model.compile_cache_len", stacklevel=4)  # fmt: skip
        self._resize(size)
        bigger = self._allocate()
        with torch.inference_mode():
            for old, new in zip(cache.inner.layers, bigger.layers):
                new.keys[:, :, : cache.length] = old.keys[:, :, : cache.length]
                new.values[:, :, : cache.length] = old.values[:, :, : cache.length]
        cache.inner = bigger

    # ---- the forward -----------------------------------------------------------------------
    def _decoder_forward(self, ids, positions, mask, cache: StaticCache, start) -> torch.Tensor:
        """The compiled function: write position = ``start`` in every layer, then the decoder."""
        for layer in cache.layers:
            layer.cumulative_length.copy_(start)
        return self.decoder(input_ids=ids, position_ids=positions, attention_mask=mask, cache=cache,
                            use_cache=True).last_hidden_state  # fmt: skip

    def _mask(self, start: int, allowed: Optional[torch.Tensor], size: int) -> torch.Tensor:
        """The ``[1, 1, size, static_len]`` float mask of ``size`` rows whose first one writes slot
        ``start``: causal by default, else ``allowed`` (bool ``[rows, start + rows]``) for the
        real rows; padded rows are causal."""
        offsets = self._offsets[:size] if size <= len(self._offsets) else self._cols - self._rows(size)
        visible = offsets <= start
        if allowed is not None:
            rows, width = allowed.shape
            visible = visible.clone()
            visible[:rows, :width] = allowed
            visible[:rows, width:] = False
        return torch.where(visible, self._zero, self._blocked).view(1, 1, size, self.static_len)

    def _rows(self, size: int) -> torch.Tensor:
        return torch.arange(size, device=self.device).view(-1, 1)

    def _call(self, ids, positions, mask, cache: StaticKVCache, start: int) -> torch.Tensor:
        """One compiled forward. The first call of a (bucket, static length) compiles with all of
        dynamo's guards; later ones check only the guards that tell this function's graphs apart
        (``skip_guard_eval_unsafe``, PyTorch's stance for a warmed-up model): checking all of them
        (every module, config and cache attribute) costs more than the step itself on CPU. Safe
        here because each shape's first call went through the full check and nothing else that
        is guarded changes between calls (a grown cache is a new static length: full check)."""
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # a new replay: earlier outputs may be overwritten
        args = (ids, positions, mask, cache.inner, torch.tensor(start, device=self.device))
        key = (ids.shape[1], self.static_len)
        if key in self._seen:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                hidden = self._step(*args)
        else:
            before = compile_count()
            hidden = self._step(*args)
            self.graphs += compile_count() - before
            self._seen.add(key)
        if self.cuda:
            hidden = hidden.clone()  # the graph's output buffer is reused by the next replay
        return hidden

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attn, cache: StaticKVCache,
                keep: int) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Logits (float32) and hidden states of the last ``keep`` rows (0 = all) of a forward
        of ``ids`` / ``positions`` ``[1, n]`` after the cached entries; ``attn`` is the
        engine's float mask ``[1, 1, n, past + n]`` (0 = attend) or None for causal."""
        if not isinstance(cache, StaticKVCache):
            raise TypeError("model.compile=true needs the engine's own caches (engine.new_cache())")
        n, past = ids.shape[1], len(cache)
        compiled = n <= self.buckets[-1]
        size = bucket_for(n, self.buckets) if compiled else n  # rows run, padding included
        if past + size > cache.capacity:
            self._grow(cache, past + size)
        allowed = None if attn is None else attn[0, 0] == 0
        # 1-D tensors padded, then viewed as [1, size]: the same strides whatever the caller passed (no recompile)
        ids_p = F.pad(ids[0], (0, size - n)).view(1, size)
        pos_p = F.pad(positions[0], (0, size - n)).view(1, size)
        mask = self._mask(past, allowed, size)
        if compiled:
            hidden = self._call(ids_p, pos_p, mask, cache, past)
        elif past == 0 and allowed is None:  # a prompt longer than the largest bucket: see _prefill
            hidden = self._prefill(ids, positions, cache.inner)
        else:  # longer than the largest bucket after cached entries: one eager forward over the static cache
            hidden = self._decoder_forward(ids_p, pos_p, mask, cache.inner, torch.tensor(past, device=self.device))
        cache.length = past + n
        h = hidden[0, max(n - keep, 0) : n] if keep else hidden[0, :n]
        return self.head(h).float(), h

    def _prefill(self, ids: torch.Tensor, positions: torch.Tensor, inner: StaticCache) -> torch.Tensor:
        """A causal prompt on an empty cache: one eager forward over a fresh ``DynamicCache`` (its
        attention spans the prompt only, not the whole static length), whose keys and values are
        then copied into the static buffers. Faster than the eager forward over the static cache
        and than padded compiled chunks, and no graph per prompt length."""
        n = ids.shape[1]
        dynamic = DynamicCache(config=self.model.config)
        hidden = self.decoder(input_ids=ids, position_ids=positions, cache=dynamic, use_cache=True).last_hidden_state
        for src, dst in zip(dynamic.layers, inner.layers):
            dst.keys[:, :, :n].copy_(src.keys)
            dst.values[:, :, :n].copy_(src.values)
        return hidden

    @torch.inference_mode()
    def warm_up(self) -> int:
        """Compile every bucket now (forwards on a scratch cache); returns the graphs made. On CUDA
        each bucket runs three times: CUDA graph trees record on a graph's second run, not its first."""
        before = self.graphs
        cache = self.new_cache()
        for bucket in self.buckets:
            ids = torch.zeros((1, bucket), dtype=torch.long, device=self.device)
            for _ in range(3 if self.cuda else 1):
                self.forward(ids, torch.arange(bucket, device=self.device).view(1, -1), None, cache, keep=1)
                cache.truncate(0)
        return self.graphs - before

    def compile_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` compiled like the forward (one graph per input shape), e.g. Medusa heads."""
        return torch.compile(module, **compile_options(self.device))
