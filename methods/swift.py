"""SWIFT-style self-speculative decoding (Xia et al. 2024, "SWIFT: On-the-Fly Self-Speculative
Decoding for LLM Inference Acceleration"): the target drafts for itself with some of its
attention and MLP sublayers left out, and verifies the draft with all of them.

1. Prefill the target; its last row gives the first token.
2. Search (once, right after the prefill, on the context already there): the eligible
   sublayers are the attention and MLP of every decoder layer but the first and the last;
   a skip set leaves out ``round(skip_ratio * 2 * layers)`` of them. Each candidate is
   scored by one parallel forward of the skipped model over the last ``search_window``
   context positions (they see the full model's cache of what precedes the window; the
   pass's own entries are dropped after it): its score is the share of those positions
   where its argmax equals the full model's, i.e. where a greedy verify would accept its
   token. The full model's argmax comes from one more parallel pass over the same window.
   ``search_random`` random sets are scored first, then a greedy refinement (swap one
   skipped sublayer for a kept one, move on improvement) until ``search_budget`` sets were
   scored, none of the best's swaps improves it, or one scores ``target_score``. Ties keep
   the set scored first. Everything is drawn from ``random.Random`` seeded by ``seed`` and
   the generation's seed, so a run is reproducible.
3. Draft: from the last committed token, the skipped model proposes up to ``max_draft``
   tokens one forward each on the target's own cache (skipped attention writes no entries;
   the cache is truncated back before the verify); it stops before a token whose
   probability under the draft, its top-1, is below ``confidence``.
4. Verify with ``ChainVerifier`` (greedy: argmax match; sampling: speculative sampling with
   the draft's distribution q, exact since where a draft stops depends only on the tokens
   drafted before). Go to 3.

Costs, counted honestly: every skipped-model forward (drafting, and the search passes) and
the full-model window pass of the search run on a sibling engine of the target, so the
runner times them as draft forwards; ``Generation.draft_forwards`` counts them all and
``extra`` says how many were the search's. The search is paid by every generation (the
runner's warm-up is untimed, so nothing found there is carried over).

Upstream (hemingkx/SWIFT) keeps optimising during the first tokens and reuses the set
across a task's instances; here the search is one first phase per generation.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine, LayerSkip
from harness.stops import StopRule
from methods.acceptance import ChainVerifier
from methods.base import Generation, Method, probabilities

Sublayer = tuple[str, int]  # ("attn" | "mlp", decoder layer index)


@dataclass
class SwiftConfig(MethodConfig):
    name: str = "swift"
    # Defaults: a few settings compared on HumanEval's tuning split (6 problems, 64 tokens) on the
    # zoo target by forward counts and per-forward CPU costs; none beats autoregressive decoding
    # there (README). skip_ratio 0.45 is the paper's.
    #
    # share of all 2 x layers sublayers (attention + MLP) the draft leaves out, rounded; at most
    # the eligible ones (every layer's but the first's and the last's)
    skip_ratio: float = 0.45
    search_budget: int = 6  # skip sets scored at most per generation (random ones + refinement)
    search_random: int = 3  # of those, drawn at random before the greedy refinement from the best
    search_window: int = 16  # context positions each candidate is scored on (the last ones before the search)
    target_score: float = 0.95  # stop searching once a skip set scores at least this
    confidence: float = 0.6  # drafting stops before a token whose draft probability (its top-1) is below this
    max_draft: int = 6  # draft tokens per step, at most
    seed: int = 0  # seeds the search's random draws (with the generation's seed)


@dataclass
class SearchResult:
    skip: LayerSkip  # the skip set chosen
    score: float  # its share of window positions agreeing with the full model
    candidates: int  # skip sets scored
    forwards: int  # forwards the search ran (candidates + the full model's window pass)
    window: int  # positions per search forward


def eligible_sublayers(layers: int) -> list[Sublayer]:
    """Every sublayer a draft may skip: attention and MLP of layers 1..layers-2."""
    return [(kind, i) for i in range(1, layers - 1) for kind in ("attn", "mlp")]


def as_skip(units: frozenset[Sublayer]) -> LayerSkip:
    return LayerSkip(attn=frozenset(i for k, i in units if k == "attn"),
                     mlp=frozenset(i for k, i in units if k == "mlp"))  # fmt: skip


class Swift(Method):
    """SWIFT: the target drafts for itself with some sublayers skipped, then verifies with all of them."""

    config_class = SwiftConfig
    main_settings = ("skip_ratio", "max_draft")

    def __init__(self, cfg: SwiftConfig, engine: Engine, sampling: SamplingConfig):
        super().__init__(cfg, engine, sampling)
        layers = engine.config.get_text_config().num_hidden_layers
        self.units = eligible_sublayers(layers)
        self.skip_count = min(len(self.units), round(cfg.skip_ratio * 2 * layers))
        self.total_sublayers = 2 * layers
        if not self.units:
            raise ValueError(f"swift needs a model with at least 3 layers (first and last are kept), this one has {layers}")
        if self.skip_count < 1:
            raise ValueError(f"skip_ratio {cfg.skip_ratio} skips no sublayer of {2 * layers}; raise method.swift.skip_ratio")
        if cfg.search_budget < 1 or not 1 <= cfg.search_random <= cfg.search_budget:
            raise ValueError(f"need 1 <= search_random <= search_budget, got {cfg.search_random} and {cfg.search_budget}")
        if cfg.search_window < 1 or cfg.max_draft < 1:
            raise ValueError(f"search_window and max_draft must be >= 1, got {cfg.search_window} and {cfg.max_draft}")
        engine.check_layerwise(as_skip(frozenset(self.units[: self.skip_count])))  # refuse other families now
        self.drafter = engine.sibling()  # the same model; its forwards are timed as draft forwards

    def draft_engines(self) -> list[Engine]:
        return [self.drafter]

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        chain = ChainVerifier(self.engine, self.sampling, stop, prompt_ids, seed)
        drafts = 0  # drafting forwards
        # 1. prefill the target; its last row gives the first token
        chain.prefill()
        search = None
        if not chain.done:
            # 2. choose the skip set on the context there is
            search = self.search(chain, random.Random(self.cfg.seed * 1_000_003 + seed))
        while not chain.done:
            # 3. the skipped model drafts until unsure; its cache entries are dropped again
            draft, q, forwards = self.propose(chain, search.skip, min(self.cfg.max_draft, chain.room()))
            drafts += forwards
            # 4. one full forward verifies [last, *draft]; commit, roll the cache back
            chain.verify(draft, q)
        return chain.result(draft_forwards=drafts + (search.forwards if search else 0), extra=self.extra(search, drafts))

    def extra(self, search: Optional[SearchResult], drafts: int) -> dict:
        skip = search.skip if search else LayerSkip()
        return {
            "skip_attn": sorted(skip.attn),  # decoder layers whose attention the draft skipped
            "skip_mlp": sorted(skip.mlp),  # ... whose MLP it skipped
            "skipped_share": len(skip) / self.total_sublayers,  # of all attention + MLP sublayers
            "search_score": search.score if search else float("nan"),
            "search_candidates": search.candidates if search else 0,
            "search_forwards": search.forwards if search else 0,  # included in draft_forwards
            "search_window": search.window if search else 0,
            "drafting_forwards": drafts,  # the rest of draft_forwards
        }

    # ---- the search ----------------------------------------------------------------------
    def search(self, chain: ChainVerifier, rng: random.Random) -> SearchResult:
        """The best skip set by its agreement with the full model on the context's last positions."""
        cfg = self.cfg
        window = min(cfg.search_window, len(chain.cache))
        target = self.window_argmax(chain, window, None)
        scores: dict[frozenset[Sublayer], float] = {}  # in the order scored

        def score(units: frozenset[Sublayer]) -> float:
            if units not in scores:
                scores[units] = float((self.window_argmax(chain, window, as_skip(units)) == target).float().mean())
            return scores[units]

        def best() -> frozenset[Sublayer]:
            return max(scores, key=scores.__getitem__)  # the first scored among equals

        def finished() -> bool:
            return len(scores) >= cfg.search_budget or (bool(scores) and scores[best()] >= cfg.target_score)

        # random sets (distinct; fewer when the space is smaller than asked)
        attempts = 0
        while len(scores) < cfg.search_random and not finished() and attempts < 20 * cfg.search_random:
            score(frozenset(rng.sample(self.units, self.skip_count)))
            attempts += 1
        # greedy refinement: try the best set's swaps in random order, move on the first improvement
        improved = True
        while improved and not finished():
            improved = False
            current = best()
            kept = [u for u in self.units if u not in current]
            swaps = [(out, back) for out in sorted(current) for back in kept]
            rng.shuffle(swaps)
            for out, back in swaps:
                if finished():
                    break
                neighbour = (current - {out}) | {back}
                if neighbour not in scores and score(neighbour) > scores[current]:
                    improved = True
                    break
        chosen = best()
        return SearchResult(as_skip(chosen), scores[chosen], len(scores), len(scores) + 1, window)

    @torch.inference_mode()
    def window_argmax(self, chain: ChainVerifier, window: int, skip: Optional[LayerSkip]) -> torch.Tensor:
        """Argmax after each of the last ``window`` cached tokens, re-run in one parallel
        forward (skipped or not) that sees the cache before them and then itself; the cache
        is left as it was. [window] token ids."""
        cache = chain.cache
        past = len(cache)
        start = past - window
        allowed = torch.zeros((window, past + window), dtype=torch.bool)
        allowed[:, :start] = True  # the full model's entries before the window
        allowed[:, past:] = torch.ones((window, window), dtype=torch.bool).tril()  # the pass itself, causal
        logits = self.drafter.forward(chain.seq[start:past], cache, positions=list(range(start, past)),
                                      mask=allowed, skip=skip).logits  # fmt: skip
        cache.truncate(past)
        return logits.argmax(dim=-1)

    # ---- drafting ------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, chain: ChainVerifier, skip: LayerSkip, budget: int):
        """Up to ``budget`` draft tokens after ``chain.seq``, their distributions [g, vocab]
        when sampling (else None), and the forwards it took. The cache is left as it was."""
        cache, sampling = chain.cache, self.sampling
        past = len(cache)
        tokens: list[int] = []
        dists: list[torch.Tensor] = []
        forwards = 0
        last = chain.seq[-1]
        while len(tokens) < budget:
            logits = self.drafter.forward([last], cache, last_only=True, skip=skip).logits[-1]
            forwards += 1
            dist = probabilities(logits, sampling) if sampling.do_sample else torch.softmax(logits, dim=-1)
            if float(dist.max()) < self.cfg.confidence:
                break  # unsure: stop before this token
            if sampling.do_sample:
                last = int(torch.multinomial(dist, 1, generator=chain.gen))
                dists.append(dist)
            else:
                last = int(dist.argmax())
            tokens.append(last)
        cache.truncate(past)
        return tokens, (torch.stack(dists) if dists else None), forwards
