"""The losslessness check: a method's token ids against greedy autoregressive decoding.

At the first differing index the reference model's top-1 minus top-2 logit margin is
computed (one extra forward, outside any timer). A margin below ``tie_margin`` is a
numerical tie (matmul shapes differ between 1-token and multi-token forwards); anything
else is a real mismatch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from harness.engine import Engine

EXACT, TIE, MISMATCH, NOT_CHECKED = "exact", "tie", "mismatch", "not-checked"


@dataclass
class Verdict:
    status: str  # exact | tie | mismatch | not-checked (lossy or sampling modes)
    first_diff: Optional[int] = None  # first index where the ids differ
    margin: Optional[float] = None  # reference top-1 minus top-2 logit at first_diff
    reference_token: Optional[int] = None  # reference id at first_diff (None: reference ended)
    method_token: Optional[int] = None  # method id at first_diff (None: method ended)

    @property
    def exact(self) -> bool:
        return self.status == EXACT


def first_difference(a: list[int], b: list[int]) -> Optional[int]:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def reference_margin(engine: Engine, prompt_ids: list[int], reference: list[int], index: int) -> float:
    """Top-1 minus top-2 logit of the reference model at generated position ``index``."""
    with torch.inference_mode():
        logits = engine.forward(prompt_ids + reference[:index], engine.new_cache(), last_only=True).logits[-1]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def compare(
    engine: Engine, prompt_ids: list[int], reference: list[int], tokens: list[int], tie_margin: float
) -> Verdict:
    i = first_difference(reference, tokens)
    if i is None:
        return Verdict(EXACT)
    ref_tok = reference[i] if i < len(reference) else None
    got_tok = tokens[i] if i < len(tokens) else None
    margin = reference_margin(engine, prompt_ids, reference, i)
    # A tie needs both sides to have produced a token there: a stop that one side
    # ignored (overshoot past EOS / max_new_tokens) is always a bug.
    status = TIE if (ref_tok is not None and got_tok is not None and margin < tie_margin) else MISMATCH
    return Verdict(status, i, margin, ref_tok, got_tok)
