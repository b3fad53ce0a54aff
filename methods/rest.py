"""REST (He et al. 2024): drafts retrieved from a token datastore, verified as a tree.

The datastore is a token corpus with its suffix array (harness/datastore.py, built by
``harness datastore build``). One step:

  1. lookup: the longest suffix of the context (prompt + output; ``max_suffix`` tokens down
     to ``min_suffix``) that occurs in the datastore, by binary search; never longer than the
     last step's match plus the tokens committed since (a suffix that occurs, less those
     tokens, occurred before them), which is tried first;
  2. candidates: the ``copy_tokens`` tokens that follow up to ``max_candidates`` of its
     occurrences (all of them, or an even spread over its suffix array range);
  3. tree: the continuations merged into a trie whose nodes count the continuations through
     them; the ``max_nodes`` most frequent nodes are kept (ties: shallower first, then first
     seen). A node never counts more than its parent, so the kept set is prefix-closed;
  4. the shared tree step (methods/tree.py): one target forward over the tree, acceptance,
     commit through the stop rules, cache compaction.

No match: a plain one-token step. The tree is never deeper than what may still be committed
(``TreeVerifier.room``), so no position passes the output's end.

Greedy: the longest root path the target agrees with (lossless). Sampling: the candidates
are deterministic, so the tree step's one-hot-draft rule over several candidates applies
(lossless). ``Generation.extra``: the datastore's size, lookups, hits, mean match length,
the search's suffix comparisons (a count) and ``lookup_ms_mean``: host wall-clock time per
lookup (search + tree building), measured inside the runner's timed generation, for
information only (never gated; the runner's wall time already includes it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from harness.config import MethodConfig, SamplingConfig
from harness.datastore import Datastore, DatastoreError, default_datastore_dir, tokenizer_fingerprint
from harness.engine import Engine
from harness.paths import resolve_repo_path
from harness.stops import StopRule
from methods.base import DATASTORE, Generation, LoopEnd, Method
from methods.tree import DraftTree, TreeVerifier


@dataclass
class RestConfig(MethodConfig):
    name: str = "rest"
    datastore: str = ""  # datastore directory ("" = $HARNESS_CACHE/datastore/zoo: `harness datastore build`)
    max_suffix: int = 16  # longest context suffix looked up (tokens)
    min_suffix: int = 2  # shortest one; below it the step is a plain one-token step
    max_candidates: int = 200  # continuations gathered per lookup (an even spread when there are more)
    copy_tokens: int = 8  # tokens per continuation: the tree's depth
    # draft tree nodes kept (the root not counted): the most frequent. 16: on HumanEval's tuning split
    # (zoo target, 6 problems x 64 tokens) as many tokens per forward as 32 (1.60 vs 1.64), half the tree
    max_nodes: int = 16


def padded(continuations: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Continuations as one int64 matrix [n, longest], -1 after each one's end."""
    if isinstance(continuations, np.ndarray):
        return continuations.astype(np.int64, copy=False)
    rows = np.full((len(continuations), max((len(c) for c in continuations), default=0)), -1, dtype=np.int64)
    for i, seq in enumerate(continuations):
        rows[i, : len(seq)] = seq
    return rows


def frequency_tree(root: int, continuations: np.ndarray | Sequence[Sequence[int]], max_nodes: int) -> DraftTree:
    """The trie of ``continuations`` (lists, or a matrix with -1 after each one's end) below
    ``root``, pruned to its ``max_nodes`` most frequent nodes (ties: shallower, then first
    seen); children in that order. Array operations over all continuations at once: a trie node
    is a distinct prefix, and sorted continuations hold each prefix in one run of rows."""
    rows = padded(continuations)
    n, width = rows.shape
    if n == 0 or width == 0:
        return DraftTree([root], (-1,))
    # 1. sort the rows (stable); a (row, depth) cell opens a new node where the row's first
    #    depth + 1 tokens differ from the previous row's
    order = np.lexsort(rows.T[::-1])
    rows = rows[order]
    opens = np.ones((n, width), dtype=bool)
    opens[1:] = np.logical_or.accumulate(rows[1:] != rows[:-1], axis=1)
    # 2. the cells depth by depth (column-major): node i (0-based, the root apart) opens at
    #    cell starts[i] and holds the cells up to the next opening
    cells = opens.T.ravel()
    starts = np.flatnonzero(cells)
    node = np.cumsum(cells) - 1  # each cell's node
    # 3. per node: depth, token, parent, continuations through it, first continuation holding it
    depth = starts // n
    token = rows.T.ravel()[starts]
    parent = np.where(depth > 0, node[starts - n], -1)  # the node of the same row one depth up
    count = np.add.reduceat((rows >= 0).T.ravel(), starts)  # 0: past every continuation's end
    first = np.minimum.reduceat(np.tile(order, width), starts)
    # 4. rank the nodes by (-count, depth, first seen) and keep max_nodes; a parent ranks before
    #    its children (it counts at least as many continuations and is shallower)
    nodes = np.flatnonzero(count)
    kept = nodes[np.lexsort((first[nodes], depth[nodes], -count[nodes]))][:max_nodes]
    position = np.zeros(len(starts) + 1, dtype=np.int64)  # node -> draft tree node; [-1]: the root's 0
    position[kept] = np.arange(1, len(kept) + 1)
    return DraftTree([root, *token[kept].tolist()], (-1, *position[parent[kept]].tolist()))


