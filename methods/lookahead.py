"""Lookahead decoding (Fu et al. 2024): Jacobi iterations and n-gram verification in one forward.

State between steps: the committed tokens, a KV cache holding all of them but the last one
``x`` (at position d), a 2-D Jacobi window and an n-gram pool.

The window has up to N-1 *levels* (0 the oldest Jacobi iterate, the last the newest) of W
columns each; level l, column i is a guess for position ``d + 1 + i + l``. Every step runs ONE
target forward over three parts under one attention mask (``step_layout``; everything also
sees the cached prefix):

  x                      position d, sees itself;
  lookahead branch       level l column i sees x, level 0 columns 0..i and column i of levels
                         1..l: a causal context of consecutive positions (the diagonal that
                         makes an n-gram), so its output is a Jacobi update for the next
                         position;
  verification branch    up to G pool n-grams that start with x, each its N-1 further tokens
                         at positions d+1 .. d+N-1, causal inside; candidates do not see each
                         other or the window.

From the forward:
  1. the newest level's outputs are the next Jacobi iterate; with a full window each column
     gives one n-gram (the column's N-1 levels + the output), added to the pool under its
     first token (bounded per token, most recent first); with ``context_pool`` (upstream's
     pool-from-prompt option) the prompt's n-grams and every committed one go in too;
  2. verification: the candidates are merged into a trie rooted at x, together with level 0
     (a causal chain right after x, so it is verified for free: with N = 2 the method is
     plain Jacobi decoding), and the shared tree step (methods/tree.py ``TreeVerifier.accept``,
     given each node's row) verifies it: greedy takes the longest root path whose tokens are
     the target's argmax, plus one more token (the bonus); sampling walks the trie with the
     one-hot multi-candidate rule (children in order, p without the rejected ones), exactly
     the target's distribution;
  3. commit (stop rules cut inside the path); the cache keeps prefix + x + the accepted nodes
     but the last (``KVCache.keep``); the window moves on by the committed tokens (columns that
     fall off the front are dropped, new ones at the end are filled from the prompt, cyclically,
     so runs are deterministic), the oldest level dropped once all N-1 are there.

Warm-up: the window starts as one level (the prompt's last W tokens) and gains a level per
step until it has N-1; n-grams are collected from then on. Cost per step on a device without
spare compute (a CPU): 1 + W * (N-1) + G * (N-1) tokens through the model.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from harness.config import ConfigValueError, MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.base import Generation, LoopEnd, Method
from methods.tree import DraftTree, TreeVerifier


@dataclass
class LookaheadConfig(MethodConfig):
    name: str = "lookahead"
    # (W, N, G): the fastest point on HumanEval's tuning split in results/lookahead-wng.md (make tables-lookahead)
    window: int = 2  # W: columns of the Jacobi window (future positions guessed per level)
    ngram: int = 3  # N: n-gram size; the window keeps N-1 Jacobi levels and a candidate is N-1 tokens (2: plain Jacobi)
    candidates: int = 2  # G: pool n-grams verified per step at most; also the pool's capacity per first token (0: none)
    context_pool: bool = True  # also seed the pool with the prompt's n-grams and add the committed output's

    def check(self) -> None:
        check_config(self)


class LookaheadError(ConfigValueError):
    """Settings lookahead cannot run with; the message names the field and the fix."""


def check_config(cfg: LookaheadConfig) -> None:
    if cfg.window < 1:
        raise LookaheadError(f"method.lookahead.window must be >= 1, got {cfg.window}")
    if cfg.ngram < 2:
        raise LookaheadError(f"method.lookahead.ngram must be >= 2 (2 = plain Jacobi decoding), got {cfg.ngram}")
    if cfg.candidates < 0:
        raise LookaheadError(f"method.lookahead.candidates must be >= 0, got {cfg.candidates}")


# ---- the step's layout ---------------------------------------------------------------------
@dataclass(frozen=True)
class StepLayout:
    """Rows of one step's forward: x, then level l column i at 1 + l*W + i, then candidate c's
    token j at 1 + levels*W + c*(N-1) + j."""

    offsets: torch.Tensor  # [T] position of each row minus d (x's position)
    mask: torch.Tensor  # [T, T] bool, mask[a, b]: row a may attend to row b

    @property
    def size(self) -> int:
        return int(self.offsets.numel())


@functools.lru_cache(maxsize=64)
def step_layout(window: int, levels: int, candidates: int, ngram: int) -> StepLayout:
    """Positions and the two-branch mask for a window of ``levels`` x ``window`` and
    ``candidates`` n-grams of ``ngram - 1`` tokens (built once per shape)."""
    span = ngram - 1
    size = 1 + levels * window + candidates * span
    offsets = torch.zeros(size, dtype=torch.long)
    mask = torch.zeros(size, size, dtype=torch.bool)
    mask[:, 0] = True  # everything sees x (and the cached prefix, added by the caller)

    def cell(level: int, col: int) -> int:
        return 1 + level * window + col

    for level in range(levels):
        for col in range(window):
            row = cell(level, col)
            offsets[row] = 1 + col + level
            for before in range(col + 1):  # level 0 up to this column: the causal part
                mask[row, cell(0, before)] = True
            for lower in range(1, level + 1):  # this column of levels 1..level: the diagonal
                mask[row, cell(lower, col)] = True
    first = 1 + levels * window
    for c in range(candidates):
        for j in range(span):
            row = first + c * span + j
            offsets[row] = 1 + j
            mask[row, first + c * span : row + 1] = True
    return StepLayout(offsets, mask)


# ---- the n-gram pool and the candidate trie ------------------------------------------------------
class NgramPool:
    """n-grams keyed by their first token: up to ``capacity`` continuations (N-1 tokens) per
    key, most recent first; adding one already there moves it to the front."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.entries: dict[int, list[tuple[int, ...]]] = {}

    def add(self, first: int, rest: tuple[int, ...]) -> None:
        if self.capacity <= 0:
            return
        entries = self.entries.setdefault(first, [])
        if rest in entries:
            entries.remove(rest)
        entries.insert(0, rest)
        del entries[self.capacity :]

    def add_from(self, tokens: list[int], ngram: int, since: int = 0) -> None:
        """Add the n-grams of ``tokens`` that end at index ``since`` or later, in order."""
        for start in range(max(0, since - ngram + 1), len(tokens) - ngram + 1):
            self.add(tokens[start], tuple(tokens[start + 1 : start + ngram]))

    def get(self, first: int) -> list[tuple[int, ...]]:
        return self.entries.get(first, [])

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


