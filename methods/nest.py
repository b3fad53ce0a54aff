"""NEST (Li et al. 2024, nearest-neighbour speculative decoding): drafts copied from a corpus
found by token-level kNN over the target's hidden states, every accepted span attributed to
the document it came from.

The datastore is a REST datastore (harness/datastore.py) with kNN keys beside it
(harness/neighbours.py: the target's hidden state before each corpus token), built by
``harness datastore build name=nest keys=<the model>``. One step:

  1. search: the k keys nearest to the hidden state that chose the last committed token (strict:
     among the keys whose own next token is that same token, one block of the keys grouped by
     token, harness/neighbours.py ``TokenKeys``; relaxed: among all keys);
  2. draft: the neighbours whose own next token is that same token lend the ``span`` tokens
     that followed it in their document (cut at the document's end);
  3. verify (two modes):
     - ``strict`` (lossless): the continuations as a frequency trie (REST's), verified by the
       shared tree step (methods/tree.py) against the plain target: greedy = the longest path
       the target's argmax agrees with; sampling = the tree step's exact rule;
     - ``relaxed`` (the paper's; LOSSY, every Generation marked so): the next-token
       distribution is the mixture p_M = lambda * p_kNN + (1 - lambda) * p_LM at every verified
       position (p_kNN: softmax(-distance / temperature) of the k neighbours, summed per token;
       lambda = exp(-nearest distance / lambda_scale), the retrieval's confidence); the
       nearest neighbour's span is proposed only when lambda >= span_threshold, and its tokens
       are accepted while p_M(token) >= relaxation * max p_M (relaxed acceptance); then the
       mixture's argmax;
  4. attribution: every accepted draft token is credited to the document of the nearest
     neighbour whose continuation holds the accepted path (``attribution_rate``: the share of
     the output so credited; ``documents``: how many documents were cited).

Where this differs from the paper: the paper retrieves passages first (a dense retriever) and
runs the kNN inside them; here the kNN is exact over the whole (small) datastore, and strict
mode searches only the keys whose next token is the committed one (the ones it can use). The
paper's confidence is its "relative retrieval confidence" of the neighbour distances; here it
is exp(-d_1 / lambda_scale) of the nearest (normalised) distance. Distances are L2 divided by
sqrt(hidden size). The paper samples or decodes greedily from the mixture; the relaxed mode
here is greedy only, and its first token (the prompt's row) is the target's own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from harness.config import MethodConfig, SamplingConfig
from harness.datastore import Datastore, default_datastore_dir
from harness.engine import Engine
from harness.neighbours import KeyIndex, Neighbours, TokenKeys
from harness.paths import resolve_repo_path
from harness.stops import StopRule
from methods.base import KNN_DATASTORE, Generation, LoopEnd, Method
from methods.rest import check_datastore, frequency_tree
from methods.tree import DraftTree, TreeShape, TreeVerifier

MODES = ("strict", "relaxed")


@dataclass
class NestConfig(MethodConfig):
    name: str = "nest"
    datastore: str = ""  # datastore dir with kNN keys ("" = $HARNESS_CACHE/datastore/nest: `harness datastore build name=nest keys=...`)
    mode: str = "strict"  # strict (target-verified, lossless) | relaxed (the paper's mixture + relaxed acceptance, LOSSY)
    neighbours: int = 16  # k of the kNN search
    span: int = 6  # tokens copied after a neighbour: the draft's depth
    max_nodes: int = 16  # strict: draft tree nodes kept (the most frequent among the neighbours' continuations)
    temperature: float = 0.1  # relaxed: p_kNN = softmax(-distance / temperature) (distance = L2 / sqrt(hidden))
    # relaxed: mixture weight lambda = exp(-nearest distance / lambda_scale). 1.0: on the zoo's nest datastore the
    # nearest distances of 3 tuning-split prompts' states are 1.09 / 1.86 / 2.93 (5% / median / 95%), so lambda
    # runs 0.34 / 0.16 / 0.05 (0.1 left it at 0: the mixture never acted)
    lambda_scale: float = 1.0
    span_threshold: float = 0.25  # relaxed: a span is proposed only when lambda >= this (else one token per step)
    relaxation: float = 0.5  # relaxed: accept a span token when p_M(token) >= relaxation * max p_M (1 = exact argmax)


@dataclass
class Candidates:
    """The continuations of the neighbours that predicted the last token, nearest first."""

    rows: np.ndarray  # [n, length] int64: the tokens that followed in the neighbour's document, -1 past its end
    documents: np.ndarray  # [n] the document each row comes from

    def __len__(self) -> int:
        return len(self.rows)

    def first(self) -> list[int]:
        """The nearest neighbour's continuation (empty when there is none)."""
        return [t for t in self.rows[0].tolist() if t >= 0] if len(self) else []


