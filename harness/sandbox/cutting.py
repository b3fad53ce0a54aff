"""Completion cutting: the part of a raw generation that completes the prompt's function.

``truncate_completion(language, prompt, completion)``, applied to the raw generated text:

* Python: the completion is the body of the prompt's last function. It ends at the first line
  of the completion that starts at column 0 with anything but white space -- ``def``,
  ``class``, ``if __name__``, ``print(``, a ``#`` comment, ... (the stop sequences of the Codex
  paper, generalised: a body line is always indented). Lines inside a multi-line string do not
  count (found with ``tokenize``).
* C++, Java, JavaScript, Go: brace matching, skipping braces inside comments, strings,
  character/rune literals and JS template literals. The prompt ends inside the function (Java:
  inside the method inside ``class Solution``); the completion is cut right after the brace that
  closes every brace the prompt left open -- the function for C++/JS/Go, the ``Solution``
  class for Java, so that helper methods the model adds to the class are kept. For Go and JS,
  top-level helper definitions that follow right after (Go ``func``/``type ... struct``, JS
  ``function f(``/``const f = (...) => {``/``= function``; comments and blank lines between
  them allowed) are kept too, since the function may call them (the reference solution of
  Go/72 does); ``main`` and names starting with ``Test``/``test``/``check``... are not. A
  completion that never closes the function (ran out of tokens) is kept whole and the missing
  braces are appended.
"""

from __future__ import annotations

import io
import re
import tokenize

from harness.sandbox.languages import normalise_language


def _python_cut(prompt: str, completion: str) -> int:
    """Index in ``completion`` where the function body ends (len(completion) if it does not)."""
    full = prompt + completion
    base = len(prompt)
    # absolute offsets of line starts
    starts = [0]
    for m in re.finditer("\n", full):
        starts.append(m.end())
    in_string: set[int] = set()  # 1-based line numbers that begin inside a multi-line string
    last_line = len(starts)  # lines after this one were not tokenized
    try:
        for tok in tokenize.generate_tokens(io.StringIO(full).readline):
            if tok.type == tokenize.STRING or tok.type == getattr(tokenize, "FSTRING_MIDDLE", -1):
                in_string.update(range(tok.start[0] + 1, tok.end[0] + 1))
    except (tokenize.TokenError, SyntaxError) as e:  # unfinished code: plain line rule after here
        lineno = getattr(e, "lineno", None) or (e.args[1][0] if len(e.args) > 1 else None)
        if isinstance(lineno, int):
            last_line = lineno
        # an unterminated string swallows the rest: treat the lines after its start as code
    for lineno, start in enumerate(starts, 1):
        if start < base or start >= len(full):
            continue
        if start == base and not (base == 0 or full[base - 1] == "\n"):
            continue
        ch = full[start]
        if ch in " \t\r\n\f":
            continue
        if lineno in in_string and lineno <= last_line:
            continue
        return start - base
    return len(completion)


_C_FAMILY = ("cpp", "java", "js", "go")