@dataclass
class RestStats:
    """What the lookups did in one generation."""

    lookups: int = 0  # datastore searches (steps with room for a draft)
    hits: int = 0  # ...that found a suffix of at least min_suffix tokens
    matched: int = 0  # tokens matched, summed over hits
    probes: int = 0  # suffix comparisons made by the binary searches
    seconds: float = 0.0  # host time in lookups and tree building (perf_counter)


class Rest(Method):
    """REST: drafts retrieved from a token datastore, verified as a tree."""

    config_class = RestConfig
    needs = (DATASTORE,)
    main_settings = ("max_nodes", "copy_tokens")
    cfg: RestConfig
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)

    def __init__(self, cfg: RestConfig, engine: Engine, sampling: SamplingConfig, datastore: Optional[Datastore] = None):
        super().__init__(cfg, engine, sampling)
        if not 1 <= cfg.min_suffix <= cfg.max_suffix:
            raise ValueError(f"method.rest: need 1 <= min_suffix <= max_suffix, got {cfg.min_suffix} and {cfg.max_suffix}")
        if cfg.copy_tokens < 1 or cfg.max_candidates < 1 or cfg.max_nodes < 1:
            raise ValueError("method.rest: copy_tokens, max_candidates and max_nodes must be at least 1")
        if datastore is None:
            path = resolve_repo_path(cfg.datastore) if cfg.datastore else default_datastore_dir()
            datastore = Datastore.load(path)
            check_datastore(datastore, engine, str(path))
        self.store = datastore

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The steps; the ``LoopEnd``'s cache then holds prompt + tokens but the last."""
        self.check_context(len(prompt_ids), stop)
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed)
        stats = RestStats()
        # 1. prefill: the prompt's last row gives the first token (the first tree's root)
        verifier.prefill()
        reach = self.cfg.max_suffix  # the longest suffix the next lookup can match
        while not verifier.done:
            # 2. retrieve continuations of the longest matching context suffix; a frequency tree of them
            before = len(verifier.seq)
            tree, reach = self.propose(verifier.seq, verifier.room(), reach, stats)
            # 3. one target forward over the tree, acceptance, commit, cache compaction
            verifier.verify(tree)
            # 4. a suffix that occurs, less the tokens just committed, is one that occurred before them
            reach += len(verifier.seq) - before
        return LoopEnd(verifier.result(extra=self.describe(stats)), verifier.cache)

    def propose(self, seq: list[int], room: int, reach: int, stats: RestStats) -> tuple[DraftTree, int]:
        """The step's draft tree below ``seq[-1]`` (the root alone when nothing matches) and the
        longest suffix of ``seq`` that occurs (at most ``reach``; under ``min_suffix``: min_suffix - 1)."""
        cfg = self.cfg
        if room <= 0:
            return DraftTree([seq[-1]], (-1,)), reach
        start = time.perf_counter()
        stats.lookups += 1
        with self.engine.phase("tree"):
            match = self.store.longest_match(seq, cfg.min_suffix, min(reach, cfg.max_suffix))
            tree = DraftTree([seq[-1]], (-1,))
            if match is not None:
                stats.hits += 1
                stats.matched += match.length
                stats.probes += match.probes
                rows = self.store.continuations(match, cfg.max_candidates, min(cfg.copy_tokens, room))
                tree = frequency_tree(seq[-1], rows, cfg.max_nodes)
        stats.seconds += time.perf_counter() - start
        return tree, match.length if match is not None else cfg.min_suffix - 1

    def describe(self, stats: RestStats) -> dict:
        return {
            "datastore_tokens": len(self.store),
            "datastore_mib": round(self.store.nbytes / 2**20, 2),
            "lookups": stats.lookups,
            "hits": stats.hits,
            "mean_match_length": stats.matched / stats.hits if stats.hits else 0.0,
            "lookup_probes": stats.probes,
            "lookup_ms_mean": 1000 * stats.seconds / stats.lookups if stats.lookups else 0.0,  # host time, information only
        }


def check_datastore(store: Datastore, engine: Engine, where: str) -> None:
    """Refuse a datastore whose token ids are not the model's (another tokenizer)."""
    info = store.manifest.get("tokenizer", {})
    fix = "rebuild it with the model's tokenizer: harness datastore build tokenizer=<model> inputs=[...]"
    if engine.tokenizer is not None and info.get("fingerprint"):
        if tokenizer_fingerprint(engine.tokenizer) != info["fingerprint"]:
            raise DatastoreError(f"datastore {where} was tokenised with {info.get('path')}, not the model's tokenizer; {fix}")
    top = store.manifest.get("max_token", -1)
    if top >= engine.config.vocab_size:
        raise DatastoreError(f"datastore {where} holds token id {top}, past the model's vocabulary of "
                             f"{engine.config.vocab_size}; {fix}")  # fmt: skip