@dataclass
class Trie:
    """The step's candidates merged by common prefix; node 0 is x. Children are distinct
    tokens, in the order their candidates were added; a node's row is that of the first
    candidate that reached it (same tokens at the same positions: the same context)."""

    tokens: list[int]  # token of each node
    parents: list[int]  # parent node of each node (-1 for x)
    rows: list[int]  # its row in the step's forward
    from_pool: list[bool] = field(default_factory=list)  # made by a pool candidate (else: by window level 0)
    children: list[dict[int, int]] = field(default_factory=list)  # token -> child node

    @classmethod
    def rooted(cls, token: int) -> "Trie":
        return cls([token], [-1], [0], [False], [{}])

    def add(self, tokens: list[int], rows: list[int], from_pool: bool) -> None:
        node = 0
        for token, row in zip(tokens, rows):
            child = self.children[node].get(token)
            if child is None:
                child = len(self.tokens)
                self.tokens.append(token)
                self.parents.append(node)
                self.rows.append(row)
                self.from_pool.append(from_pool)
                self.children.append({})
                self.children[node][token] = child
            node = child

    def tree(self) -> DraftTree:
        """The trie as the shared verifier's token tree (children in the order added)."""
        return DraftTree(self.tokens, tuple(self.parents))


# ---- the method ---------------------------------------------------------------------------
class Lookahead(Method):
    """Lookahead decoding: Jacobi iterations and n-gram verification in one forward."""

    config_class = LookaheadConfig
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)
    main_settings = ("window", "ngram", "candidates")

    def __init__(self, cfg: LookaheadConfig, engine: Engine, sampling: SamplingConfig):
        super().__init__(cfg, engine, sampling)
        check_config(cfg)

    def headroom(self) -> int:
        """The window's last column of level N-2 sits W + N - 2 positions past x, which is at
        most one position before a full-length output's last."""
        return self.cfg.window + self.cfg.ngram - 3

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    @torch.inference_mode()
    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The steps; the ``LoopEnd``'s cache then holds prompt + tokens but the last."""
        self.check_context(len(prompt_ids), stop)
        cfg, engine = self.cfg, self.engine
        W, N = cfg.window, cfg.ngram
        verifier = self.verifier_class(engine, self.sampling, stop, prompt_ids, seed)
        pool = NgramPool(cfg.candidates)
        fill = Filler(prompt_ids, start=len(prompt_ids) - W)
        levels = [fill.take(W)]  # the Jacobi window, oldest level first
        step_tokens, verified, from_pool, from_window = 0, 0, 0, 0
        # 1. prefill: the prompt's last row gives the first token
        verifier.prefill()
        if cfg.context_pool:
            pool.add_from(verifier.seq, N)  # the prompt's n-grams and the one the first token ends
        while not verifier.done:
            x, past = verifier.seq[-1], len(verifier.cache)
            # 2. the step's rows: x, the window's levels, the pool's n-grams that start with x
            guesses = pool.get(x)[: cfg.candidates]
            layout = step_layout(W, len(levels), len(guesses), N)
            ids = [x] + [t for level in levels for t in level] + [t for g in guesses for t in g]
            trie = Trie.rooted(x)
            trie.add(levels[0], list(range(1, W + 1)), from_pool=False)
            guess_row = 1 + len(levels) * W  # the verification branch's first row
            for c, guess in enumerate(guesses):
                rows = list(range(guess_row + c * (N - 1), guess_row + (c + 1) * (N - 1)))
                trie.add(list(guess), rows, from_pool=True)
            # 3. one target forward; the cache now holds prefix + all rows
            device_mask = layout.mask.to(engine.device)
            mask = torch.cat((torch.ones(layout.size, past, dtype=torch.bool, device=engine.device), device_mask), 1)
            output = engine.forward(ids, verifier.cache, positions=layout.offsets + past, mask=mask)
            # 4. the shared tree step on the trie's rows: acceptance, commit (stop rules cut inside
            #    the path), the cache kept to prefix + x + the nodes before each committed token
            step = verifier.accept(trie.tree(), output, trie.rows)
            committed = len(step.tokens)
            step_tokens += layout.size
            verified += len(guesses)
            pooled = sum(trie.from_pool[n] for n in step.accepted)
            from_pool, from_window = from_pool + pooled, from_window + len(step.accepted) - pooled
            # 5. the Jacobi update: n-grams into the pool, the window moves on
            newest_rows = output.logits[guess_row - W : guess_row]  # the newest level's outputs
            newest = newest_rows.argmax(dim=-1).tolist()
            if len(levels) == N - 1:
                for col in range(W):
                    pool.add(levels[0][col], tuple(level[col] for level in levels[1:]) + (newest[col],))
            levels = advance(levels + [newest], N - 1, committed, fill)
            if cfg.context_pool:
                pool.add_from(verifier.seq, N, since=len(verifier.seq) - committed)
        steps = len(verifier.per_step) - 1
        extra = {"window": W, "ngram": N, "candidates": cfg.candidates, "context_pool": cfg.context_pool,
                 "acceptance": "greedy" if verifier.gen is None else "rejection",
                 "mean_step_tokens": step_tokens / steps if steps else 0.0,  # rows per lookahead forward
                 "mean_verified": verified / steps if steps else 0.0,  # pool n-grams verified per step
                 "accepted_from_pool": from_pool, "accepted_from_window": from_window}  # fmt: skip
        return LoopEnd(verifier.result(extra=extra), verifier.cache)


class Filler:
    """Tokens for new window columns: the prompt's, cyclically from ``start`` (deterministic)."""

    def __init__(self, prompt_ids: list[int], start: int):
        self.source = list(prompt_ids)
        self.at = start % len(self.source)

    def take(self, count: int) -> list[int]:
        out = []
        for _ in range(count):
            out.append(self.source[self.at])
            self.at = (self.at + 1) % len(self.source)
        return out


def advance(levels: list[list[int]], keep: int, committed: int, fill: Filler) -> list[list[int]]:
    """The window after ``committed`` tokens: ``levels`` (oldest first, the new iterate last,
    level l column i a guess for position d + 1 + i + l) becomes at most ``keep`` levels that
    guess d' + 1 + i + l with d' = d + committed. Dropping the oldest level already moves every
    guess one level down, so the columns shift by committed - 1 then (by committed otherwise);
    the columns freed at the end are filled."""
    dropped = max(0, len(levels) - keep)
    shift = committed - dropped
    width = len(levels[0])
    moved = []
    for level in levels[dropped:]:
        kept = level[shift:]
        moved.append(kept + fill.take(width - len(kept)))
    return moved

