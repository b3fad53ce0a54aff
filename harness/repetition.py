"""How much of an output repeats text that was already there: the `repetition` column.

Copy-based methods (prompt lookup, and to a lesser degree every drafter) are fast exactly
where the output repeats n-grams of the prompt or of itself. A model stuck in a loop
repeats its last line until the token limit, and prompt lookup then accepts almost every
proposal: its speedup measures the loop, not the method. Each record therefore stores the
share of its generated tokens that lie inside such a repeat, and every table shows the
per-method mean beside the speedup.
"""

from __future__ import annotations

from typing import Optional, Sequence

NGRAM = 4  # n of the repeated n-grams (prompt lookup's default match is the last 3 tokens, copying what follows)


def repetition_share(prompt: Sequence[int], output: Sequence[int], n: int = NGRAM) -> Optional[float]:
    """Share of the ``output`` tokens that lie inside an n-gram already seen earlier.

    Let ``S = prompt + output`` and, for every start ``s`` with ``s + n <= len(S)``, let
    ``w(s) = S[s : s + n]``. The window ``w(s)`` is *repeated* when the same n tokens occur
    at an earlier start ``s' < s`` of ``S`` (in the prompt or in the output; the two
    occurrences may overlap, as in ``a a a a a``). An output token ``S[t]`` is *covered*
    when some repeated window contains it (``s <= t < s + n``). The result is the number
    of covered output tokens divided by ``len(output)``: 0.0 when no 4 consecutive tokens
    repeat, 1.0 when every generated token is part of a repeat (a loop, or a verbatim
    copy of the prompt). ``None`` for an empty output (nothing to measure).

    Unlike ``repeated_ngram_share`` of the zoo's quality figures (the share of a
    completion's n-grams that repeat within the completion alone), this counts tokens and
    includes the prompt, because prompt lookup copies from both.
    """
    if not output:
        return None
    seq = list(prompt) + list(output)
    first = len(prompt)
    seen: set[tuple[int, ...]] = set()
    covered = [False] * len(output)
    for start in range(len(seq) - n + 1):
        window = tuple(seq[start : start + n])
        if window in seen and start + n > first:
            for t in range(max(start, first), start + n):
                covered[t - first] = True
        seen.add(window)
    return sum(covered) / len(output)
