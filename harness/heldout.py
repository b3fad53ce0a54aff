"""Held-out acceptance of a fine-tuned model measured by running its decoding method: above both
the methods and the training code (which may not import each other), so the command line hands
it to an export (``harness.cli_train.EVALUATORS``)."""

from __future__ import annotations

from typing import Any

from harness.config import SamplingConfig
from harness.stops import StopRule
from methods.coral import Coral, CoralConfig
from tasks.humaneval import HumanEval, HumanEvalConfig


def coral_heldout_acceptance(engine, problems: int, new_tokens: int) -> dict[str, Any]:
    """Per-position acceptance of ``methods/coral.py`` (strict, greedy) decoding the first
    ``problems`` prompts of HumanEval's tuning split (never trained on) for ``new_tokens`` tokens,
    no stop rule: the share of steps whose draft j was committed, and tokens per forward."""
    method = Coral(CoralConfig(), engine, SamplingConfig())
    proposed, accepted, tokens, forwards = [0] * method.k, [0] * method.k, 0, 0
    samples = HumanEval(HumanEvalConfig(split="tune", limit=problems)).samples()
    for sample in samples:
        gen = method.generate(engine.tokenizer(sample.turns[0]).input_ids, StopRule(new_tokens))
        for j in range(method.k):
            proposed[j] += gen.proposed_per_position[j] if j < len(gen.proposed_per_position) else 0
            accepted[j] += gen.accepted_per_position[j] if j < len(gen.accepted_per_position) else 0
        tokens, forwards = tokens + len(gen.tokens), forwards + gen.target_forwards
    return {"problems": len(samples), "split": "tune", "new_tokens": new_tokens, "steps": proposed[0],
            "acceptance": [round(a / p, 4) if p else 0.0 for a, p in zip(accepted, proposed)],
            "tokens_per_forward": round(tokens / forwards, 3) if forwards else 0.0}  # fmt: skip
