"""The method interface and the small pieces every method shares.

A method is constructed once per run with its config and the target ``Engine`` and
then asked to ``generate`` one prompt at a time. It never times itself (the runner
does) and returns a ``Generation``: the new token ids with the stop rules applied, and
the counts that describe how it got there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional

import torch

from harness.config import MethodConfig, SamplingConfig
from harness.engine import Engine

# Characters a decode of a tail window may get wrong at its start (a multi-byte character cut
# by the window, a SentencePiece leading space dropped): the window keeps this many more.
WINDOW_SLACK_CHARS = 8


class StopStrings:
    """Stop strings matched in the text of the *generated* tokens.

    The text is ``decode(generated tokens)``, the prompt not included: a stop string that
    would only appear across the seam between prompt and output (prompt ending in ``\\n``,
    output starting with ``def``) does not count. Generation ends with the token whose
    decoding completes the first occurrence of any stop string; that token is kept (it may
    carry characters past the stop string), nothing after it.

    The check is incremental: ``completed_by(tokens)`` only asks whether the last token of
    ``tokens`` completes a stop string, given that none was complete before it. It decodes
    a tail window of tokens whose text holds the longest stop string plus a few characters
    of slack (grown when tokens are short, e.g. the bytes of one multi-byte character), and
    looks only at occurrences that end in the part of the text the last token changed (the
    part after the longest common prefix of the window decoded without and with it, so a
    token that turns a partial UTF-8 sequence into a character counts from that character).
    The result depends only on ``tokens``, so every method cuts at the same token.

    ``decode`` is the tokenizer's decode (the runner passes one that skips special tokens,
    as ``Record.text`` does); methods never see the tokenizer itself.
    """

    def __init__(self, strings: Sequence[str], decode: Callable[[list[int]], str]):
        if any(not s for s in strings):
            raise ValueError("an empty stop string would stop at once; remove it from task.stop")
        self.strings = tuple(dict.fromkeys(strings))  # in order, duplicates dropped
        self.decode = decode
        self.longest = max((len(s) for s in self.strings), default=0)
        self._last: tuple[tuple[int, ...], str] = ((), "")  # the last window decoded, and its text

    def _decode(self, window: tuple[int, ...]) -> str:
        if window != self._last[0]:
            self._last = (window, self.decode(list(window)))
        return self._last[1]

    def __bool__(self) -> bool:
        return bool(self.strings)

    def completed_by(self, tokens: Sequence[int]) -> Optional[str]:
        """The stop string that the last token of ``tokens`` completes, or None.

        When several end in that token, the one that ends first in the text wins (then the
        one that starts first). Assumes no stop string was complete before the last token.
        """
        n = len(tokens)
        if not self.strings or n == 0:
            return None
        width = self.longest + 2  # tokens; at least one character each in the common case
        while True:
            # the window starts at a multiple of width, so the next call's "before" is this
            # call's "after" (decoded once)
            start = max(0, (n - width) // width * width)
            before = self._decode(tuple(tokens[start : n - 1]))
            if start == 0 or len(before) >= self.longest + WINDOW_SLACK_CHARS:
                break
            width *= 2
        after = self._decode(tuple(tokens[start:n]))
        same = 0  # the text up to here is unchanged by the last token
        limit = min(len(before), len(after))
        while same < limit and before[same] == after[same]:
            same += 1
        best: Optional[tuple[int, int, str]] = None
        for s in self.strings:
            at = after.find(s, max(0, same - len(s) + 1))
            if at >= 0 and (best is None or (at + len(s), at) < best[:2]):
                best = (at + len(s), at, s)
        return best[2] if best else None


@dataclass
class StopRule:
    max_new_tokens: int  # hard limit on new tokens
    eos_ids: frozenset[int] = frozenset()  # generation stops after emitting one of these
    strings: Optional[StopStrings] = None  # stop strings in the generated text (None: none); see StopStrings


# Generation.stop_reason values besides "stop:<the stop string>"
EOS, MAX_NEW_TOKENS = "eos", "max_new_tokens"


@dataclass
class Generation:
    tokens: list[int]  # new token ids, stop rules applied (EOS kept, nothing past it)
    target_forwards: int = 0  # forwards of the target model, prefill included
    draft_forwards: int = 0  # forwards of a draft model (0 if none)
    accepted_per_step: list[int] = field(default_factory=list)  # tokens committed per target forward
    proposed_per_position: list[int] = field(default_factory=list)  # draft tokens proposed at position i
    accepted_per_position: list[int] = field(default_factory=list)  # ...and accepted at position i
    lossy: bool = False  # True for a mode that does not preserve the target distribution
    extra: dict = field(default_factory=dict)  # method-specific figures (tree size, gamma...)
    stop_reason: Optional[str] = None  # what ended it: eos | stop:<string> | max_new_tokens (Committer.reason)


class Method:
    """Base class. Subclasses set ``config_class`` and implement ``generate``."""

    config_class: type[MethodConfig] = MethodConfig
    # "greedy-lossless": output must equal greedy autoregressive decoding token for token.
    # "reference": an independent implementation, also compared token for token.
    family: str = "greedy-lossless"
    # the settings under which the output is NOT the target's (its Generations are marked lossy);
    # "" = none (lossless in every mode), "always" = by design; shown by `harness list`
    lossy_modes: str = ""
    # True: ``generate`` also takes ``reference_ids``, the sample's reference text tokenised
    # (None when the sample has none); the runner passes it to these methods only
    uses_reference: bool = False
    # True: every sample must have a reference (the runner refuses the run before it starts)
    requires_reference: bool = False

    def __init__(self, cfg: MethodConfig, engine: Engine, sampling: SamplingConfig):
        self.cfg = cfg
        self.engine = engine
        self.sampling = sampling

    def generate(self, prompt_ids: list[int], stop: StopRule, seed: int = 0) -> Generation:
        """(``uses_reference`` methods: also ``reference_ids: Optional[list[int]] = None``.)"""
        raise NotImplementedError

    def draft_engines(self) -> list[Engine]:
        """Engines other than the target that this method runs (a draft model), for timing."""
        return []

    def reset(self) -> None:
        """Forget what earlier ``generate`` calls taught this object (state kept across the
        samples of a run, e.g. suffix decoding's global trie). The runner calls it after the
        untimed warm-up, so no timed sample drafts from the warm-up's output. Default: nothing kept."""

    def headroom(self) -> int:
        """Positions past the last one of a full-length output that a step may use (a tree's
        deeper nodes, a chunk's masks); 0 for chain methods, which propose only what fits."""
        return 0

    def check_context(self, prompt_tokens: int, stop: StopRule) -> None:
        """Refuse a generation whose positions could pass the model's context (the runner checks
        every sample before the run; this guards direct calls)."""
        need = prompt_tokens + stop.max_new_tokens + self.headroom()
        if need > self.engine.max_length:
            raise ValueError(
                f"prompt of {prompt_tokens} tokens + max_new_tokens {stop.max_new_tokens} + {self.headroom()} "
                f"positions for {self.cfg.name}'s steps exceed the model's context of {self.engine.max_length}; "
                "lower max_new_tokens"
            )


class Committer:
    """Appends tokens under a ``StopRule``: the one commit path of every method.

    Tokens are committed one at a time, each checked against the rule, so a block of
    accepted tokens (a speculative chain, a Medusa path, a SPACE chunk, a wrapper's whole
    output) is cut at the token that ends generation: an EOS, the token that completes a
    stop string, or the ``max_new_tokens``-th token. ``done`` is then set and ``reason``
    says which (checked in that order): ``eos``, ``stop:<string>`` or ``max_new_tokens``.
    """

    def __init__(self, stop: StopRule):
        self.stop = stop
        self.tokens: list[int] = []
        self.reason: Optional[str] = MAX_NEW_TOKENS if stop.max_new_tokens <= 0 else None

    @property
    def done(self) -> bool:
        return self.reason is not None

    def add(self, new: Sequence[int]) -> int:
        """Commit ``new`` in order until a stop fires; returns how many were committed."""
        count = 0
        strings = self.stop.strings
        for t in new:
            if self.done:
                break
            self.tokens.append(t)
            count += 1
            if t in self.stop.eos_ids:
                self.reason = EOS
            elif strings and (hit := strings.completed_by(self.tokens)) is not None:
                self.reason = f"stop:{hit}"
            elif len(self.tokens) >= self.stop.max_new_tokens:
                self.reason = MAX_NEW_TOKENS
        return count


def filter_logits(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """Temperature, top-k and top-p applied to ``[..., vocab]`` logits (a copy)."""
    out = logits / max(s.temperature, 1e-6)
    if s.top_k and s.top_k < out.shape[-1]:
        kth = torch.topk(out, s.top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if s.top_p < 1.0:
        sorted_logits, order = torch.sort(out, descending=True, dim=-1)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= s.top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def probabilities(logits: torch.Tensor, s: SamplingConfig) -> torch.Tensor:
    """The sampling distribution for ``logits`` under ``s`` (float32)."""
    return torch.softmax(filter_logits(logits.float(), s), dim=-1)


def next_token(logits: torch.Tensor, s: SamplingConfig, gen: Optional[torch.Generator]) -> int:
    """Argmax when greedy, else a sample from the filtered distribution."""
    if not s.do_sample:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probabilities(logits, s), 1, generator=gen))


def make_generator(seed: int, device: torch.device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen
