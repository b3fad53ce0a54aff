"""transformers' assisted generation (``generate(assistant_model=...)``), greedy.

The comparison point for ``speculative``: the same draft model (``draft`` resolves
exactly as there), with the draft length and schedule set explicitly, and the
confidence threshold at 0 by default so every step drafts ``num_assistant_tokens``
tokens as ``speculative`` does (transformers' default threshold 0.4 stops most drafts
early). Target forwards and the tokens each committed come from the stopping criterion that
commits them (``CommitEachStep``, called once per target forward; its first step is the
prompt's forward, which also verifies the first draft), draft forwards from a forward
pre-hook on the draft model. Per-forward times of
both models come from the engines' timers through forward hooks (``Engine.timing_calls``),
as for every other method.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Optional

from transformers import GenerationConfig

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.base import DRAFT_MODEL, Generation, Method
from methods.hf_generate import counting_calls, hf_generate, require_greedy
from methods.speculative import SpeculativeConfig, load_draft


@dataclass
class HFAssistedConfig(MethodConfig):
    name: str = "hf-assisted"
    draft: Optional[str] = None  # draft model: registry name or hub id / local path; None = the target's `draft`
    num_assistant_tokens: int = SpeculativeConfig.gamma  # draft tokens per step (start value under "heuristic"): speculative's gamma
    num_assistant_tokens_schedule: str = "constant"  # constant | heuristic | heuristic_transient
    assistant_confidence_threshold: float = 0.0  # 0 = always draft num_assistant_tokens tokens


class HFAssisted(Method):
    """transformers' assisted generation (greedy): a draft model proposes, transformers verifies."""

    config_class = HFAssistedConfig
    needs = (DRAFT_MODEL,)
    greedy_only = True
    main_settings = ("num_assistant_tokens",)

    def __init__(
        self, cfg: HFAssistedConfig, engine: Engine, sampling: SamplingConfig, draft: Optional[Engine] = None
    ):
        super().__init__(cfg, engine, sampling)
        require_greedy(cfg.name, sampling)
        self.draft = load_draft(cfg, engine, draft)

    def draft_engines(self) -> list[Engine]:
        return [] if self.draft is self.engine else [self.draft]

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        cfg = self.cfg
        # transformers reads these from the assistant's own generation config and writes the
        # heuristic's gamma back into it after each call: start every call from a fresh one
        self.draft.model.generation_config = GenerationConfig(
            num_assistant_tokens=cfg.num_assistant_tokens,
            num_assistant_tokens_schedule=cfg.num_assistant_tokens_schedule,
            assistant_confidence_threshold=cfg.assistant_confidence_threshold,
        )
        draft_timing = self.draft.timing_calls() if self.draft_engines() else nullcontext()  # a separate draft
        with counting_calls(self.draft.model) as counts, draft_timing:
            out = hf_generate(self.engine, prompt_ids, stop, assistant_model=self.draft.model)
        target_forwards = len(out.accepted_per_step)  # one stopping-criterion call per target forward
        draft_forwards = counts[0] - (target_forwards if self.draft is self.engine else 0)  # the target as its draft
        return Generation(tokens=out.tokens, target_forwards=target_forwards, draft_forwards=draft_forwards,
                          accepted_per_step=out.accepted_per_step, stop_reason=out.stop_reason)  # fmt: skip
