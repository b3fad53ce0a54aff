"""The KV cache every method's forwards go through, with rollback and compaction.

Only this module and the engine (harness/engine.py, harness/compiled.py) touch transformers'
cache internals.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class KVCache:
    """A transformers ``DynamicCache`` with the two edits speculative methods need.

    ``truncate(n)`` drops everything after the first n entries (rollback).
    ``keep(indices)`` makes the cache equal to ``cache[indices]`` along the sequence,
    moving only the entries that are not already in place (tree / SPACE compaction).

    Sliding-window layers (Mistral, Gemma 2/3, Qwen2 with a window) keep every entry here,
    not only the last window: a window-sized cache cannot roll back past what it dropped.
    The window is applied by the attention mask instead (``Engine.forward``).
    """

    def __init__(self, config):
        self.inner = DynamicCache(config=config)
        if any(self.inner.is_sliding):
            self.inner = DynamicCache()  # every layer a full one

    def __len__(self) -> int:
        return self.inner.get_seq_length()

    def truncate(self, length: int) -> None:
        if len(self) < length:
            raise ValueError(f"cannot truncate a cache of {len(self)} entries to {length}")
        # per layer, to an absolute length: after a LayerSkip or Injection forward the layers differ
        for layer in self.inner.layers:
            surplus = layer.get_seq_length() - length
            if surplus > 0:
                layer.crop(-surplus)

    @torch.inference_mode()
    def keep(self, indices: list[int] | torch.Tensor) -> None:
        idx = torch.as_tensor(indices, dtype=torch.long).flatten()
        n = len(self)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n or (idx[1:] <= idx[:-1]).any()):
            raise ValueError(f"keep() needs strictly increasing indices in [0, {n}), got {idx.tolist()}")
        target = torch.arange(idx.numel())
        moved = (idx != target).nonzero().flatten()
        start = int(moved[0]) if moved.numel() else idx.numel()  # entries before this one are already in place
        self._move(start, idx[start:])
        self.truncate(idx.numel())

    def keep_after(self, start: int, rows: list[int]) -> None:
        """``keep(list(range(start)) + rows)`` without building or checking the prefix: the
        first ``start`` entries stay, then the entries ``rows`` (strictly increasing, from
        ``start`` on). A tree step's compaction: prefix + accepted nodes."""
        n = len(self)
        if any(b <= a for a, b in zip([start - 1] + rows, rows)) or (rows and rows[-1] >= n):
            raise ValueError(f"keep_after({start}) needs strictly increasing rows in [{start}, {n}), got {rows}")
        first = next((i for i, r in enumerate(rows) if r != start + i), len(rows))  # rows already in place
        if first < len(rows):
            self._move(start + first, torch.tensor(rows[first:], dtype=torch.long))
        self.truncate(start + len(rows))

    @torch.inference_mode()
    def _move(self, start: int, src: torch.Tensor) -> None:
        """Entries ``src`` (a tensor of indices) copied to ``start``, ``start + 1``, ..."""
        if not src.numel():
            return
        for layer in self.inner.layers:
            for tensor in (layer.keys, layer.values):
                tensor[:, :, start : start + src.numel()] = tensor.index_select(2, src.to(tensor.device))
