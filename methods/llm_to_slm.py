"""LLM-to-SLM (Bergner et al. 2024, "Think Big, Generate Quick"): the large model (the target)
reads the prompt once; a projector maps its final hidden states into the small model (the
draft), added to the small model's prompt embeddings; the small model then writes the whole
answer alone.

LOSSY by design: the output is the small model's, not the target's, so every Generation is
marked lossy and never checked token for token; the report puts its quality beside its speed
(pass@1, token agreement with the target's greedy output, share of outputs equal to it, where
the first divergence falls).

One generation:
  1. the target's prefill over the prompt (its only forward): the final hidden state of every
     prompt position;
  2. the projector maps them to the small model's embedding size;
  3. the small model's prefill over the prompt, its embeddings plus the projection; then plain
     decoding with the small model (greedy, or sampling from its own distribution), every token
     through the commit path's stop rules.

Where this differs from the paper: the paper also fine-tunes the small model (or adapts it);
here the small model is the shipped zoo draft, frozen, and only the projector is trained (so
what ships is the projector alone). The paper's large model is an encoder (T5) or a decoder
LLM; here it is the zoo target, a decoder, read at its last layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.drafters.projector import Projector, load_projector
from harness.engine import Engine
from harness.paths import resolve_repo_path
from harness.stops import Committer, StopRule
from methods.base import DRAFT_MODEL, PROJECTOR, Generation, make_generator, next_token
from methods.speculative import DraftModelMethod


@dataclass
class LlmToSlmConfig(MethodConfig):
    name: str = "llm-to-slm"
    draft: Optional[str] = None  # the small model: registry name or hub id / local path; None = the target's `draft`
    projector: str = "zoo/target-llm-to-slm"  # directory of the trained projector (`harness train llm-to-slm`)


class LlmToSlm(DraftModelMethod):
    """LLM-to-SLM: the target reads the prompt once and a projector conditions the small draft model, which writes the answer alone."""

    config_class = LlmToSlmConfig
    needs = (DRAFT_MODEL, PROJECTOR)
    lossy_when = "always"  # shown by `harness list`
    cfg: LlmToSlmConfig

    def __init__(self, cfg: LlmToSlmConfig, engine: Engine, sampling: SamplingConfig, draft: Optional[Engine] = None,
                 projector: Optional[Projector] = None):  # fmt: skip
        super().__init__(cfg, engine, sampling, draft)
        large = engine.model.get_output_embeddings().weight.shape[1]
        small = self.draft.model.get_input_embeddings().weight.shape[1]
        if projector is None:
            projector = load_projector(resolve_repo_path(cfg.projector), large, small)
        self.projector = projector.to(device=engine.device, dtype=engine.dtype).eval()

    @torch.inference_mode()
    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        self.check_context(len(prompt_ids), stop)
        out = Committer(stop)
        gen = make_generator(seed, self.draft.device) if self.sampling.do_sample else None
        # 1. the target reads the prompt once: the final hidden state of every position
        hidden = self.engine.forward(prompt_ids, self.engine.new_cache(), hidden=True, last_only=True, hidden_all=True).hidden
        # 2. projected into the small model's embedding space
        conditioning = self.projector(hidden).to(self.draft.device)
        # 3. the small model's prefill over the conditioned prompt, then plain decoding with it alone
        cache = self.draft.new_cache()
        logits = self.draft.forward(prompt_ids, cache, last_only=True, add_embeds=conditioning).logits[-1]
        forwards = 1
        out.add([next_token(logits, self.sampling, gen)])
        while not out.done:
            logits = self.draft.forward([out.tokens[-1]], cache, last_only=True).logits[-1]
            forwards += 1
            out.add([next_token(logits, self.sampling, gen)])
        return Generation(tokens=out.tokens, target_forwards=1, draft_forwards=forwards,
                          accepted_per_step=[len(out.tokens)], lossy=True, stop_reason=out.reason)  # fmt: skip