@dataclass
class NestStats:
    """What retrieval did in one generation."""

    searches: int = 0  # kNN searches made for drafts
    drafts: int = 0  # ...that gave at least one candidate
    attributed: int = 0  # output tokens credited to a document (accepted draft tokens)
    documents: set[int] = field(default_factory=set)  # documents credited
    mixture_lambda: list[float] = field(default_factory=list)  # relaxed: lambda at each committed step's last row


def spans_after(tokens: np.ndarray, count: int, span: int, eos: np.ndarray) -> np.ndarray:
    """[count, span] int64: row p holds the ``span`` tokens after corpus position p, -1 past the
    corpus's end or past its document's end (the document's EOS is its last token)."""
    cells = np.arange(count)[:, None] + 1 + np.arange(span)
    rows = np.where(cells < len(tokens), tokens[np.minimum(cells, len(tokens) - 1)], -1)
    ended = np.isin(rows, eos)
    rows[np.cumsum(ended, axis=1) - ended > 0] = -1  # an EOS before the cell
    return rows


class Nest(Method):
    """NEST: spans retrieved by kNN over the target's hidden states in a datastore, verified as a tree (strict) or relaxed (lossy)."""

    config_class = NestConfig
    needs = (KNN_DATASTORE,)
    main_settings = ("mode", "datastore")
    lossy_when = "mode=relaxed"  # shown by `harness list`
    cfg: NestConfig
    verifier_class = TreeVerifier  # the shared tree step (a test swaps in a broken one as its negative control)

    def __init__(self, cfg: NestConfig, engine: Engine, sampling: SamplingConfig, datastore: Optional[Datastore] = None,
                 keys: Optional[KeyIndex] = None):  # fmt: skip
        super().__init__(cfg, engine, sampling)
        if cfg.mode not in MODES:
            raise ValueError(f"method.nest.mode={cfg.mode!r}: use strict (lossless) or relaxed (the paper's, lossy)")
        if cfg.mode == "relaxed" and sampling.do_sample:
            raise ValueError("method.nest.mode=relaxed decodes greedily; set method.nest.mode=strict to sample")
        if cfg.neighbours < 1 or cfg.span < 1 or cfg.max_nodes < 1:
            raise ValueError("method.nest: neighbours, span and max_nodes must be at least 1")
        if not 0 < cfg.relaxation <= 1:
            raise ValueError(f"method.nest.relaxation={cfg.relaxation}: give a value in (0, 1]")
        if datastore is None or keys is None:
            path = resolve_repo_path(cfg.datastore) if cfg.datastore else default_datastore_dir("nest")
            datastore = Datastore.load(path)
            check_datastore(datastore, engine, str(path))
            keys = KeyIndex.load(path)
        hidden = engine.model.get_output_embeddings().weight.shape[1]
        if keys.hidden_size != hidden:
            raise ValueError(f"the datastore's kNN keys have size {keys.hidden_size}, the model's hidden states "
                             f"{hidden}: build them with this model (harness datastore build keys=<model>)")  # fmt: skip
        self.store, self.keys = datastore, keys
        self.tokens = datastore.tokens.astype("int64")  # corpus tokens (host order)
        # the ``span`` tokens after every keyed corpus position, -1 past its document's end (built once)
        self.after = spans_after(self.tokens, int(keys.positions.max()) + 1 if len(keys) else 0, cfg.span,
                                 np.array(sorted(engine.eos_ids), dtype=np.int64))  # fmt: skip
        self.by_token = TokenKeys(keys, self.tokens) if cfg.mode == "strict" else None  # strict's search
        self.scale = math.sqrt(hidden)  # distances are L2 / sqrt(hidden)

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        return self.loop(prompt_ids, stop, seed).generation

    @torch.inference_mode()
    def loop(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> LoopEnd:
        """The steps; the ``LoopEnd``'s cache then holds prompt + tokens but the last."""
        self.check_context(len(prompt_ids), stop)
        verifier = self.verifier_class(self.engine, self.sampling, stop, prompt_ids, seed, hidden=True)
        relaxed = self.cfg.mode == "relaxed"
        stats = NestStats()
        # 1. prefill: the prompt's last row gives the first token and the first query
        query = verifier.prefill().hidden[-1:]
        while not verifier.done:
            # 2. search the keys near the state that chose the last token; their continuations as a tree
            with self.engine.phase("tree"):
                found = self.search(query, verifier.seq[-1]) if verifier.room() > 0 else None
                candidates = self.candidates(verifier.seq[-1], found, max(verifier.room(), 0))
                stats.searches += found is not None
                stats.drafts += len(candidates) > 0
                if relaxed:  # the nearest span, when the retrieval is confident
                    confident = found is not None and self.confidence(found)[0] >= self.cfg.span_threshold
                    chain = candidates.first() if confident else []
                    tree = DraftTree([verifier.seq[-1], *chain], tuple(range(-1, len(chain))))
                else:  # a frequency trie of the continuations
                    tree = frequency_tree(verifier.seq[-1], candidates.rows, self.cfg.max_nodes)
            # 3. verify: against the target (strict), or by the mixture and relaxed acceptance (relaxed)
            if relaxed:
                step = verifier.verify(tree, lambda t, s, logits, _gen: self.relaxed_accept(t, s, logits, verifier, stats))
            else:
                step = verifier.verify(tree)
            # 4. credit the accepted draft tokens to a document; the last kept row is the next query
            self.attribute([int(tree.tokens[n]) for n in step.nodes[1:]], candidates, stats)
            query = step.hidden[-1:]
        extra = self.describe(stats, len(verifier.out.tokens))
        return LoopEnd(verifier.result(lossy=relaxed, extra=extra), verifier.cache)

    # ---- retrieval -------------------------------------------------------------------------
    def search(self, hidden: torch.Tensor, last: Optional[int] = None) -> Neighbours:
        """The neighbours of ``hidden``'s rows: among the keys that predict ``last`` (strict's
        drafts) or, for the mixture, among all keys (``last`` None or relaxed mode)."""
        if last is not None and self.by_token is not None:
            found = self.by_token.search(hidden, self.cfg.neighbours, last)
        else:
            found = self.keys.search(hidden, self.cfg.neighbours)
        found.distances = found.distances / self.scale
        return found

    def candidates(self, last: int, found: Optional[Neighbours], room: int) -> Candidates:
        """Continuations of the neighbours (nearest first) whose next token is ``last``: up to
        ``span`` (and ``room``) tokens after it, within its document (its EOS the last)."""
        if found is None:
            return Candidates(np.zeros((0, 0), dtype=np.int64), np.zeros(0, dtype=np.int64))
        positions, documents = found.positions[0].numpy(), found.documents[0].numpy()
        keep = self.tokens[positions] == last
        rows = self.after[positions[keep], : min(self.cfg.span, room)]
        nonempty = rows[:, 0] >= 0 if rows.shape[1] else np.zeros(len(rows), dtype=bool)
        return Candidates(rows[nonempty], documents[keep][nonempty])

    def attribute(self, accepted: list[int], candidates: Candidates, stats: NestStats) -> None:
        """Credit ``accepted`` draft tokens to the nearest candidate that holds them."""
        if not accepted:
            return
        holds = np.flatnonzero((candidates.rows[:, : len(accepted)] == accepted).all(axis=1))
        if len(holds):
            stats.attributed += len(accepted)
            stats.documents.add(int(candidates.documents[holds[0]]))

    # ---- the mixture (relaxed mode) -----------------------------------------------------------
    def confidence(self, found: Neighbours) -> torch.Tensor:
        """lambda per query: exp(-nearest distance / lambda_scale)."""
        return torch.exp(-found.distances[:, 0] / self.cfg.lambda_scale)

    def mixture(self, logits: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(p_M [rows, vocab], lambda [rows]) for rows of target logits and their hidden states."""
        found = self.search(hidden)
        weights = torch.softmax(-found.distances / self.cfg.temperature, dim=-1)  # [rows, k]
        values = torch.as_tensor(self.tokens)[found.positions]  # the token each neighbour predicted
        p_knn = torch.zeros(logits.shape, dtype=torch.float32).scatter_add_(1, values, weights)
        lam = self.confidence(found)
        p_lm = torch.softmax(logits.float().cpu(), dim=-1)
        return lam[:, None] * p_knn + (1 - lam[:, None]) * p_lm, lam

    def relaxed_accept(self, tree: DraftTree, shape: TreeShape, logits: torch.Tensor, verifier: TreeVerifier,
                       stats: NestStats) -> tuple[list[int], list[int]]:  # fmt: skip
        """Relaxed acceptance along the chain: node i+1 is kept while p_M(its token) at node i is
        at least ``relaxation`` times that row's largest p_M; then the mixture's argmax."""
        p, lam = self.mixture(logits, verifier.output.hidden)
        ids = list(tree.tokens)
        a = 0
        while a + 1 < len(ids) and float(p[a, ids[a + 1]]) >= self.cfg.relaxation * float(p[a].max()):
            a += 1
        stats.mixture_lambda.append(float(lam[a]))
        return list(range(a + 1)), ids[1 : a + 1] + [int(p[a].argmax())]

    def describe(self, stats: NestStats, produced: int) -> dict:
        lam = stats.mixture_lambda
        return {
            "mode": self.cfg.mode,
            "datastore_tokens": len(self.store),
            "knn_keys": len(self.keys),
            "searches": stats.searches,
            "drafts": stats.drafts,
            "attributed_tokens": stats.attributed,
            "attribution_rate": stats.attributed / produced if produced else 0.0,
            "documents_cited": len(stats.documents),
            "mean_lambda": sum(lam) / len(lam) if lam else None,
        }
