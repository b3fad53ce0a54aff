"""transformers' own ``generate`` (greedy): an independent reference implementation.

It uses transformers' cache and loop rather than the engine's (harness/engine.py), so agreement
with ``autoregressive`` shows the baseline is right, and its speed shows the baseline
is not a strawman. ``hf_generate`` is shared with the other wrappers of ``generate``
(hf-assisted, hf-prompt-lookup).

Stop rules: ``generate`` gets a ``StoppingCriteria`` (``CommitEachStep``) that hands the
tokens of each step to the shared ``Committer``, so a wrapper ends at exactly the token our
methods end at, and says "stop" once the committer is done. transformers calls it once per
target forward, so it also records the tokens each forward committed (``accepted_per_step``,
the prompt's forward first). Both matter: transformers checks stopping criteria only after a
whole accepted block (assisted and prompt-lookup generation can run past a stop inside a
block: the committer cuts it), and its own ``stop_strings`` (``StopStringCriteria``) also
matches a stop string that spans the seam between prompt and output, which the shared rule
does not count.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import Committer, StopRule
from methods.base import Generation, Method


@dataclass
class HFGenerateConfig(MethodConfig):
    name: str = "hf-generate"


class CommitEachStep(StoppingCriteria):
    """The shared commit path as a transformers stopping criterion: the tokens each step added
    after the prompt go through one ``Committer`` (EOS, stop strings, ``max_new_tokens``; a
    block is cut at the token that ends generation), and the criterion says "stop" once it is
    done. transformers calls it after every target forward with the whole sequence (batch
    size 1); only the tokens added since the last call are read."""

    def __init__(self, engine: Engine, stop: StopRule, prompt_length: int):
        self.engine = engine  # its phase clock: the commit is the step's "accept" phase
        self.committer = Committer(stop)
        self.prompt_length = prompt_length
        self.seen = 0  # generated tokens read so far (committed, or past the stop)
        self.per_step: list[int] = []  # tokens committed by each call's step, in order

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        with self.engine.phase("accept"):
            new = input_ids[0, self.prompt_length + self.seen :].tolist()
            self.seen += len(new)
            self.per_step.append(self.committer.add(new))
        return torch.full((input_ids.shape[0],), self.committer.done, dtype=torch.bool, device=input_ids.device)


@dataclass
class HFOutput:
    """What a wrapper's ``generate`` call committed."""

    tokens: list[int]  # the new tokens, cut under the stop rule
    stop_reason: Optional[str]  # the Committer's reason (eos, stop:<string>, max_new_tokens)
    accepted_per_step: list[int]  # tokens committed per target forward, the prompt's forward first


def hf_generate(
    engine: Engine, prompt_ids: list[int], stop: StopRule, options: dict | None = None, **generate_kwargs
) -> HFOutput:
    """Greedy ``model.generate`` under ``stop``, its tokens committed step by step under ``stop``.

    options: extra GenerationConfig fields (prompt_lookup_num_tokens=...);
    generate_kwargs: extra ``generate`` arguments (assistant_model=...).
    """
    ids = torch.tensor([prompt_ids], device=engine.device)
    # a fresh GenerationConfig: a checkpoint's own defaults (repetition penalty,
    # min_length, sampling...) must not change the reference
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=stop.max_new_tokens,
        eos_token_id=sorted(stop.eos_ids) or None,
        pad_token_id=_pad_id(engine, stop),
        **(options or {}),
    )
    commit = CommitEachStep(engine, stop, len(prompt_ids))
    with torch.inference_mode(), engine.timing_calls():  # per-forward times, as the engine's own forwards
        out = engine.model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config,
            stopping_criteria=StoppingCriteriaList([commit]), **generate_kwargs,
        )  # fmt: skip
    if out.shape[1] != len(prompt_ids) + commit.seen:
        raise RuntimeError(f"transformers' generate returned {out.shape[1] - len(prompt_ids)} new tokens but showed "
                           f"its stopping criteria {commit.seen}: this transformers version is not supported")  # fmt: skip
    return HFOutput(commit.committer.tokens, commit.committer.reason, commit.per_step)


@contextmanager
def counting_calls(*modules: torch.nn.Module) -> Iterator[list[int]]:
    """Count forward calls of each module (a forward pre-hook, removed on exit): how the
    wrappers learn transformers' target and draft forward counts without touching its code."""
    counts = [0] * len(modules)

    def counter(i: int):
        def hook(module, args) -> None:
            counts[i] += 1

        return hook

    handles = [m.register_forward_pre_hook(counter(i)) for i, m in enumerate(modules)]
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()


def require_greedy(name: str, sampling: SamplingConfig) -> None:
    if sampling.do_sample:
        raise ValueError(f"{name} is a greedy reference; run it with sampling.do_sample=false")


class HFGenerate(Method):
    """transformers' own `generate` (greedy): an independent reference implementation."""

    config_class = HFGenerateConfig
    greedy_only = True

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        require_greedy(self.cfg.name, self.sampling)
        out = hf_generate(self.engine, prompt_ids, stop)
        return Generation(tokens=out.tokens, target_forwards=len(out.accepted_per_step),
                          accepted_per_step=out.accepted_per_step, stop_reason=out.stop_reason)  # fmt: skip


def _pad_id(engine, stop: StopRule) -> int:
    tok = engine.tokenizer
    if tok is not None and tok.pad_token_id is not None:
        return tok.pad_token_id
    return min(stop.eos_ids) if stop.eos_ids else 0
