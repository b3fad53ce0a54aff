"""Classic speculative decoding (Leviathan et al. 2023, Chen et al. 2023).

A small draft model proposes gamma tokens autoregressively with its own KV cache; the
target verifies ``[last committed token, d_1..d_gamma]`` in one forward and commits the
accepted prefix plus one token of its own (greedy: argmax match; sampling: the exact
rejection rule, so the output keeps the target's distribution). Both caches are rolled
back to the committed length. gamma is fixed or follows transformers' "heuristic"
schedule (+2 after a fully accepted block, -1 otherwise, at least 1).

The draft is any causal LM that shares the target's tokenizer: a registry name or a hub
id / local path (``method.speculative.draft=...``), by default the target preset's
``draft`` (``zoo-draft`` for ``zoo-target``). It is loaded on the target's device, in
its dtype.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, ModelConfig, SamplingConfig
from harness.engine import Engine, ModelLoadError
from harness.registry import MODELS
from harness.stops import StopRule
from methods.acceptance import ChainVerifier
from methods.base import DRAFT_MODEL, Generation, LoopEnd, Method, probabilities

SCHEDULES = ("constant", "heuristic")


@dataclass
class SpeculativeConfig(MethodConfig):
    name: str = "speculative"
    draft: Optional[str] = None  # draft model: registry name or hub id / local path; None = the target's `draft`
    # draft tokens per step (start value under `heuristic`); the fastest on HumanEval's tuning split in
    # results/speculative-gamma.md (make tables-gamma; tests/test_defaults.py holds the two together)
    gamma: int = 1
    schedule: str = "constant"  # constant | heuristic (+2 after a fully accepted block, -1 otherwise)
    max_gamma: int = 16  # upper bound for the heuristic schedule


class DraftMismatchError(ModelLoadError, ValueError):
    """The draft cannot verify against this target (different vocabulary)."""


def draft_model_config(name: Optional[str], target: Engine, method: str = "speculative") -> ModelConfig:
    """The draft's ModelConfig: a registry preset or a path, on the target's device and dtype."""
    name = name or target.cfg.draft
    if not name:
        raise ModelLoadError(
            f"no draft model for target '{target.cfg.name}'; set method.{method}.draft=<model preset, hub id or path>"
        )
    base = MODELS.get(name) if name in MODELS.names() else ModelConfig(name=name, path=name)
    # the draft runs like the target: same device, dtype and mode (eager or compiled: model.compile)
    return dataclasses.replace(base, device=str(target.device), dtype=target.cfg.dtype, compile=target.cfg.compile,
                               compile_buckets=list(target.cfg.compile_buckets))  # fmt: skip


def check_same_vocabulary(target: Engine, draft: Engine) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    sizes = (target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size)
    if sizes[0] != sizes[1]:
        raise DraftMismatchError(f"draft vocabulary size {sizes[1]} differs from the target's {sizes[0]}; "
                                 "use a draft with the target's tokenizer")  # fmt: skip
    if target.tokenizer is not None and draft.tokenizer is not None:
        if target.tokenizer.get_vocab() != draft.tokenizer.get_vocab():
            raise DraftMismatchError("draft tokenizer maps tokens to other ids than the target's; "
                                     "use a draft with the target's tokenizer")  # fmt: skip


def load_draft(cfg, target: Engine, draft: Optional[Engine] = None) -> Engine:
    """The draft engine: ``draft`` when one is given (tests), else loaded as ``cfg.draft``; checked."""
    if draft is None:
        draft = Engine.load(draft_model_config(cfg.draft, target, cfg.name))
    check_same_vocabulary(target, draft)
    return draft


class DraftModelMethod(Method):
    """A method that drafts with a second model, ``cfg.draft`` (``speculative``,
    ``speculative-tree``): loads and checks it (``load_draft``) and lists it for timing."""

    needs = (DRAFT_MODEL,)

    def __init__(self, cfg, engine: Engine, sampling: SamplingConfig, draft: Optional[Engine] = None):
        super().__init__(cfg, engine, sampling)
        self.draft = load_draft(cfg, engine, draft)

    def draft_engines(self) -> list[Engine]:
        return [] if self.draft is self.engine else [self.draft]


class Speculative(DraftModelMethod):
    """Speculative decoding: a small draft model proposes gamma tokens, one target forward verifies them."""

    config_class = SpeculativeConfig
    main_settings = ("gamma", "schedule")

    def __init__(
        self, cfg: SpeculativeConfig, engine: Engine, sampling: SamplingConfig, draft: Optional[Engine] = None
    ):
        if cfg.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{cfg.schedule}'; use one of {', '.join(SCHEDULES)}")
        if cfg.gamma < 1 or cfg.max_gamma < cfg.gamma:
            raise ValueError(f"need 1 <= gamma <= max_gamma, got gamma={cfg.gamma}, max_gamma={cfg.max_gamma}")
        super().__init__(cfg, engine, sampling, draft)

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The steps; the ``LoopEnd`` also holds the draft cache."""
        cfg = self.cfg
        chain = ChainVerifier(self.engine, self.sampling, stop, prompt_ids, seed)
        draft_cache = self.draft.new_cache()
        gamma = cfg.gamma
        # 1. prefill the target; its last row gives the first token
        chain.prefill()
        while not chain.done:
            # 2. the draft catches up on the committed tokens and proposes g of its own
            g = min(gamma, chain.room())
            draft, q = self.propose(draft_cache, chain.seq, g, chain.gen) if g else ([], None)
            # 3. one target forward verifies [last, d_1..d_g]; commit, roll the target cache back
            accepted = chain.verify(draft, q)
            # 4. roll the draft cache back to what is still committed (d_g is never in it)
            draft_cache.truncate(min(len(draft_cache), len(chain.seq) - 1))
            # 5. adapt gamma
            if cfg.schedule == "heuristic" and g:
                gamma = min(gamma + 2, cfg.max_gamma) if accepted == g else max(1, gamma - 1)
        return chain.end(draft_cache, draft_forwards=sum(chain.proposal_lengths))  # g draft forwards per proposal

    def propose(self, cache, seq: list[int], g: int, gen: Optional[torch.Generator]):
        """g draft tokens after ``seq`` as a 1-D tensor, and their distributions [g, vocab]
        when sampling (else None). Tokens stay on the device: no host sync per token."""
        sampling = self.sampling
        tokens, dists = [], []
        ids = seq[len(cache) :]  # committed tokens the draft has not seen: 1 or 2 (the whole prompt at first)
        for _ in range(g):
            logits = self.draft.forward(ids, cache, last_only=True).logits  # [1, vocab]
            if sampling.do_sample:
                q = probabilities(logits, sampling)
                ids = torch.multinomial(q, 1, generator=gen).view(1)
                dists.append(q)
            else:
                ids = logits.argmax(dim=-1)
            tokens.append(ids)
        return torch.cat(tokens), (torch.cat(dists) if dists else None)
