"""Prompt lookup decoding (Saxena 2023): speculative decoding without a draft model.

The proposal is what followed the most recent earlier occurrence of the last n tokens
(n from ``max_ngram`` down to ``min_ngram``) in the prompt and the output so far; with
no match the step is a plain one-token step. The target verifies the proposal exactly
like a draft model's (greedy: argmax match; sampling: the one-hot-draft rule, which
keeps the target's distribution).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import MethodConfig
from harness.stops import StopRule
from methods.acceptance import ChainVerifier, NgramIndex
from methods.base import Generation, LoopEnd, Method


@dataclass
class PromptLookupConfig(MethodConfig):
    name: str = "prompt-lookup"
    num_tokens: int = 10  # tokens proposed per match (at most)
    max_ngram: int = 3  # longest n-gram matched
    min_ngram: int = 1  # shortest n-gram matched


class PromptLookup(Method):
    """Prompt lookup: drafts copied from where the context's last n-gram occurred before."""

    config_class = PromptLookupConfig
    main_settings = ("num_tokens", "max_ngram")

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        cfg = self.cfg
        chain = ChainVerifier(self.engine, self.sampling, stop, prompt_ids, seed)
        index = NgramIndex(cfg.min_ngram, cfg.max_ngram)
        # 1. prefill the target; its last row gives the first token
        chain.prefill()
        while not chain.done:
            # 2. propose what followed the latest earlier match of the last n tokens ([] if none)
            index.update(chain.seq)
            draft = index.lookup(chain.seq, min(cfg.num_tokens, chain.room()))
            # 3. one target forward verifies [last, *draft]; commit, roll the cache back
            chain.verify(draft)
        return chain.end()
