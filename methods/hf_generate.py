"""transformers' own ``generate`` (greedy): an independent reference implementation.

It uses transformers' cache and loop rather than the execution layer's, so agreement
with ``autoregressive`` shows the baseline is right, and its speed shows the baseline
is not a strawman.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import GenerationConfig

from harness.config import MethodConfig
from methods.base import Generation, Method, StopRule


@dataclass
class HFGenerateConfig(MethodConfig):
    name: str = "hf-generate"


class HFGenerate(Method):
    config_class = HFGenerateConfig
    family = "reference"

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        if self.sampling.do_sample:
            raise ValueError("hf-generate is a greedy reference; run it with sampling.do_sample=false")
        engine = self.engine
        ids = torch.tensor([prompt_ids], device=engine.device)
        with torch.inference_mode():
            # a fresh GenerationConfig: a checkpoint's own defaults (repetition penalty,
            # min_length, sampling...) must not change the reference
            config = GenerationConfig(
                do_sample=False,
                max_new_tokens=stop.max_new_tokens,
                eos_token_id=sorted(stop.eos_ids) or None,
                pad_token_id=_pad_id(engine, stop),
            )
            out = engine.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        tokens = out[0, len(prompt_ids) :].tolist()
        return Generation(tokens=tokens, target_forwards=len(tokens), accepted_per_step=[1] * len(tokens))


def _pad_id(engine, stop: StopRule) -> int:
    tok = engine.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return tok.pad_token_id
    return min(stop.eos_ids) if stop.eos_ids else 0
