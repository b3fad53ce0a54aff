"""The target side of draft-and-verify, shared by the two verifiers.

``ChainVerifier`` (methods/acceptance.py) checks a chain of draft tokens, ``TreeVerifier``
(methods/tree.py) a token tree; both start from ``Verifier``, which holds what does not
depend on the draft's shape: the committed tokens and the stop rules (``Committer``), the
target cache, the sampling generator, the per-step counts and the ``Generation`` they make.

Invariant between steps: ``cache`` holds ``seq[:-1]`` (prompt + committed tokens but the
last) and ``seq[-1]``, the last committed token, is fed with the next proposal.
"""

from __future__ import annotations

import torch

from harness.config import SamplingConfig
from harness.engine import Engine
from harness.stops import Committer, StopRule
from methods.base import Generation, make_generator, next_token


class Verifier:
    """Committed tokens, target cache and counts of one prompt's draft-and-verify loop."""

    def __init__(self, engine: Engine, sampling: SamplingConfig, stop: StopRule, prompt_ids: list[int], seed: int):
        self.engine = engine
        self.sampling = sampling
        self.out = Committer(stop)
        self.seq = list(prompt_ids)  # prompt + committed tokens
        self.cache = engine.new_cache()
        self.gen = make_generator(seed, engine.device) if sampling.do_sample else None
        self.per_step: list[int] = []  # tokens committed per target forward (prefill included)
        self.proposed: list[int] = []  # per draft position (a tree: per depth): steps that proposed one there
        self.accepted: list[int] = []  # ...and steps that committed it

    @property
    def done(self) -> bool:
        return self.out.done

    @property
    def forwards(self) -> int:
        """Target forwards so far, prefill included: one per committing step."""
        return len(self.per_step)

    def room(self) -> int:
        """How many draft tokens (a tree: how deep) one step may still usefully propose: the
        step commits at most that many plus one target token."""
        return self.out.stop.max_new_tokens - len(self.out.tokens) - 1

    def first_token(self, logits: torch.Tensor) -> int:
        """Commit the token the prompt's last row gives (``logits`` [vocab]); returns it."""
        token = next_token(logits, self.sampling, self.gen)
        self._commit([token])
        return token

    def _commit(self, tokens: list[int]) -> int:
        """Commit ``tokens`` through the stop rules as one step; returns how many were kept."""
        count = self.out.add(tokens)
        self.seq.extend(tokens[:count])
        self.per_step.append(count)
        return count

    def _count(self, proposed: int, accepted: int) -> None:
        """One verify step's per-position counts: positions 0..proposed-1 were proposed,
        0..accepted-1 committed (both lists grown to the longest proposal so far)."""
        width = max(len(self.proposed), proposed)
        for counts, n in ((self.proposed, proposed), (self.accepted, accepted)):
            counts.extend([0] * (width - len(counts)))
            for i in range(n):
                counts[i] += 1

    def _generation(self, draft_forwards: int, lossy: bool, extra: dict) -> Generation:
        return Generation(
            tokens=self.out.tokens,
            target_forwards=self.forwards,
            draft_forwards=draft_forwards,
            accepted_per_step=self.per_step,
            proposed_per_position=self.proposed,
            accepted_per_position=self.accepted,
            lossy=lossy,
            extra=extra,
            stop_reason=self.out.reason,
        )


def mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else 0.0