def _brace_events(text: str, language: str) -> list[tuple[int, int]]:
    """(index, +1/-1) for each code brace of ``text``: comments, strings and literals skipped."""
    events: list[tuple[int, int]] = []
    i, n = 0, len(text)
    template_depths: list[int] = []  # JS: brace depth at each open ``${`` inside a template
    depth = 0

    def skip_quoted(j: int, quote: str, escapes: bool = True, multiline: bool = False) -> int:
        while j < n:
            c = text[j]
            if escapes and c == "\\":
                j += 2
                continue
            if c == quote:
                return j + 1
            if c == "\n" and not multiline:
                return j + 1  # unterminated literal: resync at the line end
            j += 1
        return n

    def skip_template(j: int) -> tuple[int, bool]:
        """From inside a JS template literal: (index after it, or after ``${``; opened ``${``?)."""
        while j < n:
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "`":
                return j + 1, False
            if c == "$" and j + 1 < n and text[j + 1] == "{":
                return j + 2, True
            j += 1
        return n, False

    while i < n:
        c = text[i]
        nxt = text[i + 1] if i + 1 < n else ""
        if c == "/" and nxt == "/":
            j = text.find("\n", i)
            i = n if j < 0 else j + 1
        elif c == "/" and nxt == "*":
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == '"':
            i = skip_quoted(i + 1, '"')
        elif c == "'":
            i = skip_quoted(i + 1, "'")
        elif c == "`" and language == "go":
            i = skip_quoted(i + 1, "`", escapes=False, multiline=True)
        elif c == "`" and language == "js":
            i, opened = skip_template(i + 1)
            if opened:
                template_depths.append(depth)
                depth += 1  # the ``${``; its ``}`` goes back into the template
        elif c == "{":
            events.append((i, +1))
            depth += 1
            i += 1
        elif c == "}":
            depth -= 1
            if template_depths and depth == template_depths[-1]:
                template_depths.pop()
                i, opened = skip_template(i + 1)
                if opened:
                    template_depths.append(depth)
                    depth += 1
                continue
            events.append((i, -1))
            i += 1
        else:
            i += 1
    return events


def _open_braces(text: str, language: str) -> int:
    return sum(d for _, d in _brace_events(text, language))


# Top-level definitions kept after the function (Go, JS): helpers the function may call. Names
# that look like tests or an entry point are not kept (they would clash with the real tests).
_HELPER_START = {
    "go": re.compile(
        r"(?:func\s+(?:\([^)]*\)\s*)?(?!main\b|Test|Benchmark|Example|Fuzz)[A-Za-z_]\w*\s*[\[(]"
        r"|type\s+[A-Za-z_]\w*\s+(?:struct|interface)\b)"
    ),
    "js": re.compile(
        r"(?:(?:async\s+)?function\s*\*?\s*(?!main\b|test|check)[A-Za-z_$][\w$]*\s*\("
        r"|(?:const|let|var)\s+(?!main\b|test|check)[A-Za-z_$][\w$]*\s*=\s*(?:async\s+)?"
        r"(?:function\b|\([^()]*\)\s*=>\s*\{|[A-Za-z_$][\w$]*\s*=>\s*\{))"
    ),
}
_SPACE_OR_COMMENT = re.compile(r"(?:\s+|//[^\n]*|/\*.*?\*/)*", re.S)


def close_at_depth_zero(text: str, language: str, start: int = 0) -> tuple[int, int]:
    """(index just after the first brace at or after ``start`` that leaves no brace open, or
    -1; the depth at the end). Braces before ``start`` count towards the depth."""
    depth = 0
    for idx, d in _brace_events(text, language):
        depth += d
        if depth <= 0 and idx >= start:
            return idx + 1, 0
    return -1, depth


def truncate_completion(language: str, prompt: str, completion: str) -> str:
    """The part of a raw generation that completes the prompt's function (see module doc)."""
    language = normalise_language(language)
    if language == "python":
        return completion[: _python_cut(prompt, completion)]
    if language not in _C_FAMILY:
        return completion
    open_at_start = _open_braces(prompt, language)
    if open_at_start <= 0:
        return completion
    # scan prompt + completion so that a literal or comment spanning the seam is handled
    end, depth = close_at_depth_zero(prompt + completion, language, len(prompt))
    if end < 0:  # never closed: keep it all and close what is open
        return completion.rstrip() + "\n" + "}\n" * depth
    cut = end - len(prompt)
    helper = _HELPER_START.get(language)
    while helper is not None:
        gap = _SPACE_OR_COMMENT.match(completion, cut)
        start = gap.end() if gap else cut
        if not helper.match(completion, start):
            break
        brace = completion.find("{", start)
        if brace < 0:
            break
        end, _ = close_at_depth_zero(completion[brace:], language)
        if end < 0:
            break
        cut = brace + end
    return completion[:cut]
