"""transformers' own ``generate`` (greedy): an independent reference implementation.

It uses transformers' cache and loop rather than the engine's (harness/engine.py), so agreement
with ``autoregressive`` shows the baseline is right, and its speed shows the baseline
is not a strawman. ``hf_generate`` is shared with the other wrappers of ``generate``
(hf-assisted, hf-prompt-lookup).

Stop strings: ``generate`` gets a ``StoppingCriteria`` that runs the same ``StopStrings``
rule on the generated tokens only, and its output then goes through the shared
``Committer``, so a wrapper ends at exactly the token our methods end at. Both steps are
needed: transformers checks stopping criteria only after a whole accepted block (assisted
and prompt-lookup generation can run past a stop inside a block), and its own
``stop_strings`` (``StopStringCriteria``) also matches a stop string that spans the seam
between prompt and output, which the shared rule does not count.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import Committer, StopRule, StopStrings
from methods.base import Generation, Method


@dataclass
class HFGenerateConfig(MethodConfig):
    name: str = "hf-generate"


class GeneratedStopStrings(StoppingCriteria):
    """``StopStrings`` as a transformers stopping criterion, on the tokens after the prompt.

    transformers calls it after every step with the whole sequence; the tokens added since
    the last call (one, or an accepted block) are checked one by one, so it says "stop" once
    any of them has completed a stop string. Where in the block is left to the ``Committer``.
    """

    def __init__(self, strings: StopStrings, prompt_length: int):
        self.strings, self.prompt_length = strings, prompt_length
        self.checked = 0  # generated tokens checked so far
        self.fired = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        new = input_ids[0, self.prompt_length :].tolist()  # batch size 1
        while not self.fired and self.checked < len(new):
            self.checked += 1
            self.fired = self.strings.completed_by(new[: self.checked]) is not None
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


def hf_generate(
    engine: Engine, prompt_ids: list[int], stop: StopRule, options: dict | None = None, **generate_kwargs
) -> Committer:
    """Greedy ``model.generate`` under ``stop``; returns its new tokens committed under
    ``stop`` (``.tokens``, and ``.reason`` for the stop that ended them).

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
    if stop.strings:
        criterion = GeneratedStopStrings(stop.strings, len(prompt_ids))
        generate_kwargs["stopping_criteria"] = StoppingCriteriaList([criterion])
    with torch.inference_mode(), engine.timing_calls():  # per-forward times, as the engine's own forwards
        out = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config, **generate_kwargs
        )
    committed = Committer(stop)
    committed.add(out[0, len(prompt_ids) :].tolist())
    return committed


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
    """transformers' own `generate` (greedy): an independent reference implementation."""

    config_class = HFGenerateConfig
    greedy_only = True

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        require_greedy(self.cfg.name, self.sampling)
        out = hf_generate(self.engine, prompt_ids, stop)
        n = len(out.tokens)
        return Generation(tokens=out.tokens, target_forwards=n, accepted_per_step=[1] * n, stop_reason=out.reason)


def _pad_id(engine, stop: StopRule) -> int:
    tok = engine.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return tok.pad_token_id
    return min(stop.eos_ids) if stop.eos_ids else 0
