"""Token-level kNN keys beside a retrieval datastore (NEST): the model's hidden states.

A datastore directory (harness/datastore.py) may also hold, for the first ``max_keys`` tokens of
its corpus::

    keys.npy        float16 [K, hidden]: the model's last hidden state just before token
                    ``positions[i]`` (the state whose LM head predicts that token)
    positions.npy   int32 [K]: the corpus position of the token each key predicts
    documents.npy   int32 [K]: the document that token belongs to (documents end with the
                    separator, the tokenizer's EOS), for attribution
    keys.json       the model, hidden size, window, count, seconds

Keys are computed in windows of ``window`` tokens that start at document starts where they can
(a document longer than a window is cut into windows; each window is read from a fresh cache),
so a key has read at most ``window`` tokens of its own document and nothing of another.

``KeyIndex.search(queries, k)`` is exact (brute-force) L2 search over all keys: the datastores
here are small (some 10^5 keys), where one matrix product per query costs less than an index.
``TokenKeys`` holds the same keys grouped by the token each one predicts (one contiguous block
per token, sorted once): ``TokenKeys.search(query, k, token)`` is the exact search among the keys
of one token, a matrix product over that block only (on the zoo's nest datastore 548 keys on
average, weighted by how often a token occurs, against 49,803 in all).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from harness.engine import Engine
from harness.progress import Progress

KEYS_FILE, POSITIONS_FILE, DOCUMENTS_FILE, KEYS_MANIFEST = "keys.npy", "positions.npy", "documents.npy", "keys.json"


class KeysMissing(FileNotFoundError):
    """A datastore without kNN keys (one line: what and how to build them)."""


@dataclass
class Neighbours:
    """The k nearest keys of each query, nearest first."""

    distances: torch.Tensor  # [Q, k] L2 distances
    positions: torch.Tensor  # [Q, k] corpus position of the token each neighbour predicted
    documents: torch.Tensor  # [Q, k] document of that token


class KeyIndex:
    """Hidden-state keys of a token corpus, searched exactly."""

    def __init__(self, keys: np.ndarray | torch.Tensor, positions: np.ndarray, documents: np.ndarray,
                 manifest: Optional[dict] = None):  # fmt: skip
        if not len(keys) == len(positions) == len(documents):
            raise ValueError(f"{len(keys)} keys for {len(positions)} positions and {len(documents)} documents")
        self.keys = torch.as_tensor(np.asarray(keys), dtype=torch.float32)
        self.norms = (self.keys * self.keys).sum(dim=1)  # |k|^2, once
        self.positions = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        self.documents = torch.as_tensor(np.asarray(documents, dtype=np.int64))
        self.manifest = manifest or {}

    def __len__(self) -> int:
        return len(self.positions)

    @property
    def hidden_size(self) -> int:
        return int(self.keys.shape[1])

    @classmethod
    def load(cls, directory: str | Path) -> "KeyIndex":
        d = Path(directory)
        if not (d / KEYS_FILE).exists():
            raise KeysMissing(f"datastore {d} has no kNN keys; build them with: harness datastore build "
                              f"out={d} keys=<the model> (or name=<name> keys=...)")  # fmt: skip
        manifest = json.loads((d / KEYS_MANIFEST).read_text()) if (d / KEYS_MANIFEST).exists() else {}
        return cls(np.load(d / KEYS_FILE), np.load(d / POSITIONS_FILE), np.load(d / DOCUMENTS_FILE), manifest)

    def save(self, directory: str | Path) -> None:
        d = Path(directory)
        np.save(d / KEYS_FILE, self.keys.numpy().astype(np.float16))
        np.save(d / POSITIONS_FILE, self.positions.numpy().astype(np.int32))
        np.save(d / DOCUMENTS_FILE, self.documents.numpy().astype(np.int32))
        (d / KEYS_MANIFEST).write_text(json.dumps(self.manifest, indent=1) + "\n")

    def search(self, queries: torch.Tensor, k: int) -> Neighbours:
        """The ``k`` nearest keys (L2) of each row of ``queries`` [Q, hidden]."""
        arrays = (self.keys.numpy(), self.norms.numpy(), self.positions.numpy(), self.documents.numpy())
        return nearest(queries, *arrays, k)


class TokenKeys:
    """The keys of a ``KeyIndex`` grouped by the token each one predicts, for exact search among
    the keys of one token."""

    def __init__(self, index: KeyIndex, corpus: np.ndarray):
        label = np.asarray(corpus, dtype=np.int64)[index.positions.numpy()]  # the token each key predicts
        order = np.argsort(label, kind="stable")  # one block per token, corpus order inside it
        self.keys = np.ascontiguousarray(index.keys.numpy()[order])
        self.norms = index.norms.numpy()[order]
        self.positions = index.positions.numpy()[order]
        self.documents = index.documents.numpy()[order]
        self.blocks = {}  # token -> [start, end) of its block
        start = 0
        for token, count in enumerate(np.bincount(label).tolist() if len(label) else []):
            if count:
                self.blocks[token] = (start, start + count)
            start += count

    def search(self, query: torch.Tensor, k: int, token: int) -> Neighbours:
        """The ``k`` nearest keys (L2) to ``query`` [1, hidden] among those that predict ``token``."""
        start, end = self.blocks.get(token, (0, 0))
        part = slice(start, end)
        return nearest(query, self.keys[part], self.norms[part], self.positions[part], self.documents[part], k)


def nearest(queries: torch.Tensor, keys: np.ndarray, norms: np.ndarray, positions: np.ndarray,
            documents: np.ndarray, k: int) -> Neighbours:  # fmt: skip
    """Exact L2 search: the ``k`` nearest of ``keys`` [K, hidden] (``norms``: their |k|^2) to each
    row of ``queries``, nearest first, with their positions and documents (numpy: a step's search
    is a few small operations, where each torch call costs more than its arithmetic)."""
    q = queries.detach().float().cpu().numpy().reshape(-1, keys.shape[1])
    d2 = norms - 2 * (q @ keys.T) + (q * q).sum(axis=1, keepdims=True)  # [Q, K]
    k = min(k, len(keys))
    if k == 0:
        best = np.zeros((len(q), 0), dtype=np.int64)
    else:  # the k smallest of each row, then in order
        best = np.argpartition(d2, k - 1, axis=1)[:, :k] if k < len(keys) else np.tile(np.arange(k), (len(q), 1))
        best = np.take_along_axis(best, np.argsort(np.take_along_axis(d2, best, axis=1), axis=1, kind="stable"), axis=1)
    dist = np.sqrt(np.maximum(np.take_along_axis(d2, best, axis=1), 0))
    return Neighbours(torch.from_numpy(dist), torch.from_numpy(positions[best]), torch.from_numpy(documents[best]))


def document_ids(tokens: np.ndarray, separators: set[int]) -> np.ndarray:
    """For every position, the number of separators before it (the document it belongs to; a
    separator belongs to the document it ends)."""
    is_sep = np.isin(np.asarray(tokens), list(separators)) if separators else np.zeros(len(tokens), dtype=bool)
    return np.concatenate(([0], np.cumsum(is_sep)[:-1])).astype(np.int64) if len(tokens) else np.zeros(0, np.int64)


def windows(documents: np.ndarray, window: int) -> list[tuple[int, int]]:
    """[start, end) spans of at most ``window`` tokens that never cross a document boundary."""
    spans = []
    bounds = np.flatnonzero(np.diff(documents)) + 1
    for start, end in zip(np.concatenate(([0], bounds)), np.concatenate((bounds, [len(documents)]))):
        for s in range(int(start), int(end), window):
            spans.append((s, min(s + window, int(end))))
    return spans


@torch.inference_mode()
def build_keys(engine: Engine, tokens: np.ndarray, max_keys: int = 0, window: int = 256, log=print) -> KeyIndex:
    """Keys for every token of ``tokens`` (the first ``max_keys`` when > 0) that has one before
    it in its window: the hidden state of the token before it."""
    tokens = np.asarray(tokens, dtype=np.int64)
    if max_keys > 0:
        tokens = tokens[: max_keys + 1]
    docs = document_ids(tokens, engine.eos_ids)
    t0 = time.perf_counter()
    keys, positions = [], []
    spans = [(start, end) for start, end in windows(docs, window) if end - start >= 2]
    with Progress(len(spans), "kNN keys", "window") as bar:
        for start, end in spans:
            bar.item(f"tokens {start:,}-{end:,}")
            out = engine.forward(tokens[start:end].tolist(), engine.new_cache(), hidden=True)
            keys.append(out.hidden[:-1].float().cpu())  # the state at j predicts token j + 1
            positions.append(torch.arange(start + 1, end))
            bar.advance()
    if not keys:
        raise ValueError("no keys: the corpus has no window of two tokens or more")
    pos = torch.cat(positions).numpy()
    manifest = {"model": engine.cfg.path or engine.cfg.name, "hidden_size": int(keys[0].shape[1]), "keys": int(len(pos)),
                "window": window, "seconds": round(time.perf_counter() - t0, 1), "dtype": "float16",
                "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}  # fmt: skip
    log(f"[datastore] {len(pos):,} kNN keys of size {manifest['hidden_size']} in {manifest['seconds']} s")
    # stored (and searched) at the precision it ships in
    return KeyIndex(torch.cat(keys).half().float(), pos, docs[pos], manifest)
