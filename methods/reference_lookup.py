"""Reference lookup (LLMA, Yang et al. 2023): drafts copied from a reference text.

A sample may come with a reference (a document the output is expected to quote: a ``jsonl``
line's ``"reference"`` field); Spec-Bench's ``rag`` and ``summarization`` questions carry
their documents in the prompt instead. Each step the last n tokens of the context (prompt +
output, n from ``match_tokens`` down to ``min_match_tokens``) are looked up in that source,
and up to ``copy_tokens`` tokens that follow the match are proposed; the occurrence that
continues where the last copy stopped is preferred (``ReferenceIndex``). With no match the
step is a plain one-token step. Unlike prompt lookup the source is fixed: the output
itself is never copied from. The target verifies the proposal like any chain draft (greedy:
argmax match; sampling: the one-hot-draft rule, which keeps the target's distribution).

``source`` picks the text: ``auto`` the sample's reference when it has one, else the prompt;
``prompt`` always the prompt; ``sample`` the sample's reference, required (the runner
refuses samples without one before the run).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.acceptance import ChainVerifier, ReferenceIndex
from methods.base import Generation, LoopEnd, Method

SOURCES = ("auto", "prompt", "sample")


@dataclass
class ReferenceLookupConfig(MethodConfig):
    name: str = "reference-lookup"
    copy_tokens: int = 10  # tokens copied from the source per match (at most)
    match_tokens: int = 3  # longest n-gram of the context looked up in the source
    min_match_tokens: int = 1  # shortest n-gram looked up
    source: str = "auto"  # auto (the sample's reference, else the prompt) | prompt | sample (reference required)


class ReferenceLookup(Method):
    """Reference lookup (LLMA): drafts copied from a reference text, the sample's when it has one, else the prompt."""

    config_class = ReferenceLookupConfig
    main_settings = ("copy_tokens", "source")
    cfg: ReferenceLookupConfig
    uses_reference = True

    def __init__(self, cfg: ReferenceLookupConfig, engine: Engine, sampling: SamplingConfig):
        super().__init__(cfg, engine, sampling)
        if cfg.source not in SOURCES:
            raise ValueError(f"method.{cfg.name}.source={cfg.source!r}: use one of {', '.join(SOURCES)}")
        if cfg.copy_tokens < 1:
            raise ValueError(f"method.{cfg.name}.copy_tokens={cfg.copy_tokens}: copy at least 1 token")
        if not 1 <= cfg.min_match_tokens <= cfg.match_tokens:
            raise ValueError(f"method.{cfg.name}: need 1 <= min_match_tokens <= match_tokens, "
                             f"got {cfg.min_match_tokens} and {cfg.match_tokens}")  # fmt: skip
        self.requires_reference = cfg.source == "sample"

    def source_ids(self, prompt_ids: list[int], reference_ids: Optional[list[int]]) -> list[int]:
        """The tokens drafts are copied from, by ``source``."""
        if self.cfg.source == "prompt" or (self.cfg.source == "auto" and reference_ids is None):
            return prompt_ids
        if reference_ids is None:
            raise ValueError(f"method.{self.cfg.name}.source=sample but the sample has no reference; "
                             "give one (a jsonl \"reference\" field) or use source=auto")  # fmt: skip
        return reference_ids

    def generate(
        self, prompt_ids: list[int], stop: StopRule, seed: int = 0, reference_ids: Optional[list[int]] = None
    ) -> Generation:
        source = self.source_ids(prompt_ids, reference_ids)
        from_reference = self.cfg.source != "prompt" and reference_ids is not None  # else the prompt
        return self.loop(prompt_ids, stop, source, seed, {"source_tokens": len(source), "from_reference": from_reference}).generation

    def loop(self, prompt_ids: list[int], stop: StopRule, source: list[int], seed: int = 0,
             extra: Optional[dict] = None) -> LoopEnd:
        cfg = self.cfg
        index = ReferenceIndex(source, cfg.min_match_tokens, cfg.match_tokens)
        chain = ChainVerifier(self.engine, self.sampling, stop, prompt_ids, seed)
        cursor = 0  # source position right after the last accepted copied token
        # 1. prefill the target; its last row gives the first token
        chain.prefill()
        while not chain.done:
            # 2. copy what follows the last n context tokens in the source (nothing if they are not there)
            copy = index.lookup(chain.seq, min(cfg.copy_tokens, chain.room()), cursor)
            # 3. one target forward verifies [last, *copy]; commit, roll the cache back
            accepted = chain.verify(copy.tokens if copy else [])
            if copy is not None:
                cursor = copy.start + accepted
        return chain.end(extra=extra or {})
