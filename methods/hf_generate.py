"""transformers' own ``generate`` (greedy): an independent reference implementation.

It uses transformers' cache and loop rather than the execution layer's, so agreement
with ``autoregressive`` shows the baseline is right, and its speed shows the baseline
is not a strawman. ``hf_generate`` is shared with the other wrappers of ``generate``
(hf-assisted, hf-prompt-lookup).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import GenerationConfig

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from methods.base import Generation, Method, StopRule


@dataclass
class HFGenerateConfig(MethodConfig):
    name: str = "hf-generate"


def hf_generate(
    engine: Engine, prompt_ids: list[int], stop: StopRule, options: dict | None = None, **generate_kwargs
) -> list[int]:
    """Greedy ``model.generate`` under ``stop``; returns the new token ids.

    options: extra GenerationConfig fields (prompt_lookup_num_tokens=...);
    generate_kwargs: extra ``generate`` arguments (assistant_model=...).
    """
    ids = torch.tensor([prompt_ids], device=engine.device)
    # a fresh GenerationConfig: a checkpoint's own defaults (repetition penalty,
    # min_length, sampling...) must not change the reference
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=stop.max_new_tokens,
        eos_token_id=sorted(stop.eos_ids) or None,
        pad_token_id=_pad_id(engine, stop),
        **(options or {}),
    )
    with torch.inference_mode():
        out = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **generate_kwargs
        )
    return out[0, len(prompt_ids) :].tolist()


@contextmanager
def counting_calls(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of each module (a forward pre-hook, removed on exit): how the
    wrappers learn transformers' target and draft forward counts without touching its code."""
    counts = [0] * len(modules)

    def counter(i: int):
        def hook(module, args) -> None:
            counts[i] += 1

        return hook

    handles = [m.register_forward_pre_hook(counter(i)) for i, m in enumerate(modules)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def require_greedy(name: str, sampling: SamplingConfig) -> None:
    if sampling.do_sample:
        raise ValueError(f"{name} is a greedy reference; run it with sampling.do_sample=false")


class HFGenerate(Method):
    config_class = HFGenerateConfig
    family = "reference"

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        require_greedy(self.cfg.name, self.sampling)
        tokens = hf_generate(self.engine, prompt_ids, stop)
        return Generation(tokens=tokens, target_forwards=len(tokens), accepted_per_step=[1] * len(tokens))


def _pad_id(engine, stop: StopRule) -> int:
    tok = engine.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return tok.pad_token_id
    return min(stop.eos_ids) if stop.eos_ids else 0
