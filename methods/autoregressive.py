"""Autoregressive decoding: the baseline every other method is measured against.

Greedy by default (the losslessness reference); temperature / top-k / top-p sampling
with a seed when ``sampling.do_sample`` is set. It runs on the same engine,
model object and KV cache as every other method, so speedups compare algorithms only.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import MethodConfig
from harness.stops import Committer, StopRule
from methods.base import Generation, Method, make_generator, next_token


@dataclass
class AutoregressiveConfig(MethodConfig):
    name: str = "autoregressive"


class Autoregressive(Method):
    """Plain autoregressive decoding, one target forward per token: the baseline every method is measured against."""

    config_class = AutoregressiveConfig

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        engine, out = self.engine, Committer(stop)
        gen = make_generator(seed, engine.device) if self.sampling.do_sample else None
        cache = engine.new_cache()
        forwards = 0
        # 1. prefill the prompt; its last row gives the first token
        logits = engine.forward(prompt_ids, cache, last_only=True).logits[-1]
        forwards += 1
        # 2. one token per forward until EOS or max_new_tokens
        while True:
            token = next_token(logits, self.sampling, gen)
            out.add([token])
            if out.done:
                break
            logits = engine.forward([token], cache, last_only=True).logits[-1]
            forwards += 1
        return Generation(
            tokens=out.tokens, target_forwards=forwards, accepted_per_step=[1] * forwards, stop_reason=out.reason
        )
