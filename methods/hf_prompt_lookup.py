"""transformers' prompt lookup decoding (``generate(prompt_lookup_num_tokens=...)``), greedy.

The comparison point for ``prompt-lookup``. transformers proposes the continuation of
the *first* (leftmost) match of the last n tokens, n from ``max_matching_ngram_size``
down to 1; ``prompt-lookup`` uses the most recent one. Target forwards and the tokens each committed
come from the stopping criterion that commits them (``CommitEachStep``, called once per
target forward; its first step is the prompt's forward, which already verifies the prompt's
own match).
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.base import Generation, Method
from methods.hf_generate import hf_generate, require_greedy


@dataclass
class HFPromptLookupConfig(MethodConfig):
    name: str = "hf-prompt-lookup"
    prompt_lookup_num_tokens: int = 10  # tokens proposed per match (at most)
    max_matching_ngram_size: int = 3  # longest n-gram matched (transformers' default 2; 3 = prompt-lookup's)


class HFPromptLookup(Method):
    """transformers' prompt lookup decoding (greedy)."""

    config_class = HFPromptLookupConfig
    greedy_only = True
    main_settings = ("prompt_lookup_num_tokens", "max_matching_ngram_size")

    def __init__(self, cfg: HFPromptLookupConfig, engine: Engine, sampling: SamplingConfig):
        super().__init__(cfg, engine, sampling)
        require_greedy(cfg.name, sampling)

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        options = dict(
            prompt_lookup_num_tokens=self.cfg.prompt_lookup_num_tokens,
            max_matching_ngram_size=self.cfg.max_matching_ngram_size,
        )
        out = hf_generate(self.engine, prompt_ids, stop, options)
        return Generation(tokens=out.tokens, target_forwards=len(out.accepted_per_step),
                          accepted_per_step=out.accepted_per_step, stop_reason=out.stop_reason)  # fmt: skip
