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
  (``model.compile_buckets``, default 1, 2, 4, 16, 64); padded rows come after the real ones,
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
* **Chosen layers, skipped sublayers, injected rows.** A forward that returns chosen layers'
  hidden states (EAGLE-3's features) runs ``_decoder_forward_fused``: the decoder's own modules called in
  order inside one graph, the selection a fixed tuple, so one graph per bucket and selection. A
  forward with injected rows (Hidden Transfer, FIRP) runs the layers before the injection layer
  and those from it as one graph each (``layers``, one graph per range and bucket). A
  layer-skipping forward (SWIFT) calls the
  sublayers it keeps one by one (``sublayer``), each its own graph per bucket: every skip set
  SWIFT's search tries reuses the same 2 x layers graphs per bucket, where one whole-model graph
  per skip set would compile again for every set a generation scores (and a gated whole-model
  graph that keeps shapes static would run every sublayer, so the draft would cost a full
  forward). The price is a graph call per sublayer instead of one per forward. Llama-family
  decoders only (the engine's ``SKIPPABLE``), as in eager mode.
* **Warm-up.** ``warm_up()`` compiles every bucket (the runner calls it before timing);
  ``graphs`` counts what each engine compiled, ``compile_count()`` what the process did. The
  fused, layer-range and sublayer graphs are compiled for what a method's warm-up generation ran
  (every bucket of each selection and layer range, whatever bucket the warm-up's prompt needed,
  since a later prompt's length picks its own; every sublayer at each bucket layer-skipping
  forwards used).

The CUDA branch (``mode="reduce-overhead"``, ``cudagraph_mark_step_begin``, the output
cloned before the next replay) follows PyTorch's documented CUDA-graph rules but has not
been run here (the project's machine has no GPU).

Limits: transformers' output-capturing hooks (installed on a model once an eager forward asked it
for ``output_hidden_states``) are not traced by the module-by-module graphs: compile a model that
has not run such a forward in this process. Models with sliding-window layers are refused (a
static sliding layer cannot roll back), and so are models whose causal-LM head post-processes
logits (soft-capping, a logit scale), because the head runs here as the plain output projection.
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


def attention_sublayer(layer, h, mask, positions, rotary, cache) -> torch.Tensor:
    """``h`` plus the self-attention sublayer of a Llama-family decoder ``layer`` (its own
    modules, called in the model's order), writing its keys and values to ``cache`` (None: none)."""
    out, _ = layer.self_attn(hidden_states=layer.input_layernorm(h), attention_mask=mask, position_ids=positions,
                             cache=cache, use_cache=cache is not None, position_embeddings=rotary)  # fmt: skip
    return h + out


def mlp_sublayer(layer, h) -> torch.Tensor:
    """``h`` plus the MLP sublayer of a Llama-family decoder ``layer``."""
    return h + layer.mlp(layer.post_attention_layernorm(h))


SUBLAYERS = ("attn", "mlp")  # the sublayer kinds a layer-skipping forward runs one by one


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
        self._seen: set[tuple] = set()  # (graph kind, bucket, static length) already run with full guards
        self.fused: set[tuple[int, ...]] = set()  # hidden-state selections the fused forward has run
        self.sublayer_sizes: set[int] = set()  # buckets layer-skipping forwards have run
        self.spans: set[tuple[int, int]] = set()  # decoder layer ranges [lo, hi) run as one graph (injected rows)
        self._resize(max(int(static_len), self.buckets[-1] + 1))
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        options = compile_options(device)
        self._step = torch.compile(self._decoder_forward, **options)
        self._fused_step = torch.compile(self._decoder_forward_fused, **options)  # one graph per bucket and selection
        self.heads: dict[int, "CompiledHead"] = {}  # draft heads on this compiled path, by id of the module
        self._sublayer_steps = {"attn": torch.compile(self._attention_step, **options),  # one graph per
                                "mlp": torch.compile(self._mlp_step, **options)}  # layer and bucket  # fmt: skip
        self._span_step = torch.compile(self._layers_step, **options)  # one graph per layer range and bucket

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

    def _decoder_forward_fused(self, ids, positions, mask, cache: StaticCache, start, layers: tuple[int, ...]):
        """The compiled function of a forward that also returns chosen layers' hidden states
        (EAGLE-3's features): the decoder's own modules called in its order (embedding, rotary
        tables, each decoder layer, final norm; Llama-family decoders), so every selection is a
        fixed part of one graph. ``layers`` numbered as transformers' ``hidden_states`` (i = the
        input of decoder layer i, N = the final normed output). Returns (last hidden state,
        the selected states concatenated on the last axis)."""
        for layer in cache.layers:
            layer.cumulative_length.copy_(start)
        h = self.decoder.embed_tokens(ids)
        rotary = self.decoder.rotary_emb(h, positions)
        states = [h]
        for layer in self.decoder.layers[: len(cache.layers)]:
            h = layer(h, attention_mask=mask, position_embeddings=rotary, position_ids=positions, cache=cache,
                      use_cache=True)  # fmt: skip
            states.append(h)
        states[-1] = h = self.decoder.norm(h)
        return h, torch.cat([states[i] for i in layers], dim=-1)

    def _attention_step(self, index: int, h, mask, positions, cos, sin, cache: StaticCache, start):
        """The compiled function of one attention sublayer (decoder layer ``index``), writing
        its keys and values from slot ``start``."""
        cache.layers[index].cumulative_length.copy_(start)
        return attention_sublayer(self.decoder.layers[index], h, mask, positions, (cos, sin), cache)

    def _mlp_step(self, index: int, h):
        """The compiled function of one MLP sublayer (decoder layer ``index``)."""
        return mlp_sublayer(self.decoder.layers[index], h)

    def _layers_step(self, lo: int, hi: int, h, mask, positions, cos, sin, cache: StaticCache, start):
        """The compiled function of decoder layers ``lo``..``hi - 1`` run whole, sublayer by sublayer
        as the layerwise forward calls them, writing their keys and values from slot ``start``."""
        for index in range(lo, hi):
            cache.layers[index].cumulative_length.copy_(start)
            layer = self.decoder.layers[index]
            h = mlp_sublayer(layer, attention_sublayer(layer, h, mask, positions, (cos, sin), cache))
        return h

    def mask(self, start: int, allowed: Optional[torch.Tensor], size: int) -> torch.Tensor:
        """The float mask of a (padded) forward; see ``_mask``."""
        return self._mask(start, allowed, size)

    def padded(self, n: int) -> int:
        """Rows a forward of n tokens runs: its bucket, or n itself past the largest (run eagerly)."""
        return bucket_for(n, self.buckets) if n <= self.buckets[-1] else n

    def fit(self, cache: "StaticKVCache", needed: int) -> None:
        """Grow ``cache`` (recompiling) if a forward would write past its static length."""
        if needed > cache.capacity:
            self._grow(cache, needed)

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

    def _call(self, step, key: tuple, *args):
        """One compiled forward. The first call of a (bucket, static length) compiles with all of
        dynamo's guards; later ones check only the guards that tell this function's graphs apart
        (``skip_guard_eval_unsafe``, PyTorch's stance for a warmed-up model): checking all of them
        (every module, config and cache attribute) costs more than the step itself on CPU. Safe
        here because each shape's first call went through the full check and nothing else that
        is guarded changes between calls (a grown cache is a new static length: full check)."""
        if self.cuda:
            torch.compiler.cudagraph_mark_step_begin()  # a new replay: earlier outputs may be overwritten
        key = key + (self.static_len,)
        if key in self._seen:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                out = step(*args)
        else:
            if key[0] != "decode" and any(layer._forward_hooks for layer in self.decoder.layers):
                raise CompileSetupError("this model carries transformers' output-capturing hooks (an eager forward "
                                        "asked it for output_hidden_states), which the compiled module-by-module "
                                        "forwards cannot trace; load the model afresh for model.compile=true")  # fmt: skip
            before = compile_count()
            out = step(*args)
            self.graphs += compile_count() - before
            self._seen.add(key)
        if self.cuda:  # the graph's output buffers are reused by the next replay
            out = tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone()
        return out

    def sublayer(self, kind: str, index: int, h: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
                 rotary: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache, start: int) -> torch.Tensor:  # fmt: skip
        """``h`` (``[1, rows, hidden]``, rows padded to a bucket by the caller) through one sublayer
        (``kind`` in SUBLAYERS) of decoder layer ``index``: a layer-skipping forward calls the
        sublayers it keeps one by one, so every skip set reuses the same graphs (one per sublayer
        and bucket) instead of compiling one per skip set. Rows past the largest bucket run eagerly."""
        size = h.shape[1]
        start_t = torch.tensor(start, device=self.device)
        if kind == "attn":
            args = (index, h, mask, positions, rotary[0], rotary[1], cache.inner, start_t)
        else:
            args = (index, h)
        if size > self.buckets[-1]:
            return (self._attention_step if kind == "attn" else self._mlp_step)(*args)
        self.sublayer_sizes.add(size)
        return self._call(self._sublayer_steps[kind], (kind, index, size), *args)

    def layers(self, lo: int, hi: int, h: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor,
               rotary: tuple[torch.Tensor, torch.Tensor], cache: StaticKVCache, start: int) -> torch.Tensor:  # fmt: skip
        """``h`` (``[1, rows, hidden]``, rows padded to a bucket by the caller) through decoder layers
        ``lo``..``hi - 1``, nothing skipped: one graph per layer range and bucket (a forward with
        injected rows runs the layers before the injection and those from it as two graphs, not one
        per sublayer). Rows past the largest bucket run eagerly."""
        args = (lo, hi, h, mask, positions, rotary[0], rotary[1], cache.inner, torch.tensor(start, device=self.device))
        self.spans.add((lo, hi))  # even run eagerly: a shorter later forward runs it at a bucket
        if h.shape[1] > self.buckets[-1]:
            return self._layers_step(*args)
        return self._call(self._span_step, ("layers", lo, hi, h.shape[1]), *args)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, attn, cache: StaticKVCache, keep: int,
                layers: Optional[tuple[int, ...]] = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Logits (float32) and hidden states of the last ``keep`` rows (0 = all) of a forward
        of ``ids`` / ``positions`` ``[1, n]`` after the cached entries; ``attn`` is the
        engine's float mask ``[1, 1, n, past + n]`` (0 = attend) or None for causal. With
        ``layers`` (a fixed selection, see ``_decoder_forward_fused``) the hidden states returned are
        those layers' concatenated; the logits still come from the last one."""
        if not isinstance(cache, StaticKVCache):
            raise TypeError("model.compile=true needs the engine's own caches (engine.new_cache())")
        n, past = ids.shape[1], len(cache)
        compiled = n <= self.buckets[-1]
        size = self.padded(n)  # rows run, padding included
        self.fit(cache, past + size)
        allowed = None if attn is None else attn[0, 0] == 0
        # 1-D tensors padded, then viewed as [1, size]: the same strides whatever the caller passed (no recompile)
        ids_p = F.pad(ids[0], (0, size - n)).view(1, size)
        pos_p = F.pad(positions[0], (0, size - n)).view(1, size)
        mask = self._mask(past, allowed, size)
        start = torch.tensor(past, device=self.device)
        selected = None
        if layers is not None:
            self.fused.add(layers)
            args = (ids_p, pos_p, mask, cache.inner, start, layers)
            if compiled:
                hidden, selected = self._call(self._fused_step, ("fused", layers, size), *args)
            else:  # longer than the largest bucket: one eager forward over the static cache
                hidden, selected = self._decoder_forward_fused(*args)
        elif compiled:
            hidden = self._call(self._step, ("decode", size), ids_p, pos_p, mask, cache.inner, start)
        elif past == 0 and allowed is None:  # a prompt longer than the largest bucket: see _prefill
            hidden = self._prefill(ids, positions, cache.inner)
        else:  # longer than the largest bucket after cached entries: one eager forward over the static cache
            hidden = self._decoder_forward(ids_p, pos_p, mask, cache.inner, start)
        cache.length = past + n
        rows = slice(max(n - keep, 0), n) if keep else slice(0, n)
        h = hidden[0, rows]
        return self.head(h).float(), (h if selected is None else selected[0, rows])

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
        """Compile every bucket now (forwards on a scratch cache); returns the graphs made. Every
        bucket of each hidden-state selection and each layer range run so far too (EAGLE-3's
        verify, injected rows' forwards), and every
        sublayer at each bucket layer-skipping forwards have run (a skip set of a later
        generation may keep a sublayer this one skipped). On CUDA each graph runs three times:
        CUDA graph trees record on a graph's second run, not its first."""
        before = self.graphs
        cache = self.new_cache()
        hidden = self.decoder.config.hidden_size
        for bucket in self.buckets:
            ids = torch.zeros((1, bucket), dtype=torch.long, device=self.device)
            positions = torch.arange(bucket, device=self.device).view(1, -1)
            for _ in range(3 if self.cuda else 1):
                for layers in [None, *sorted(self.fused)]:
                    self.forward(ids, positions, None, cache, keep=1, layers=layers)
                    cache.truncate(0)
                h = torch.zeros((1, bucket, hidden), dtype=self.dtype, device=self.device)
                rotary = self.decoder.rotary_emb(h, positions)
                for lo, hi in sorted(self.spans):
                    self.layers(lo, hi, h, self._mask(0, None, bucket), positions, rotary, cache, 0)
                if bucket not in self.sublayer_sizes:
                    continue
                for index in range(len(cache.inner.layers)):
                    for kind in SUBLAYERS:
                        self.sublayer(kind, index, h, self._mask(0, None, bucket), positions, rotary, cache, 0)
        for head in self.heads.values():
            head.warm_up()
        return self.graphs - before

    def draft_head(self, head: torch.nn.Module, embed: torch.nn.Module) -> "CompiledHead":
        """The compiled forward of an EAGLE draft head reading ``embed`` (made once per head)."""
        if id(head) not in self.heads:
            self.heads[id(head)] = CompiledHead(self, head, embed)
        return self.heads[id(head)]

    def compile_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` compiled like the forward (one graph per input shape), e.g. Medusa heads."""
        return torch.compile(module, **compile_options(self.device))


class StaticHeadCache:
    """A draft head's KV cache over a ``CompiledHead``'s static buffers (per head layer, keys and
    values ``[1, kv_heads, static_len, head_dim]``): the ``len`` / ``truncate`` / ``keep`` of the
    eager ``HeadCache``. The length is a Python int; entries past it are stale and masked."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]):
        self.keys, self.values = keys, values
        self.length = 0

    def __len__(self) -> int:
        return self.length

    @property
    def capacity(self) -> int:
        return int(self.keys[0].shape[2])

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a head cache of {self.length} entries to {length}")
        self.length = length

    @torch.inference_mode()
    def keep(self, indices) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long, device=self.keys[0].device).flatten()
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.length):
            raise ValueError(f"keep() indices must be in [0, {self.length}), got {idx.tolist()}")
        for tensor in self.keys + self.values:
            tensor[:, :, : idx.numel()] = tensor.index_select(2, idx)
        self.length = idx.numel()


class HeadSlots:
    """The cache a head's attention sees inside one compiled head forward of ``rows`` (padded)
    rows: ``append`` writes their keys and values from slot ``start`` into the static buffers and
    returns the whole buffers, and ``len`` counts the key columns before the new rows as the
    head's attention does (static length - rows), so its mask spans the static length."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], start: torch.Tensor, rows: int):
        self.keys, self.values, self.start, self.rows = keys, values, start, rows

    def __len__(self) -> int:
        return int(self.keys[0].shape[2]) - self.rows

    def append(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        slots = torch.arange(keys.shape[2], device=keys.device) + self.start
        self.keys[layer].index_copy_(2, slots, keys)
        self.values[layer].index_copy_(2, slots, values)
        return self.keys[layer], self.values[layer]


class CompiledHead:
    """An EAGLE draft head's forward on the compiled path of its target (``CompiledForward``):
    rows padded to the target's buckets, a static head cache, one graph per bucket and input
    width (EAGLE-3 reads the fused target features when it runs committed pairs, its own
    outputs when it expands the tree: two widths). Called like the head itself; rows past the
    largest bucket (a prompt's pairs) run eagerly over the same static cache."""

    def __init__(self, owner: CompiledForward, head: torch.nn.Module, embed: torch.nn.Module):
        self.owner, self.head, self.embed = owner, head, embed
        self.widths: set[int] = set()  # input widths run so far (warm_up compiles each at every bucket)
        self.buffers: Optional[tuple[list[torch.Tensor], list[torch.Tensor]]] = None
        self._step = torch.compile(self._forward, **compile_options(owner.device))

    def new_cache(self) -> StaticHeadCache:
        """A cache over this head's buffers (one set, reused: one generation drafts at a time)."""
        size = self.owner.static_len + self.owner.buckets[-1]  # committed pairs + a tree's nodes
        if self.buffers is None or self.buffers[0][0].shape[2] != size:
            self.buffers = self._allocate(size)
        return StaticHeadCache(*self.buffers)

    def _allocate(self, size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        cfg = self.head.config
        layers = cfg.num_layers if cfg.version == 1 else 1
        shape = (1, cfg.num_key_value_heads, size, cfg.head_dim)
        make = lambda: torch.zeros(shape, dtype=self.owner.dtype, device=self.owner.device)  # noqa: E731
        return [make() for _ in range(layers)], [make() for _ in range(layers)]

    def _forward(self, features, ids, positions, mask, keys, values, start):
        """The compiled function: the head's own forward over the static cache (``HeadSlots``)."""
        return self.head(features, ids, self.embed, positions, HeadSlots(keys, values, start, ids.shape[1]), mask)

    def __call__(self, features: torch.Tensor, input_ids: torch.Tensor, embed: torch.nn.Module,
                 positions: torch.Tensor, cache: StaticHeadCache, mask: Optional[torch.Tensor] = None) -> torch.Tensor:  # fmt: skip
        """``EagleHead.forward`` for one sequence (``[1, T]`` ids), appending to ``cache``."""
        if embed is not self.embed:
            raise ValueError("a compiled head reads the embedding it was compiled with")
        t, past = input_ids.shape[1], len(cache)
        size = self.owner.padded(t)
        if past + size > cache.capacity:
            raise ValueError(f"the compiled head cache holds {cache.capacity} entries, {past + size} needed; "
                             "raise model.compile_cache_len")  # fmt: skip
        allowed = mask.to(torch.bool) if mask is not None else \
            torch.ones(t, past + t, dtype=torch.bool, device=input_ids.device).tril(past)  # fmt: skip
        full = torch.zeros(size, cache.capacity, dtype=torch.bool, device=input_ids.device)
        full[:t, : past + t] = allowed.view(t, past + t)
        pad = torch.arange(t, size, device=input_ids.device)
        full[pad, past + pad] = True  # padded rows see their own slot only (written past the length)
        feats = F.pad(features, (0, 0, 0, size - t))
        ids = F.pad(input_ids[0], (0, size - t)).view(1, size)
        pos = F.pad(torch.as_tensor(positions, device=input_ids.device).flatten(), (0, size - t))
        args = (feats, ids, pos, full, cache.keys, cache.values, torch.tensor(past, device=input_ids.device))
        if size > self.owner.buckets[-1]:
            out = self._forward(*args)
        else:
            self.widths.add(features.shape[-1])
            out = self.owner._call(self._step, ("head", id(self), features.shape[-1], size), *args)
        cache.length = past + t
        return out[:, :t]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Every bucket of each input width run so far, on a scratch cache."""
        cache = self.new_cache()
        for width in sorted(self.widths):
            for bucket in self.owner.buckets:
                ids = torch.zeros((1, bucket), dtype=torch.long, device=self.owner.device)
                feats = torch.zeros((1, bucket, width), dtype=self.owner.dtype, device=self.owner.device)
                self(feats, ids, self.embed, torch.arange(bucket, device=self.owner.device), cache)
                cache.truncate(0)
