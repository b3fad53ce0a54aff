"""The engine every method runs on.

It owns the model, its device and dtype, and the KV cache. Methods call
``Engine.forward(ids, positions, cache, mask)`` and the cache's ``truncate`` and
``keep``; nothing else in the project touches transformers' cache or mask internals.

The model is a stock transformers causal LM (no forked modeling file, no patching): a
custom attention mask is passed as the 4-D float mask transformers accepts
(``[1, 1, new, cached + new]``, 0 = attend, -inf = blocked) together with explicit
position ids, which is how trees and SPACE chunks are verified in one forward.
Sliding-window layers get the window added to that mask (one mask per layer type), and
their cache keeps every entry so it can roll back (see harness/kvcache.py, ``_attention_mask``).
A ``LayerSkip`` forward (self-speculation, ``swift``) leaves sublayers out, and an ``Injection``
forward (``hidden-transfer``, ``firp``) adds rows of hidden states at one decoder layer; both call
the model's own modules one by one (``_layerwise_forward``), Llama-family decoders only; compiled,
each kept sublayer of a skipping forward is a graph of its own, and the layers before and from an
injection one graph each (harness/compiled.py).

Timing: between ``start_timing()`` and ``stop_timing()`` every forward's duration is
recorded without synchronising the device inside a generation (``ForwardTimer``: the
monotonic clock on CPU, CUDA events on a GPU, read after the generation). A ``DraftClock``
times a method's own draft modules (EAGLE and Medusa heads) the same way, as draft forwards.
With a ``PhaseClock`` attached (``harness profile --phases``), a step's host time is split by
phase (``Engine.phase``): forwards count as ``verify`` (the target) or ``draft``.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from harness.compiled import CompiledForward, attention_sublayer, mlp_sublayer
from harness.config import ModelConfig
from harness.errors import HarnessError
from harness.kvcache import KVCache
from harness.paths import is_path_like, resolve_repo_path
from harness.registry import MODELS

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(HarnessError):
    """The model or tokenizer could not be loaded; the message says why and what to do."""


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [new_tokens, vocab], float32
    hidden: Optional[torch.Tensor] = None  # [new_tokens, hidden] last hidden state, if asked
    injected: Optional[torch.Tensor] = None  # [rows, vocab] logits of an Injection's rows, if one was given


@dataclass(frozen=True)
class LayerSkip:
    """Sublayers a forward leaves out: the model drafting for itself (``swift``).

    A skipped sublayer adds nothing to the residual stream; a skipped attention sublayer also
    writes nothing to its layer's cache, so after such a forward the cache is ragged (those
    layers hold fewer entries). ``KVCache.truncate`` back to the length before the forward
    makes it even again, and must come before the next full forward.
    """

    attn: frozenset[int] = frozenset()  # decoder layers (0-based) whose self-attention is skipped
    mlp: frozenset[int] = frozenset()  # decoder layers whose MLP is skipped

    def __len__(self) -> int:
        return len(self.attn) + len(self.mlp)


@dataclass(frozen=True)
class Injection:
    """Rows of hidden states that join a forward at one decoder layer (Hidden Transfer, FIRP).

    The forward's tokens run through every layer as usual. Entering decoder layer ``layer``,
    ``make`` turns their hidden states there (``[new, hidden]``, what that layer reads) into
    ``m`` extra rows, which then run through layers ``layer``.. beside the tokens, attend as
    ``mask`` says, and come out through the final norm and the LM head as
    ``ForwardOutput.injected``. The tokens never see the rows. The rows' keys and values are
    appended to the cache of those layers only, so the cache is ragged afterwards:
    ``KVCache.truncate`` or ``keep`` down to at most the tokens' entries before the next forward.
    """

    layer: int  # first decoder layer (0-based) the rows pass through; 1 <= layer < number of layers
    make: Callable[[torch.Tensor], torch.Tensor]  # tokens' hidden states entering `layer` [new, H] -> rows [m, H]
    positions: torch.Tensor  # [m] position id of each row
    mask: torch.Tensor  # bool [m, past + new + m]: row may attend to column (cache, tokens, rows)


# model_type of the decoders whose layers are ``h += attn(norm(h)); h += mlp(norm(h))`` and whose
# model is ``embed -> layers -> norm -> lm_head``: the ones a LayerSkip forward can run by calling
# their own modules (tests/test_swift.py checks each against the plain forward)
SKIPPABLE = ("llama", "mistral", "qwen2")


class ForwardTimer:
    """Per-forward durations of one timed generation, taken without synchronising inside it.

    CPU: the monotonic clock around each forward. CUDA: a pair of CUDA events recorded on the
    stream around each forward (no host synchronisation); ``read()`` synchronises once, after
    the generation, and converts them. So a method's wall time is never inflated by per-forward
    synchronisation, and our methods and transformers' ``generate`` are timed alike.
    """

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.marks: list[tuple[int, Any, Any]] = []  # (new tokens, start, end) per forward
        self.origin = self.begin()  # when timing started: end_offsets() are measured from here

    def begin(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def end(self, start: Any, new_tokens: int) -> None:
        if not self.cuda:
            self.marks.append((new_tokens, start, time.perf_counter()))
            return
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        self.marks.append((new_tokens, start, event))

    def read(self) -> list[tuple[int, float]]:
        """(new tokens, seconds) per forward, in order."""
        if not self.cuda:
            return [(n, end - start) for n, start, end in self.marks]
        torch.cuda.synchronize(self.device)
        return [(n, start.elapsed_time(end) / 1000) for n, start, end in self.marks]

    def end_offsets(self) -> list[float]:
        """Seconds from the start of timing to the end of each forward, in order (after ``read``
        on CUDA, which synchronised once); the first is the time to the first token."""
        if not self.cuda:
            return [end - self.origin for _, _, end in self.marks]
        return [self.origin.elapsed_time(end) / 1000 for _, _, end in self.marks]


# the phases of a decoding step (``PhaseClock``); time outside all of them is "other"
PHASES = ("draft", "verify", "tree", "accept", "cache")
NO_PHASE = nullcontext()  # what Engine.phase returns when no phase clock is attached (reusable)


class PhaseClock:
    """Seconds spent in each phase of decoding, exclusive: a phase entered inside another
    pauses the outer one (a head forward inside tree building counts as ``draft`` only).

    It reads the host's monotonic clock at phase boundaries and never synchronises the device:
    on CPU it measures where the time goes; on CUDA it measures the host's side (launches,
    Python, host transfers), which is what a step's host work costs there.
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)  # phase -> accumulated seconds
        self.stack: list[str] = []  # the phases entered, innermost last
        self.since = 0.0  # when the innermost phase last started or resumed

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        now = time.perf_counter()
        if self.stack:
            self.seconds[self.stack[-1]] += now - self.since  # pause the outer phase
        self.stack.append(name)
        self.since = now
        try:
            yield
        finally:
            now = time.perf_counter()
            self.seconds[self.stack.pop()] += now - self.since
            self.since = now  # the outer phase (if any) resumes


