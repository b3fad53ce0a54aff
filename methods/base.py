"""The method interface and the small pieces every method shares.

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


@dataclass
class StopRule:
    max_new_tokens: int  # hard limit on new tokens
    eos_ids: frozenset[int] = frozenset()  # generation stops after emitting one of these


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


class Method:
    """Base class. Subclasses set ``config_class`` and implement ``generate``."""

    config_class: type[MethodConfig] = MethodConfig
    # "greedy-lossless": output must equal greedy autoregressive decoding token for token.
    # "reference": an independent implementation, also compared token for token.
    family: str = "greedy-lossless"

    def __init__(self, cfg: MethodConfig, engine: Engine, sampling: SamplingConfig):
        self.cfg = cfg
        self.engine = engine
        self.sampling = sampling

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        raise NotImplementedError

    def draft_engines(self) -> list[Engine]:
        """Engines other than the target that this method runs (a draft model), for timing."""
        return []


class Committer:
    """Appends tokens under a ``StopRule``; ``done`` once EOS or the limit is reached."""

    def __init__(self, stop: StopRule):
        self.stop = stop
        self.tokens: list[int] = []
        self.done = stop.max_new_tokens <= 0

    def add(self, new: list[int]) -> int:
        """Commit ``new`` in order until a stop fires; returns how many were committed."""
        count = 0
        for t in new:
            if self.done:
                break
            self.tokens.append(t)
            count += 1
            if t in self.stop.eos_ids or len(self.tokens) >= self.stop.max_new_tokens:
                self.done = True
        return count


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
