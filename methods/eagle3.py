"""EAGLE-3 (Li et al. 2025): EAGLE-2's dynamic tree drafted by the EAGLE-3 head.

The head (``harness.drafters.eagle``, ``version=3``) reads the target's low, middle and high
layer features fused by ``fc`` (3H -> h) instead of the last hidden state, and drafts in its own
smaller vocabulary (``d2t`` maps a draft id to its target id; tokens outside that vocabulary
are never proposed). The target's verify forward returns those layers for every node
(``Engine.forward(hidden=fused_layers)``); everything else is ``eagle2``'s: top-k expansion by
cumulative draft log-probability, reranking, one tree verify per step, lossless acceptance.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.eagle2 import Eagle2, Eagle2Config


@dataclass
class Eagle3Config(Eagle2Config):
    name: str = "eagle3"
    head: str = "zoo/target-eagle3"  # EAGLE-3 head: directory, weights file or hub id (ours or the released format)
    # the tree eagle3 has run with (not tuned for it): eagle2's defaults before dynamic depth, pinned here so a
    # re-tune of eagle2 does not change eagle3 unmeasured
    top_k: int = 4
    depth: int = 2
    total_tokens: int = 16
    stop_below: float = 0.0


class Eagle3(Eagle2):
    """EAGLE-3: EAGLE-2's dynamic tree drafted by an EAGLE-3 head (the target's low, middle and high features)."""

    config_class = Eagle3Config
    head_version = 3  # fused low / mid / high target features, draft vocabulary
