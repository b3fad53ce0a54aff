"""The method interface and the small pieces every method shares (the stop rules are in
harness/stops.py).

A method is constructed once per run with its config and the target ``Engine`` and
then asked to ``generate`` one prompt at a time. It never times itself (the runner
does) and returns a ``Generation``: the new token ids with the stop rules applied, and
the counts that describe how it got there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule


@dataclass
class Generation:
    tokens: list[int]  # new token ids, stop rules applied (EOS kept, nothing past it)
    target_forwards: int = 0  # forwards of the target model, prefill included
    draft_forwards: int = 0  # forwards of a draft model (0 if none)
    accepted_per_step: list[int] = field(default_factory=list)  # tokens committed per target forward
    proposed_per_position: list[int] = field(default_factory=list)  # draft tokens proposed at position i
    accepted_per_position: list[int] = field(default_factory=list)  # ...and accepted at position i
    lossy: bool = False  # True for a mode that does not preserve the target distribution
    extra: dict = field(default_factory=dict)  # method-specific figures (tree size, gamma...)
    stop_reason: Optional[str] = None  # what ended it: eos | stop:<string> | max_new_tokens (Committer.reason)


class Method:
    """Base class. Subclasses set ``config_class`` and implement ``generate``.

    A method whose tests read the state its steps end in (the target cache after compaction,
    a verifier, the draft cache) runs its steps in ``loop``, which returns that state beside
    the result; ``generate`` returns the ``Generation`` alone."""

    config_class: type[MethodConfig] = MethodConfig
    # `harness list` describes a method from these and its class docstring's first sentence:
    # what a run needs besides the target model ("nothing", "a draft model", "trained Medusa heads", ...)
    needs: str = "nothing"
    # the settings under which its output may differ from the target model's ("" = none: lossless)
    lossy_when: str = ""
    # config fields shown on its one line (`harness list methods` shows every field)
    main_settings: tuple[str, ...] = ()
    # True: ``generate`` also takes ``reference_ids``, the sample's reference text tokenised
    # (None when the sample has none); the runner passes it to these methods only
    uses_reference: bool = False
    # True: every sample must have a reference (the runner refuses the run before it starts)
    requires_reference: bool = False

    def __init__(self, cfg: MethodConfig, engine: Engine, sampling: SamplingConfig):
        self.cfg = cfg
        self.engine = engine
        self.sampling = sampling

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        """(``uses_reference`` methods: also ``reference_ids: Optional[list[int]] = None``.)"""
        raise NotImplementedError

    def draft_engines(self) -> list[Engine]:
        """Engines other than the target that this method runs (a draft model), for timing."""
        return []

    def reset(self) -> None:
        """Forget what earlier ``generate`` calls taught this object (state kept across the
        samples of a run, e.g. suffix decoding's global trie). The runner calls it after the
        untimed warm-up, so no timed sample drafts from the warm-up's output. Default: nothing kept."""

    def headroom(self) -> int:
        """Positions past the last one of a full-length output that a step may use (a tree's
        deeper nodes, a chunk's masks); 0 for chain methods, which propose only what fits."""
        return 0

    def check_context(self, prompt_tokens: int, stop: StopRule) -> None:
        """Refuse a generation whose positions could pass the model's context (the runner checks
        every sample before the run; this guards direct calls)."""
        need = prompt_tokens + stop.max_new_tokens + self.headroom()
        if need > self.engine.max_length:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens {stop.max_new_tokens} + {self.headroom()} "
                f"positions for {self.cfg.name}'s steps exceed the model's context of {self.engine.max_length}; "
                "lower max_new_tokens"
            )


def filter_logits(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[..., vocab]`` logits (a copy)."""
    out = logits / max(s.temperature, 1e-6)
    if s.top_k and s.top_k < out.shape[-1]:
        kth = torch.topk(out, s.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def probabilities(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """The sampling distribution for ``logits`` under ``s`` (float32)."""
    return torch.softmax(filter_logits(logits.float(), s), dim=-1)


def next_token(logits: torch.Tensor, s: SamplingConfig, gen: Optional[torch.Generator]) -> int:
    """Argmax when greedy, else a sample from the filtered distribution."""
    if not s.do_sample:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, s), 1, generator=gen))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
