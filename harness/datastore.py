"""Retrieval datastores (REST): a token corpus as a suffix array, searched by binary search.

On disk, one directory (``harness datastore build``, harness/cli_datastore.py)::

    tokens.npy     the corpus's tokens, one stream (every document ends with a separator,
                   the tokenizer's EOS), int32 stored big-endian ('>i4'): token ids are >= 0,
                   so the bytes of a slice compare exactly as its token sequence does and the
                   search compares bytes
    sa.npy         int32 suffix array: sa[r] = start of the r-th smallest suffix of tokens
                   (a suffix that is a prefix of another is the smaller)
    manifest.json  sources, tokenizer (path, vocabulary size, fingerprint), token count, bytes,
                   build seconds, format version

Construction: prefix doubling (Manber & Myers, with Larsson & Sadakane's skip of finished
groups; numpy sorts): after round j every suffix has the rank of its first 2^j tokens; one
sort of (rank[i], rank[i + 2^j]) pairs over the suffixes not yet alone in their group gives
the ranks of the first 2^(j+1). log2(longest repeat) rounds, each O(m log m) for the m
suffixes still sorted (all of them only in the first rounds).

Lookup: the suffixes starting with a pattern form one range of the suffix array (two binary
searches); the longest context suffix that occurs is found by a binary search over its
length (a pattern that occurs has every suffix of it occurring too), each length tried costing
one binary search (the range's start), the longest allowed length tried first (a caller that
bounds it by the last match plus the tokens added since often meets the bound), the range's
end searched once for the length found. Every search starts inside the range of the pattern's
first token (the suffixes starting with token t: one per occurrence of t, counted at load).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from harness.errors import HarnessError
from harness.paths import default_cache_dir, load_json_file, replace_dir

FORMAT = 1
TOKENS_FILE, SA_FILE, MANIFEST_FILE = "tokens.npy", "sa.npy", "manifest.json"
TOKEN_DTYPE = np.dtype(">i4")  # big-endian: byte order = token order for ids >= 0


class DatastoreError(HarnessError):
    """A datastore that is missing or does not fit the model (one line: the problem and the fix)."""


def default_datastore_dir(name: str = "zoo") -> Path:
    """``$HARNESS_CACHE/datastore/<name>`` (``$HARNESS_CACHE`` defaults to ``~/.cache/harness``)."""
    return default_cache_dir() / "datastore" / name


def suffix_array(tokens: Sequence[int] | np.ndarray) -> np.ndarray:
    """The suffix array of ``tokens`` (int64), by prefix doubling (module doc).

    Suffixes sit in groups of equal first ``width`` tokens, contiguous in ``order``; a suffix's
    rank is the position of its group's first member, so a group sorted on its own keeps
    every rank elsewhere valid. Each round sorts only the suffixes in groups of two or more
    by (group, rank of the suffix ``width`` tokens further on) and splits the groups; a
    suffix alone in its group is at its final position. Most groups split in the first
    rounds, so the later ones (long repeats: duplicated files) sort few suffixes.
    """
    t = np.asarray(tokens, dtype=np.int64)
    n = len(t)
    order = np.argsort(t, kind="stable")  # by the first token
    key = t[order]
    rank = np.empty(n, dtype=np.int64)
    width = 1
    active = np.arange(n)  # positions in `order` of the suffixes still sorted, with their `key`
    while active.size:
        # split every active group on its keys (sorted within the group)
        first = np.concatenate(([True], key[1:] != key[:-1])) if key.size else key.astype(bool)
        run = np.flatnonzero(first)  # index in `active` where each new group starts
        group = np.cumsum(first) - 1  # new group of each active suffix
        rank[order[active]] = active[run][group]  # position of the new group's first member
        size = np.diff(np.append(run, active.size))[group]
        active = active[size > 1]
        if not active.size:
            break
        # next round: sort the suffixes of groups of 2+ by (group rank, rank `width` further on)
        starts = order[active]
        later = starts + width
        second = np.where(later < n, rank[np.minimum(later, n - 1)] + 1, 0)  # 0: the suffix ends first
        pair = rank[starts] * (n + 1) + second
        perm = np.argsort(pair)  # within groups: the group rank leads
        order[active] = starts[perm]
        key = pair[perm]
        width *= 2
    return order


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of a tokenizer's vocabulary (id -> token): equal vocabularies, equal ids."""
    vocab = sorted((i, t) for t, i in tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


@dataclass
class Match:
    """Where the longest matching context suffix occurs in the datastore."""

    length: int  # tokens matched (the last `length` tokens of the context)
    lo: int  # suffix array range [lo, hi): the suffixes that start with them
    hi: int
    probes: int  # suffix comparisons the search made (its cost, as a count)

    @property
    def count(self) -> int:
        return self.hi - self.lo


class Datastore:
    """A loaded datastore: tokens, suffix array and manifest."""

    def __init__(self, tokens: np.ndarray, sa: np.ndarray, manifest: Optional[dict] = None):
        if len(tokens) != len(sa):
            raise DatastoreError(f"datastore has {len(tokens)} tokens but a suffix array of {len(sa)}; rebuild it")
        self.tokens = np.asarray(tokens).astype(TOKEN_DTYPE, copy=False)
        self.sa = np.asarray(sa)
        self.manifest = manifest or {}
        # what the binary search reads, as Python sequences (no numpy scalar per probe)
        self._bytes = memoryview(np.ascontiguousarray(self.tokens)).cast("B")
        self._starts = memoryview(np.ascontiguousarray(self.sa, dtype=np.int32)).cast("B").cast("i")
        # the suffixes that start with token t are ranks [_first[t], _first[t + 1]): one per occurrence of t
        counts = np.bincount(self.tokens.astype(np.int32)) if len(self.tokens) else np.zeros(0, dtype=np.int64)
        self._first = [0, *np.cumsum(counts).tolist()]

    @classmethod
    def from_tokens(cls, tokens: Sequence[int] | np.ndarray, manifest: Optional[dict] = None) -> "Datastore":
        """An in-memory datastore (tests, small corpora)."""
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size and arr.min() < 0:
            raise ValueError("token ids must be >= 0")
        return cls(arr.astype(TOKEN_DTYPE), suffix_array(arr).astype(np.int32), manifest)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Datastore":
        d = Path(path).expanduser()
        if not (d / MANIFEST_FILE).exists():
            raise DatastoreError(
                f"no REST datastore at {d}; build one with `harness datastore build` "
                "(or point method.rest.datastore=<dir> at one)"
            )
        fix = "rebuild it with `harness datastore build force=true`"
        manifest = load_json_file(d / MANIFEST_FILE, "datastore manifest", fix, error=DatastoreError)
        if manifest.get("format") != FORMAT:
            raise DatastoreError(f"datastore {d} has format {manifest.get('format')}, this harness reads {FORMAT}; "
                                 "rebuild it with `harness datastore build force=true`")  # fmt: skip
        # read into memory: a binary search touches random pages, and page faults on a memory
        # map made lookups about twice as slow (132 MiB for the zoo corpus)
        arrays = []
        for name in (TOKENS_FILE, SA_FILE):
            try:
                arrays.append(np.load(d / name))
            except (OSError, ValueError, EOFError) as exc:
                raise DatastoreError(f"datastore file {d / name} cannot be read ({type(exc).__name__}: "
                                     f"{str(exc).splitlines()[0] if str(exc) else 'damaged'}); {fix}") from None
        tokens, sa = arrays
        if sa.shape != tokens.shape:
            raise DatastoreError(f"datastore {d}: {SA_FILE} has {sa.size} entries for {tokens.size} tokens; {fix}")
        return cls(tokens, sa, manifest)

    def save(self, path: str | os.PathLike) -> None:
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        np.save(d / TOKENS_FILE, self.tokens)
        np.save(d / SA_FILE, np.asarray(self.sa, dtype=np.int32))
        self.manifest["bytes"] = sum((d / f).stat().st_size for f in (TOKENS_FILE, SA_FILE))
        (d / MANIFEST_FILE).write_text(json.dumps(self.manifest, indent=1) + "\n")

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def nbytes(self) -> int:
        return int(self.tokens.nbytes + self.sa.nbytes)

    # ---- search --------------------------------------------------------------------------
    def _prefix(self, rank: int, m: int) -> bytes:
        start = 4 * self._starts[rank]
        return bytes(self._bytes[start : start + 4 * m])  # big-endian: bytes order = token order

    def _bucket(self, token: int) -> tuple[int, int]:
        """The suffix array range of the suffixes that start with ``token``."""
        if token + 1 < len(self._first):
            return self._first[token], self._first[token + 1]
        return len(self.sa), len(self.sa)  # a token past the corpus's largest: none, at the end

    def _lower_bound(self, key: bytes, m: int, lo: int, hi: int) -> tuple[int, int]:
        """(the first rank in [lo, hi) whose suffix's first ``m`` tokens are >= ``key``, else hi; probes)."""
        probes = 0
        while lo < hi:
            mid = (lo + hi) // 2
            probes += 1
            if self._prefix(mid, m) < key:
                lo = mid + 1
            else:
                hi = mid
        return lo, probes

    def _upper_bound(self, key: bytes, m: int, lo: int, hi: int) -> tuple[int, int]:
        """(the first rank in [lo, hi) whose suffix's first ``m`` tokens are > ``key``, else hi; probes)."""
        probes = 0
        while lo < hi:
            mid = (lo + hi) // 2
            probes += 1
            if self._prefix(mid, m) <= key:
                lo = mid + 1
            else:
                hi = mid
        return lo, probes

    def find(self, pattern: Sequence[int]) -> tuple[int, int, int]:
        """(lo, hi, probes): the suffix array range of the suffixes that start with ``pattern``."""
        key, m = np.asarray(pattern, dtype=TOKEN_DTYPE).tobytes(), len(pattern)
        lo, hi = self._bucket(int(pattern[0])) if m else (0, len(self.sa))
        first, p1 = self._lower_bound(key, m, lo, hi)
        last, p2 = self._upper_bound(key, m, first, hi)
        return first, last, p1 + p2

    def longest_match(self, context: Sequence[int], min_len: int, max_len: int) -> Optional[Match]:
        """The longest suffix of ``context`` (``min_len`` to ``max_len`` tokens) that occurs
        followed by at least one token; None when not even ``min_len`` tokens do. Each length
        tried costs one binary search (the range's start); the range's end is searched once,
        for the length found."""
        tail = np.asarray(context[len(context) - min(max_len, len(context)) :], dtype=TOKEN_DTYPE).tobytes()
        lo_len, hi_len = min_len, len(tail) // 4
        found, probes = None, 0  # (length, key, first rank, its first token's range end) of the longest so far
        m = hi_len  # the longest first: a caller's bound is often met (a match that goes on)
        while lo_len <= hi_len:  # occurs(m) is monotone: a suffix of an occurring pattern occurs
            key = tail[len(tail) - 4 * m :]
            lo, hi = self._bucket(int(context[len(context) - m]))
            first, p = self._lower_bound(key, m, lo, hi)
            probes += p
            # it occurs with a token after it: at `first` short of the corpus's end, or again at first + 1
            at = [r for r in (first, first + 1) if r < len(self.sa) and self._prefix(r, m) == key]
            if at and (len(at) == 2 or int(self.sa[first]) + m < len(self.tokens)):
                found, lo_len = (m, key, first, hi), m + 1
            else:
                hi_len = m - 1
            m = (lo_len + hi_len) // 2
        if found is None:
            return None
        m, key, first, hi = found
        last, p = self._upper_bound(key, m, first, hi)
        return Match(m, first, last, probes + p)

    def continuations(self, match: Match, count: int, length: int) -> np.ndarray:
        """Up to ``count`` continuations (``length`` tokens at most) of the matched suffix, one
        int64 row each, -1 past the corpus's end: all when it occurs at most ``count`` times,
        else ``count`` occurrences evenly spread over its suffix array range (equal
        continuations are adjacent there, so the spread keeps their frequencies). Empty ones
        (the corpus's end) are dropped."""
        n = match.count
        ranks = np.arange(match.lo, match.hi) if n <= count else match.lo + (np.arange(count) * n) // count
        cells = self.sa[ranks].astype(np.int64)[:, None] + match.length + np.arange(length)  # [rows, length]
        inside = cells < len(self.tokens)
        rows = np.where(inside, self.tokens[np.where(inside, cells, 0)], -1).astype(np.int64)
        return rows[inside[:, 0]]


def build(tokens: np.ndarray, sources: list[dict], tokenizer: dict, out: Path, log=print) -> Datastore:
    """Suffix array of ``tokens`` and the manifest, written to ``out`` (replacing it)."""

    arr = np.asarray(tokens, dtype=np.int64)
    if arr.size == 0:
        raise ValueError("no tokens to build a datastore from")
    if arr.size >= 2**31:
        raise ValueError(f"{arr.size:,} tokens: an int32 suffix array holds at most 2^31 - 1; set max_tokens=...")
    t0 = time.perf_counter()
    sa = suffix_array(arr).astype(np.int32)
    seconds = time.perf_counter() - t0
    manifest = {
        "format": FORMAT,
        "sources": sources,
        "tokenizer": tokenizer,
        "tokens": int(arr.size),
        "max_token": int(arr.max()),
        "build_seconds": round(seconds, 2),
        "suffix_array": "prefix doubling (numpy), int32",
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    store = Datastore(arr.astype(TOKEN_DTYPE), sa, manifest)
    tmp = out.with_name(f".{out.name}.tmp")
    if tmp.exists():
        import shutil  # noqa: PLC0415

        shutil.rmtree(tmp)
    store.save(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    replace_dir(tmp, out)
    log(f"[datastore] {arr.size:,} tokens, suffix array in {seconds:.1f} s, {manifest['bytes'] / 2**20:.1f} MiB -> {out}")
    return store
