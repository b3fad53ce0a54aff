"""Stop rules: when generation ends, applied the same way by every method.

``StopRule`` holds the limits (``max_new_tokens``, EOS ids, stop strings); ``Committer`` is the
one commit path of every method: it appends tokens one at a time and cuts a block of accepted
tokens at the token that ends generation; ``StopStrings`` matches stop strings in the text of
the generated tokens, incrementally.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional


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
