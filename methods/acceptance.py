"""What every draft-and-verify method shares: the acceptance rules, n-gram lookup, and
the target side of a chain (non-tree) verify step.

Pure helpers (later methods reuse them on their own candidates):
  greedy_accept(draft, logits)        longest draft prefix equal to the target argmax + one
  sample_accept(draft, p, q, gen)     speculative sampling (q = None: a deterministic draft)
  residual(p, q | token)              the distribution sampled after a rejection
  NgramIndex / ngram_lookup           latest earlier match of the last n tokens
  ReferenceIndex                      match of the last n tokens in another sequence (a reference)

``ChainVerifier`` (a ``methods.verifier.Verifier``) holds the target cache, the committed
tokens and the per-sample counts, and verifies ``[last committed token, d_1..d_g]`` in one
forward; a method only has to propose.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from harness.config import SamplingConfig
from harness.engine import Engine
from harness.kvcache import KVCache
from harness.stops import StopRule
from methods.base import Generation, LoopEnd, probabilities
from methods.verifier import Verifier, mean

Draft = Sequence[int] | torch.Tensor  # proposed tokens d_1..d_g (a list, or a 1-D tensor on any device)


# ---- acceptance rules --------------------------------------------------------------
def greedy_accept(draft: Draft, logits: torch.Tensor) -> list[int]:
    """Tokens to commit after verifying ``draft`` greedily.

    ``logits`` [g+1, vocab] are the target's rows for ``[x_{n-1}, d_1..d_g]``. The result is
    the accepted prefix ``d_1..d_a`` (each equal to the target's argmax) followed by the
    target's argmax after it (the correction, or the bonus when a == g): a+1 tokens.
    One argmax over the block and one transfer to the host.
    """
    g = logits.shape[0] - 1
    best = logits.argmax(dim=-1)
    if isinstance(draft, torch.Tensor):
        both = torch.cat((best, draft.to(best.device))).tolist()
        best_ids, draft_ids = both[: g + 1], both[g + 1 :]
    else:
        best_ids, draft_ids = best.tolist(), draft
    a = 0
    while a < g and draft_ids[a] == best_ids[a]:
        a += 1
    return best_ids[: a + 1]  # best[:a] == draft[:a]


def residual(p: torch.Tensor, q: Optional[torch.Tensor] = None, token: Optional[int] = None) -> torch.Tensor:
    """Unnormalised distribution to sample from after rejecting a draft token.

    With a draft distribution ``q``: max(0, p - q). With a deterministic draft (one-hot q
    at ``token``): p without ``token``. Falls back to ``p`` when the residual vanishes
    (p == q up to rounding, where a rejection has probability zero anyway).
    """
    if q is not None:
        rest = (p - q).clamp_min(0)
    else:
        rest = p.clone()
        rest[token] = 0
    return rest if float(rest.sum()) > 0 else p


def sample_accept(
    draft: Draft, p: torch.Tensor, q: Optional[torch.Tensor], gen: Optional[torch.Generator]
) -> list[int]:
    """Tokens to commit after verifying ``draft`` by speculative sampling.

    p [g+1, vocab]: target probabilities for the rows of ``[x_{n-1}, d_1..d_g]``;
    q [g, vocab]: the draft's probabilities, or None for a deterministic draft (one-hot q).
    d_i is accepted with probability min(1, p_i(d_i) / q_i(d_i)) (p_i(d_i) when one-hot);
    at the first rejection the token is drawn from ``residual``; if all are accepted a
    bonus token is drawn from p_{g+1}. The output is distributed exactly as sampling p.
    """
    d = torch.as_tensor(draft, dtype=torch.long, device=p.device)
    g = d.numel()
    a = 0
    if g:
        rows = torch.arange(g, device=p.device)
        ratio = p[rows, d] if q is None else p[rows, d] / q[rows, d]
        u = torch.rand(g, generator=gen, device=p.device)
        a = int((u < ratio).cumprod(dim=0).sum())
    if a == g:
        weights = p[g]
    else:
        weights = residual(p[a], None if q is None else q[a], int(d[a]))
    last = int(torch.multinomial(weights, 1, generator=gen))
    return d[:a].tolist() + [last]


# ---- n-gram lookup -------------------------------------------------------------------
def ngram_sizes(min_n: int, max_n: int) -> range:
    """The n-gram sizes a lookup tries, longest first (ValueError unless 1 <= min_n <= max_n)."""
    if not 1 <= min_n <= max_n:
        raise ValueError(f"n-gram sizes need 1 <= min_ngram <= max_ngram, got {min_n} and {max_n}")
    return range(max_n, min_n - 1, -1)


class NgramIndex:
    """The latest start of every n-gram (min_n <= n <= max_n) of a growing token list that
    has at least one token after it, so a lookup costs one dict probe per n.

    ``update(tokens)`` indexes what was appended since the last call (the list must only
    grow); ``lookup(tokens, k)`` returns up to k tokens that followed the most recent
    earlier occurrence of the last n tokens, trying the longest n first, or []. When that
    continuation runs into the end of the list the text is periodic there, and it goes on
    with the period (an overlapping copy, as in LZ77): ``[1, 2, 3, 1, 2]`` -> ``3, 1, 2, 3, ...``.
    """

    def __init__(self, min_n: int = 1, max_n: int = 3):
        self.sizes = ngram_sizes(min_n, max_n)
        self.latest: dict[tuple[int, ...], int] = {}
        self.seen = 0

    def update(self, tokens: Sequence[int]) -> None:
        latest = self.latest
        for j in range(max(self.seen, 1), len(tokens)):  # token j continues the n-grams ending at j-1
            for n in self.sizes:
                if n <= j:
                    latest[tuple(tokens[j - n : j])] = j - n
        self.seen = len(tokens)

    def lookup(self, tokens: Sequence[int], k: int) -> list[int]:
        if k <= 0:
            return []
        for n in self.sizes:
            start = self.latest.get(tuple(tokens[-n:])) if n <= len(tokens) else None
            if start is not None:
                out = list(tokens[start + n : start + n + k])
                period = len(tokens) - n - start  # the suffix repeats the match this many tokens later
                while len(out) < k:
                    out.append(out[len(out) - period])
                return out
        return []


def ngram_lookup(tokens: Sequence[int], k: int, min_n: int = 1, max_n: int = 3) -> list[int]:
    """One-shot ``NgramIndex`` lookup (O(len(tokens))); loops keep an index instead."""
    index = NgramIndex(min_n, max_n)
    index.update(tokens)
    return index.lookup(tokens, k)


@dataclass
class SourceCopy:
    tokens: list[int]  # the draft: up to k source tokens that followed the matched n-gram
    start: int  # position of tokens[0] in the source


class ReferenceIndex:
    """Every occurrence of every n-gram (min_n <= n <= max_n) of a fixed source sequence that
    has at least one token after it: drafts copied from a sequence other than the context
    (reference lookup: a document given with the sample, or the prompt alone).

    ``lookup(tokens, k, cursor)`` looks the last n tokens of ``tokens`` up in the source,
    longest n first. Of their occurrences, the first whose continuation starts at or after
    ``cursor`` wins (a copy reads on through the source from where the last one stopped),
    else the first one. The draft is up to k tokens of that continuation, shorter at the end
    of the source (no periodic extension: the source does not grow with the context).
    """

    def __init__(self, source: Sequence[int], min_n: int = 1, max_n: int = 3):
        self.sizes = ngram_sizes(min_n, max_n)
        self.source = list(source)
        self.follows: dict[tuple[int, ...], list[int]] = {}  # n-gram -> positions right after it, ascending
        for n in self.sizes:
            for end in range(n, len(self.source)):
                self.follows.setdefault(tuple(self.source[end - n : end]), []).append(end)

    def lookup(self, tokens: Sequence[int], k: int, cursor: int = 0) -> Optional[SourceCopy]:
        """The copy for the context ``tokens``, or None when no n-gram matches or k <= 0."""
        if k <= 0:
            return None
        for n in self.sizes:
            ends = self.follows.get(tuple(tokens[-n:])) if n <= len(tokens) else None
            if ends:
                i = bisect_left(ends, cursor)
                start = ends[i] if i < len(ends) else ends[0]
                return SourceCopy(self.source[start : start + k], start)
        return None


# ---- the verify step -------------------------------------------------------------------
class ChainVerifier(Verifier):
    """The target side of a chain draft-and-verify loop, for one prompt.

    ``verify`` runs the target over ``[seq[-1], d_1..d_g]`` itself; a method whose forward
    holds more than the chain (SPACE's mask groups) runs it, hands the chain's rows to
    ``accept`` and keeps what it needs of the cache itself.
    After generation ``len(cache) == len(prompt) + len(tokens) - 1``.
    """

    def __init__(self, engine: Engine, sampling: SamplingConfig, stop: StopRule, prompt_ids: list[int], seed: int):
        super().__init__(engine, sampling, stop, prompt_ids, seed)
        self.proposal_lengths: list[int] = []  # g of every verify step

    def prefill(self) -> None:
        """Run the prompt; its last row gives the first token."""
        self.first_token(self.engine.forward(self.seq, self.cache, last_only=True).logits[-1])

    def verify(self, draft: Draft, q: Optional[torch.Tensor] = None) -> int:
        """One target forward on ``[seq[-1], *draft]``; commits the accepted prefix and one
        target token, rolls the cache back, and returns how many draft tokens were committed.

        q [g, vocab]: the draft's sampling distributions (sampling mode; None = one-hot draft).
        """
        if isinstance(draft, torch.Tensor):
            ids = torch.cat((draft.new_tensor([self.seq[-1]]), draft))
        else:
            ids = [self.seq[-1], *draft]
        logits = self.engine.forward(ids, self.cache, last_only=len(draft) == 0).logits
        accepted = self.accept(draft, logits, q)
        with self.engine.phase("cache"):
            self.cache.truncate(len(self.seq) - 1)
        return accepted

    def accept(self, draft: Draft, logits: torch.Tensor, q: Optional[torch.Tensor] = None) -> int:
        """Acceptance on rows the caller's forward gave: ``logits`` [g+1, vocab] are the target's
        rows for ``[seq[-1], d_1..d_g]``. Commits the accepted prefix and one target token
        (stop rules applied) and returns how many draft tokens were committed; the cache is
        the caller's to roll back."""
        with self.engine.phase("accept"):
            if self.sampling.do_sample:
                tokens = self.sample(draft, probabilities(logits, self.sampling), q)
            else:
                tokens = greedy_accept(draft, logits)
            return self.commit(len(draft), tokens)

    def commit(self, g: int, tokens: list[int]) -> int:
        """Commit ``tokens`` (an accepted prefix of a draft of ``g`` tokens, then one more) as one
        step, stop rules applied, and count it; returns how many draft tokens were committed.
        ``accept`` decides ``tokens`` by the target's rows; a lossy mode may decide them by its own rule."""
        accepted = min(self._commit(tokens), len(tokens) - 1)
        self.proposal_lengths.append(g)
        self._count(g, accepted)
        return accepted

    def sample(self, draft: Draft, p: torch.Tensor, q: Optional[torch.Tensor]) -> list[int]:
        """The sampling rule (speculative sampling; a test swaps in a broken one as a control)."""
        return sample_accept(draft, p, q, self.gen)

    def end(self, draft_cache: Optional[KVCache] = None, draft_forwards: int = 0, extra: Optional[dict] = None) -> LoopEnd:
        """What a chain method's ``loop`` ends with: the result, the caches, the proposal lengths."""
        return LoopEnd(self.result(draft_forwards, extra), self.cache, draft_cache, list(self.proposal_lengths))

    def result(self, draft_forwards: int = 0, extra: Optional[dict] = None, lossy: bool = False) -> Generation:
        # mean draft tokens per verify step (speculative: the mean of the gamma history)
        return self._generation(draft_forwards, lossy, {"mean_proposal": mean(self.proposal_lengths), **(extra or {})})