class DraftClock:
    """Times a method's own draft modules (an EAGLE or Medusa head: forwards that do not run
    through ``Engine.forward``) as draft forwards. The runner starts and stops it with the draft
    engines' timers (``Method.draft_timers``), so the head's compute lands in the record's draft
    time (and the step cost), not in host time; under a phase clock it is the ``draft`` phase."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self.timer: Optional[ForwardTimer] = None

    def start_timing(self) -> None:
        self.timer = ForwardTimer(self.engine.device)

    def stop_timing(self) -> list[tuple[int, float]]:
        timer, self.timer = self.timer, None
        return timer.read() if timer is not None else []

    @contextmanager
    def timed(self, new_tokens: int) -> Iterator[None]:
        """Time the block as one draft forward over ``new_tokens`` tokens (a no-op when off)."""
        timer = self.timer
        with self.engine.phase("draft"):
            start = timer.begin() if timer is not None else None
            yield
            if timer is not None:
                timer.end(start, new_tokens)


LAYER_TYPES = ("full_attention", "sliding_attention")  # the attention layer types custom masks support


def attention_layout(config) -> tuple[Optional[int], Optional[list[str]]]:
    """(sliding window or None, per-layer types or None) of a model's attention layers.

    None for the window when no layer slides; None for the types when the model does not
    list them (then a set window applies to every layer, as in Mistral).
    """
    text = config.get_text_config()
    window = getattr(text, "sliding_window", None)
    types = getattr(text, "layer_types", None)
    if types is not None and "sliding_attention" not in types:
        window = None
    return (int(window) if window else None), (list(types) if types is not None else None)


def select_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_model_files(directory: Path) -> None:
    """A local model directory's files, checked before transformers reads them: every ``*.json``
    (config, tokenizer, generation config) valid JSON, ``config.json`` an object, and every ``*.safetensors`` whole (its
    header parses and the tensors it lists fit in the file). ModelLoadError names the file, the
    problem and the fix."""
    fix = "restore the file (copy or download the model again, or rebuild it: `harness zoo build`)"
    if not directory.is_dir():
        return
    for path in sorted(directory.glob("*.json")):
        try:
            data = json.loads(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"model file {path} is not valid JSON ({exc}); {fix}") from None
        if path.name == "config.json" and not isinstance(data, dict):
            raise ModelLoadError(f"model file {path} is not a JSON object; {fix}")
    for weights in sorted(directory.glob("*.safetensors")):
        problem = safetensors_problem(weights)
        if problem:
            raise ModelLoadError(f"model file {weights} is damaged: {problem}; {fix}")


def safetensors_problem(path: Path) -> Optional[str]:
    """What is wrong with a safetensors file, or None: 8 bytes of header length (little endian),
    a JSON header, then the tensors' bytes, the last ending where the file ends."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a safetensors header"
        length = int.from_bytes(head, "little")
        if 8 + length > size:
            return f"its header claims {length} bytes but the file has {size} (truncated)"
        try:
            header = json.loads(f.read(length).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            return "its header is not valid JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__" and isinstance(t, dict)
            and isinstance(t.get("data_offsets"), list) and len(t["data_offsets"]) == 2]  # fmt: skip
    if 8 + length + max(ends, default=0) > size:
        return f"its tensors need {8 + length + max(ends)} bytes but the file has {size} (truncated)"
    return None


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
        self.timer: Optional[ForwardTimer] = None  # per-forward times, between start_timing() and stop_timing()
        self.last_timer: Optional[ForwardTimer] = None  # the timer stop_timing() last read (its end_offsets)
        self.phases: Optional[PhaseClock] = None  # per-phase host time (harness profile --phases); None = off
        self.forward_phase = "verify"  # the phase this engine's forwards count as ("draft" for a draft model)
        self.sliding_window, self.layer_types = attention_layout(model.config)
        # model.compile=true: static KV cache + torch.compile'd forwards (harness/compiled.py); None = eager
        self.compiled = None
        if cfg.compile:
            self.compiled = CompiledForward(model, device, self.dtype, cfg.compile_buckets,
                                            cfg.compile_cache_len or min(self.max_length, 2048))  # fmt: skip

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def load(cls, cfg: ModelConfig) -> "Engine":
        if cfg.dtype not in DTYPES:
            raise ModelLoadError(f"unknown dtype '{cfg.dtype}'; use one of {', '.join(DTYPES)} (model.dtype=...)")
        device = select_device(cfg.device)
        source = str(resolve_repo_path(cfg.path)) if cfg.path else ""
        if not source:
            raise ModelLoadError("no model path given; set model.path=<hub id or local dir> or pick --model NAME")
        if is_path_like(cfg.path) and not resolve_repo_path(cfg.path).exists():  # not a hub id: say so
            raise ModelLoadError(
                f"model path '{cfg.path}' does not exist; give an existing directory, a hub id as owner/name, "
                f"or a preset: {', '.join(MODELS.names())} (--model NAME, model.draft=NAME, method.<name>.draft=NAME)"
            )
        if is_path_like(cfg.path):
            check_model_files(resolve_repo_path(cfg.path))
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

    def sibling(self) -> "Engine":
        """Another handle on this very model (same weights, caches interchangeable) with its own
        forward count and timer: a method that drafts with the target itself (``swift``) runs
        its draft forwards through it, and lists it in ``draft_engines`` so they are timed as
        draft forwards, apart from the target's prefill and verify forwards."""
        other = copy.copy(self)
        other.forwards, other.timer = 0, None
        return other

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
        return self.compiled.new_cache() if self.compiled is not None else KVCache(self.config)

    def compile_module(self, module: torch.nn.Module) -> torch.nn.Module:
        """``module`` run in this engine's mode: compiled when model.compile=true (a
        method's own model parts, e.g. Medusa heads), else unchanged."""
        return self.compiled.compile_module(module) if self.compiled is not None else module

    @torch.inference_mode()
    def forward(
        self,
        ids: list[int] | torch.Tensor,
        cache: KVCache,
        positions: Optional[list[int] | torch.Tensor] = None,
        mask: Optional[torch.Tensor] = None,
        hidden: bool | tuple[int, ...] = False,
        last_only: bool = False,
        keep_last: int = 0,
        skip: Optional[LayerSkip] = None,
        hidden_all: bool = False,
        inject: Optional[Injection] = None,
        add_embeds: Optional[torch.Tensor] = None,
    ) -> ForwardOutput:
        """Run ``ids`` after the ``len(cache)`` cached entries and append them to the cache.

        positions: explicit position ids (default: consecutive after the cache).
        mask: boolean ``[new, cached + new]``, True = may attend; default causal.
        hidden: also return the last hidden state (Medusa heads need it); a tuple of hidden-state
            indices instead returns those concatenated, numbered as transformers' ``hidden_states``
            (i = the input of decoder layer i, N = the final normed output; EAGLE-3's features).
        last_only: compute logits for the last token only (plain decoding).
        keep_last: compute logits (and hidden) for the last ``keep_last`` tokens only (0 = all).
        skip: leave these sublayers out (see ``LayerSkip``; Llama-family models, eager or compiled).
        hidden_all: the hidden state of every new token even when fewer logits are kept (EAGLE's
            prefill: its head reads the whole prompt's features).
        inject: rows added at one decoder layer (see ``Injection``; Llama-family models, eager or compiled).
        add_embeds: ``[new, hidden]`` added to the token embeddings of ``ids`` before the first layer
            (LLM-to-SLM: another model's projected states conditioning this one); eager forwards only.
        """
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        past = len(cache)
        new = ids_t.shape[1]
        if positions is None:
            pos_t = torch.arange(past, past + new, device=self.device).view(1, -1)
        else:
            pos_t = torch.as_tensor(positions, dtype=torch.long, device=self.device).view(1, -1)
        layerwise = skip is not None or inject is not None
        if layerwise:
            self.check_layerwise(skip or LayerSkip(), inject.layer if inject is not None else None)
            if mask is None:  # the model's own causal mask is not built on this path
                mask = torch.ones((new, past + new), dtype=torch.bool).tril(past)
        if mask is not None and tuple(mask.shape) != (new, past + new):
            raise ValueError(f"mask must be [{new}, {past + new}], got {list(mask.shape)}")
        self.forwards += 1
        with self.phase(self.forward_phase):  # the step's "verify" (target) or "draft" (draft model) time
            timer = self.timer
            start = timer.begin() if timer is not None else None
            keep = 1 if last_only else keep_last
            if add_embeds is not None and (layerwise or self.compiled is not None):
                raise ValueError("added embeddings run eager forwards only; set model.compile=false")
            if layerwise:
                if not isinstance(hidden, bool) or hidden_all:
                    raise ValueError("layer skipping and injected rows return the last hidden state of the kept rows only")
                out = self._layerwise_forward(ids_t, pos_t, mask.to(self.device), past, cache, skip or LayerSkip(),
                                              inject, hidden, keep)  # fmt: skip
            else:
                attn = self._attention_mask(mask.to(self.device), pos_t[0], past) if mask is not None else None
                out = self._forward(ids_t, pos_t, attn, cache, hidden, keep, hidden_all, add_embeds)
            if timer is not None:
                timer.end(start, new)
            return out

    def _attention_mask(self, allowed: torch.Tensor, positions: torch.Tensor, past: int):
        """The float 4-D mask transformers takes for a boolean ``[new, past + new]`` one.

        With sliding-window layers a custom mask is used as given, so the window is added
        here: a query at position p sees a key at position p' only if p' > p - window (the
        rule of transformers' own sliding masks; cached entry i sits at position i). Models
        that mix full and sliding layers get one mask per layer type (a dict keyed like
        ``config.layer_types``); a model without layer types slides in every layer.
        """
        new = allowed.shape[0]
        other = sorted(set(self.layer_types or ()) - set(LAYER_TYPES))
        if other:
            raise ValueError(
                f"the model has {', '.join(other)} layers: trees and chunks (custom attention masks) support full "
                "and sliding-window attention only; run methods without them (autoregressive, speculative, prompt-lookup)"
            )

        def as_float(ok: torch.Tensor) -> torch.Tensor:
            attn = torch.zeros((1, 1, new, past + new), dtype=self.dtype, device=self.device)
            return attn.masked_fill_(~ok.view(1, 1, new, past + new), torch.finfo(self.dtype).min)

        if self.sliding_window is None:
            return as_float(allowed)
        key_pos = torch.cat((torch.arange(past, device=self.device), positions))
        near = key_pos.view(1, -1) > positions.view(-1, 1) - self.sliding_window
        sliding = as_float(allowed & near)
        if self.layer_types is None:
            return sliding
        return {"full_attention": as_float(allowed), "sliding_attention": sliding}

    def _forward(self, ids_t, pos_t, attn, cache: KVCache, hidden: bool | tuple[int, ...], keep: int,
                 hidden_all: bool = False, add_embeds: Optional[torch.Tensor] = None) -> ForwardOutput:  # fmt: skip
        """One model forward. The logits always come from the model's own head, so whatever it
        does after the output projection (Gemma 2's final logit soft-capping, a logit scale)
        is the same with and without ``hidden``; the hidden state is the decoder's output (what
        the head reads), caught by a forward hook on the decoder for this call only. Chosen
        layers' hidden states come from transformers' own ``output_hidden_states`` selection."""
        layers = None if isinstance(hidden, bool) else tuple(int(i) for i in hidden)
        # model.compile=true: bucketed graphs over a static cache, the head a plain projection (harness/compiled.py)
        if self.compiled is not None:
            if layers is not None:
                self.check_family("chosen layers' hidden states under model.compile=true")
            logits, h = self.compiled.forward(ids_t, pos_t, attn, cache, 0 if hidden_all else keep, layers)
            if hidden_all and keep:
                logits = logits[-keep:]
            return ForwardOutput(logits=logits, hidden=h if hidden else None)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids_t}
        if add_embeds is not None:  # the model's own embedding (with whatever scaling it applies), plus the addition
            embeds = self.model.get_input_embeddings()(ids_t)
            inputs = {"inputs_embeds": embeds + add_embeds.to(embeds.dtype).view(embeds.shape)}
        if layers is not None:
            out = self.model(**inputs, position_ids=pos_t, attention_mask=attn, cache=cache.inner,
                             use_cache=True, logits_to_keep=keep, output_hidden_states=list(layers))  # fmt: skip
            h = torch.cat([out.hidden_states[i][0] for i in layers], dim=-1)
            return ForwardOutput(logits=out.logits[0].float(), hidden=h[-keep:] if keep and not hidden_all else h)
        caught: list[torch.Tensor] = []
        hook = None
        if hidden:
            hook = self.model.get_decoder().register_forward_hook(
                lambda _module, _args, output: caught.append(output.last_hidden_state)
            )
        try:
            out = self.model(
                **inputs,
                position_ids=pos_t,
                attention_mask=attn,
                cache=cache.inner,
                use_cache=True,
                logits_to_keep=keep,
            )
        finally:
            if hook is not None:
                hook.remove()
        logits = out.logits[0].float()
        if not hidden:
            return ForwardOutput(logits=logits)
        h = caught[-1][0]
        return ForwardOutput(logits=logits, hidden=h[-keep:] if keep and not hidden_all else h)

    def check_family(self, what: str) -> None:
        """ValueError (one line) unless the model is one whose decoder this engine can run module by
        module (``SKIPPABLE``): ``what`` needs it."""
        kind = getattr(self.config.get_text_config(), "model_type", "?")
        if kind not in SKIPPABLE:
            raise ValueError(f"{what} supports {', '.join(SKIPPABLE)} models, not '{kind}'; "
                             "run another method on this model (or set model.compile=false)")  # fmt: skip

    def check_layerwise(self, skip: LayerSkip, inject_layer: Optional[int] = None) -> None:
        """ValueError (one line: what and what to do) unless this engine can run ``skip`` and rows
        injected at decoder layer ``inject_layer`` (None: none)."""
        self.check_family("layer skipping" if inject_layer is None else "injected hidden states")
        layers = self.config.get_text_config().num_hidden_layers
        if any(not 0 <= i < layers for i in skip.attn | skip.mlp):
            raise ValueError(f"skipped layers {sorted(skip.attn | skip.mlp)} outside the model's 0..{layers - 1}")
        if inject_layer is not None and not 1 <= inject_layer < layers:
            raise ValueError(f"rows can join at decoder layer 1..{layers - 1} of this model, not {inject_layer}")

    def injected_forward(self, ids: list[int] | torch.Tensor, inject: Injection) -> ForwardOutput:
        """The tokens ``ids`` (causal, no cache) with ``inject``'s rows, autograd on: training
        what makes the rows (the model's own weights stay as they are). Logits of every token."""
        ids_t = torch.as_tensor(ids, dtype=torch.long, device=self.device).view(1, -1)
        new = ids_t.shape[1]
        self.check_layerwise(LayerSkip(), inject.layer)
        causal = torch.ones((new, new), dtype=torch.bool, device=self.device).tril()
        pos_t = torch.arange(new, device=self.device).view(1, -1)
        return self._layerwise_forward(ids_t, pos_t, causal, 0, None, LayerSkip(), inject, False, 0)

    def _layerwise_forward(self, ids_t, pos_t, allowed: torch.Tensor, past: int, cache: Optional[KVCache],
                           skip: LayerSkip, inject: Optional[Injection], hidden: bool, keep: int) -> ForwardOutput:  # fmt: skip
        """The model's forward run by calling its own modules: embedding, then per decoder layer
        ``h += self_attn(input_layernorm(h))`` and ``h += mlp(post_attention_layernorm(h))`` unless
        ``skip`` leaves them out, final norm, head. Entering layer ``inject.layer`` the injected rows
        are appended to ``h`` (their positions and mask rows with them). ``allowed`` is the tokens'
        boolean mask ``[new, past + new]``; ``cache`` None runs without one. Compiled
        (model.compile=true, with a cache): the rows are padded to a bucket and each kept sublayer
        is its own compiled graph (``CompiledForward.sublayer``), shared by every skip set; with
        nothing skipped, the layers before the injection and those from it are one graph each
        (``CompiledForward.layers``)."""
        decoder = self.model.get_decoder()
        compiled = self.compiled if cache is not None else None
        new = rows = ids_t.shape[1]  # rows: the real rows of h (the tokens, then any injected rows)
        h, pos_p, attn, rotary = self._layer_inputs(decoder.embed_tokens(ids_t), pos_t, allowed, past, cache, compiled)
        layers = self.config.get_text_config().num_hidden_layers
        whole = compiled is not None and not skip  # compiled, nothing skipped: layer ranges as single graphs
        cuts = [0, *([inject.layer] if inject is not None else []), layers] if whole else range(layers + 1)
        for i, end in zip(cuts, cuts[1:]):  # layers i..end-1: one range compiled whole, else one layer
            layer = decoder.layers[i]
            if inject is not None and i == inject.layer:
                made = inject.make(h[0, :new]).to(h.dtype)
                m = made.shape[0]
                if tuple(inject.mask.shape) != (m, past + new + m) or inject.positions.numel() != m:
                    raise ValueError(f"{m} injected rows need positions [{m}] and a mask [{m}, {past + new + m}], got "
                                     f"{list(inject.positions.shape)} and {list(inject.mask.shape)}")  # fmt: skip
                rows = new + m
                hidden_from_rows = torch.zeros((new, m), dtype=torch.bool, device=allowed.device)
                allowed = torch.cat((torch.cat((allowed, hidden_from_rows), dim=1), inject.mask.to(allowed.device)))
                pos_t = torch.cat((pos_t, inject.positions.to(pos_t.device).view(1, -1)), dim=1)
                if compiled is not None:
                    cache.length = past + new  # the tokens' entries so far, kept if the cache must grow
                h, pos_p, attn, rotary = self._layer_inputs(torch.cat((h[:, :new], made.unsqueeze(0)), dim=1), pos_t,
                                                            allowed, past, cache, compiled)  # fmt: skip
            if whole:
                h = compiled.layers(i, end, h, attn, pos_p, rotary, cache, past)
                continue
            for kind in ("attn", "mlp"):
                if i in (skip.attn if kind == "attn" else skip.mlp):
                    continue
                if compiled is not None:
                    h = compiled.sublayer(kind, i, h, attn, pos_p, rotary, cache, past)
                elif kind == "attn":
                    layer_mask = attn[self.layer_types[i]] if isinstance(attn, dict) else attn
                    h = attention_sublayer(layer, h, layer_mask, pos_p, rotary, cache.inner if cache is not None else None)
                else:
                    h = mlp_sublayer(layer, h)
        if compiled is not None:
            cache.length = past + new  # the tokens' entries; injected rows' lie past it, hidden by the mask
        h = decoder.norm(h[:, :rows])[0]
        head = self.model.get_output_embeddings()
        injected = head(h[new:]).float() if inject is not None else None
        h = h[:new]
        if keep:
            h = h[-keep:]
        return ForwardOutput(logits=head(h).float(), hidden=h if hidden else None, injected=injected)

    def _layer_inputs(self, h: torch.Tensor, pos_t: torch.Tensor, allowed: torch.Tensor, past: int,
                      cache: Optional[KVCache], compiled: Optional[CompiledForward]) -> tuple:  # fmt: skip
        """(rows, positions, attention mask, rotary tables) a layerwise forward runs for the real
        rows ``h`` ``[1, n, hidden]``. Eager: as they are. Compiled: padded to the bucket (zero
        rows at position 0 after the real ones, causal), the mask spanning the static cache."""
        if compiled is None:
            attn = self._attention_mask(allowed, pos_t[0], past)
        else:
            n = h.shape[1]
            size = compiled.padded(n)
            compiled.fit(cache, past + size)  # before the mask: growing changes the static length
            h = torch.nn.functional.pad(h, (0, 0, 0, size - n))
            pos_t = torch.nn.functional.pad(pos_t[0], (0, size - n)).view(1, size)
            attn = compiled.mask(past, allowed, size)
        return h, pos_t, attn, self.model.get_decoder().rotary_emb(h, pos_t)

    # ---- timing (the runner's) ---------------------------------------------------------------
    def phase(self, name: str):  # noqa: ANN201 (a context manager)
        """``with engine.phase("tree"):`` counts the block as that phase of the step when a
        ``PhaseClock`` is attached (``harness profile --phases``); otherwise costs nothing."""
        return self.phases(name) if self.phases is not None else NO_PHASE

    def start_timing(self) -> None:
        """Record the duration of every forward from now on (see ForwardTimer)."""
        self.timer = ForwardTimer(self.device)

    def stop_timing(self) -> list[tuple[int, float]]:
        """Stop recording; (new tokens, seconds) per forward since start_timing() (synchronises on CUDA)."""
        timer, self.timer = self.timer, None
        self.last_timer = timer
        return timer.read() if timer is not None else []

    @contextmanager
    def timing_calls(self, module: Optional[torch.nn.Module] = None) -> Iterator[None]:
        """Time every call of ``module`` (default: the model) like ``forward`` does, for code that
        runs the model itself (transformers' ``generate`` in the hf-* wrappers): each call is a
        forward in the timer's log and, under a phase clock, this engine's ``forward_phase``.
        A no-op when neither is on. Forward hooks, removed on exit."""
        timer, phases = self.timer, self.phases
        if timer is None and phases is None:
            yield
            return
        module = module if module is not None else self.model
        starts: list[Any] = []  # the timer's start of each call in progress
        open_phases: list[Any] = []  # the phase of each call in progress, entered by its pre-hook

        def before(_module, args, kwargs) -> None:
            if phases is not None:
                open_phases.append(phases(self.forward_phase))
                open_phases[-1].__enter__()
            if timer is not None:
                starts.append(timer.begin())

        def after(_module, args, kwargs, output) -> None:
            if timer is not None:
                ids = kwargs.get("input_ids", args[0] if args else None)
                if ids is None:
                    ids = kwargs.get("inputs_embeds")
                timer.end(starts.pop(), int(ids.shape[1]) if ids is not None else 0)
            if open_phases:
                open_phases.pop().__exit__(None, None, None)

        handles = [module.register_forward_pre_hook(before, with_kwargs=True),
                   module.register_forward_hook(after, with_kwargs=True)]  # fmt: skip
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()
            while open_phases:  # a call that raised: its phase ends here
                open_phases.pop().__exit__(None, None, None)

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


def quiet_transformers() -> None:
    """transformers' warnings and progress bars off (the command line's runs print their own)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


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
