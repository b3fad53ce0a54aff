"""Function-level training samples: whole functions / methods cut out of corpus files.

A file-level stream teaches a model to continue code but never to stop: files rarely end
where a function does. These samples are one function each (with the comment or docstring
header it has in its file), encoded as ``<s> sample </s>`` so the model learns to close a
function and then emit EOS. Python samples start the way HumanEval prompts do: the file's
top-level imports that the function uses, then two blank lines, then the ``def``
(``"from typing import List\\n\\n\\ndef f(...):"``; without imports ``"\\n\\ndef f(...):"``).

Extraction per language:

- python: ``ast``: top-level functions and the methods of top-level classes (decorators and
  the ``#`` comment lines directly above included, methods dedented to column 0);
- cpp / java / js / go: a brace matcher over a "blanked" copy of the file in which comments,
  string / char / template / regex literals and preprocessor lines cannot contribute braces
  or parentheses. For each ``{`` the signature is read backwards to the previous ``;``,
  ``{`` or ``}`` (or an unmatched ``(``; in JS also a ``,``) and classified (function body,
  control block, anything else); a function body is kept when its signature starts a line,
  its closing ``}`` starts a line at the signature's indentation (a strong check that the
  match is right), and its size is within bounds. The comment block directly above the
  signature is its header. Blocks that are not kept functions (classes, namespaces,
  ``extern "C"``, object literals, ...) are searched for functions inside; kept functions
  and control blocks are not, so samples are maximal (top-level functions and methods).
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass, field

from harness.zoo.corpus import LANGUAGES


@dataclass
class FunctionSamplesConfig:
    """Which functions become samples (``data.functions`` of ``harness zoo``)."""

    languages: list[str] = field(default_factory=lambda: list(LANGUAGES))  # languages to extract from
    min_lines: int = 3  # skip shorter functions (one-line accessors teach little about ending a body)
    max_chars: int = 2400  # skip longer functions (~800 tokens; a 512-token window should hold most of one)
    python_imports: bool = True  # prefix Python samples with the file's imports they use, as HumanEval prompts do
    seed: int = 0  # order of the samples in the function-level stream


# ----------------------------------------------------------------------------- python


def _python_functions(text: str, cfg: FunctionSamplesConfig) -> list[str]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return []
    lines = text.split("\n")
    imports: list[tuple[set[str], str]] = []  # (names it binds, its source) per top-level import
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) and node.end_lineno == node.lineno:
            bound = {(a.asname or a.name).split(".")[0] for a in node.names}
            imports.append((bound, lines[node.lineno - 1].rstrip()))
    funcs: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.append(node)
        elif isinstance(node, ast.ClassDef):
            funcs.extend(n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
    out = []
    for fn in funcs:
        first = min([fn.lineno] + [d.lineno for d in fn.decorator_list]) - 1  # 0-based
        last = fn.end_lineno  # exclusive, 0-based
        indent = lines[fn.lineno - 1][: len(lines[fn.lineno - 1]) - len(lines[fn.lineno - 1].lstrip())]
        while first > 0 and lines[first - 1].startswith(indent + "#"):
            first -= 1
        body = lines[first:last]
        if any(line.strip() and not line.startswith(indent) for line in body):
            continue  # a continuation line left of the def (odd formatting): skip
        code = "\n".join(line[len(indent):] for line in body).rstrip() + "\n"
        if len(body) < cfg.min_lines or len(code) > cfg.max_chars:
            continue
        try:
            ast.parse(code)
        except SyntaxError:
            continue
        head = ""
        if cfg.python_imports and imports:
            used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name)}
            head = "".join(src + "\n" for bound, src in imports if bound & used)
        out.append(head + "\n\n" + code)
    return out


# ----------------------------------------------------------------------------- brace languages

_BLANK_PATTERNS = {
    "cpp": [r"^[ \t]*#(?:\\\n|[^\n])*", r"//[^\n]*", r"/\*.*?(?:\*/|\Z)",
            r'"(?:\\.|[^"\\\n])*"', r"'(?:\\.|[^'\\\n])*'"],
    "java": [r"//[^\n]*", r"/\*.*?(?:\*/|\Z)", r'"""(?:\\.|(?!""").)*?(?:"""|\Z)',
             r'"(?:\\.|[^"\\\n])*"', r"'(?:\\.|[^'\\\n])*'"],
    "go": [r"//[^\n]*", r"/\*.*?(?:\*/|\Z)", r"`[^`]*`?", r'"(?:\\.|[^"\\\n])*"', r"'(?:\\.|[^'\\\n])*'"],
    "js": [r"//[^\n]*", r"/\*.*?(?:\*/|\Z)", r"`(?:\\.|[^`\\])*`?", r'"(?:\\.|[^"\\\n])*"',
           r"'(?:\\.|[^'\\\n])*'", r"/"],
}
_BLANK_RE = {lang: re.compile("|".join(f"({p})" for p in pats), re.S | re.M) for lang, pats in _BLANK_PATTERNS.items()}
_JS_REGEX = re.compile(r"/(?:\\.|\[(?:\\.|[^\]\\\n])*\]|[^/\\\n\[])+/[A-Za-z]*")
_JS_REGEX_AFTER_WORDS = {"return", "typeof", "case", "do", "else", "in", "of", "void", "yield", "await", "delete", "new"}
_PREPROC = "\x01"  # what a preprocessor line becomes: code for the scanner (stops a header), never a brace


def _js_regex_can_start(text: str, i: int) -> bool:
    """Whether a ``/`` at ``i`` starts a regex literal (from the token before it)."""
    j = i - 1
    while j >= 0 and text[j] in " \t\r\n":
        j -= 1
    if j < 0 or text[j] in "(,=:[!&|?{};+-*%<>~^":
        return True
    m = re.search(r"[A-Za-z_$][\w$]*$", text[max(0, j - 20) : j + 1])
    return bool(m) and m.group(0) in _JS_REGEX_AFTER_WORDS


def blank_code(text: str, lang: str) -> str:
    """``text`` of the same length where comments become spaces, literals keep their quotes
    but their contents become ``_`` and preprocessor lines become ``\\x01``; newlines stay."""
    pat = _BLANK_RE[lang]
    parts: list[str] = []
    pos = 0
    while True:
        m = pat.search(text, pos)
        if m is None:
            break
        s, e = m.span()
        tok = m.group(0)
        if lang == "js" and tok == "/":
            r = _JS_REGEX.match(text, s) if _js_regex_can_start(text, s) else None
            if r is None:  # division
                parts.append(text[pos:e])
                pos = e
                continue
            e = r.end()
            tok = text[s:e]
        parts.append(text[pos:s])
        if tok.startswith("#"):
            parts.append(re.sub(r"[^\n]", _PREPROC, tok))
        elif tok.startswith(("//", "/*")):
            parts.append(re.sub(r"[^\n]", " ", tok))
        else:  # a literal: keep the delimiters, hide the contents
            parts.append(tok[0] + re.sub(r"[^\n]", "_", tok[1:-1]) + tok[-1] if len(tok) > 1 else tok)
        pos = e
    parts.append(text[pos:])
    out = "".join(parts)
    if lang == "go":  # interface{} / struct{} in signatures are types, not blocks
        out = re.sub(r"\b(interface|struct)\{(\s*)\}", lambda m: m.group(1) + " " + m.group(2) + " ", out)
    return out


_CONTROL = {"if", "else", "for", "while", "do", "switch", "try", "catch", "finally", "with", "synchronized",
            "return", "case", "new", "throw", "sizeof", "typedef", "using", "goto"}
_CPP_TRAILER = re.compile(r"(\s*(const|noexcept(\s*\([^()]*\))?|override|final|volatile|mutable|&&|&|"
                          r"throw\s*\([^()]*\)|->\s*[\w:<>,\s*&]+?|requires[^{;]*?))*\s*$")
_JAVA_TRAILER = re.compile(r"\s*(throws\s+[\w.,\s<>]+)?\s*$")
_JS_METHOD = re.compile(r"^((static|async|get|set)\s+)*\*?\s*[A-Za-z_$#][\w$]*\s*\(.*\)$", re.S)


def _top_level(sig: str) -> str:
    """The characters of ``sig`` outside parentheses."""
    out, depth = [], 0
    for ch in sig:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def classify_signature(sig: str, lang: str) -> str:
    """``function``, ``control`` or ``other`` for the code before a ``{`` (comments blanked)."""
    sig = " ".join(sig.replace(_PREPROC, " ").split())
    if not sig:
        return "other"
    first = re.match(r"[A-Za-z_]\w*", sig)
    word = first.group(0) if first else ""
    if word in _CONTROL:
        return "control"
    if lang == "go":
        return "function" if word == "func" else "other"
    if lang == "js":
        if re.search(r"\bfunction\b", sig) or sig.endswith("=>") or _JS_METHOD.match(sig):
            return "function"
        return "other"
    if not re.match(r"[A-Za-z_~@]", sig) or "(" not in sig:
        return "other"
    top = _top_level(sig)
    if "=" in top.replace("==", "") and "operator" not in sig:
        return "other"  # an initializer, lambda or anonymous class assigned to something
    if lang == "java":
        bare = re.sub(r"@[\w.]+(\s*\([^()]*\))?", " ", sig).strip()  # annotations
        if "(" in bare and _JAVA_TRAILER.sub("", bare).endswith(")") and len(bare[: bare.index("(")].split()) >= 2:
            return "function"
        return "other"
    head = _CPP_TRAILER.sub("", sig)
    if head.endswith(")") and not re.match(r"(class|struct|union|namespace|enum)\b", sig):
        return "function"
    return "other"


@dataclass
class _Block:
    open: int  # index of "{"
    close: int  # index of the matching "}"
    sig_start: int  # start of the signature read backwards from "{"
    kind: str  # function | control | other
    children: list = field(default_factory=list)


def _signature_start(blank: str, brace: int, lang: str) -> int:
    depth = 0
    i = brace - 1
    while i >= 0:
        ch = blank[i]
        if ch == ")":
            depth += 1
        elif ch == "(":
            depth -= 1
            if depth < 0:
                break
        elif depth == 0 and (ch in ";{}" or (lang == "js" and ch == ",")):
            break
        i -= 1
    j = i + 1
    while j < brace and (blank[j].isspace() or blank[j] == _PREPROC):
        j += 1
    if lang == "cpp":  # an access label is not part of a member's signature
        m = re.match(r"(public|private|protected)\s*:\s*", blank[j:brace])
        if m:
            j += m.end()
    if lang in ("go", "js"):
        # no semicolons end the statement before: the signature starts at the last line of the
        # head that opens a statement (Go: "func ..."; JS: outside parentheses, not a continuation)
        best, depth, line_start = j, 0, True
        for k in range(j, brace):
            ch = blank[k]
            if line_start and not ch.isspace():
                line_start = False
                if depth == 0 and (blank.startswith("func", k) if lang == "go" else ch not in ".,)]?:+-*/&|=<>"):
                    best = k
            if ch == "\n":
                line_start = True
            elif ch in "([":
                depth += 1
            elif ch in ")]":
                depth -= 1
        j = best
    return j


def _blocks(blank: str, lang: str) -> list[_Block]:
    """The tree of brace blocks (top-level blocks returned); unmatched braces are dropped."""
    root: list[_Block] = []
    stack: list[_Block] = []
    for m in re.finditer(r"[{}]", blank):
        i = m.start()
        if m.group(0) == "{":
            s = _signature_start(blank, i, lang)
            stack.append(_Block(i, -1, s, classify_signature(blank[s:i], lang)))
        elif stack:
            b = stack.pop()
            b.close = i
            (stack[-1].children if stack else root).append(b)
    return root


def _line_start(text: str, i: int) -> int:
    return text.rfind("\n", 0, i) + 1


def _header_start(text: str, blank: str, line_start: int) -> int:
    """Start of the comment block directly above the line starting at ``line_start``."""
    start = line_start
    while start > 0:
        prev = _line_start(text, start - 1)
        line, bline = text[prev : start - 1], blank[prev : start - 1]
        if not line.strip() or bline.strip():  # a blank line, or code / preprocessor: the header ends
            break
        start = prev
    while start < line_start:  # a header opens its comment (not a tail of one with blank lines in it)
        if text[start:line_start].lstrip().startswith(("//", "/*")):
            break
        start = text.find("\n", start) + 1
    return start


def _sample(text: str, blank: str, b: _Block, cfg: FunctionSamplesConfig) -> str | None:
    ls = _line_start(text, b.sig_start)
    indent = text[ls : b.sig_start]
    if indent.strip():
        return None  # the signature does not start its line (a callback argument, ...)
    cl = _line_start(text, b.close)
    if text[cl : b.close] != indent:
        return None  # the closing brace is not where a well-matched body ends
    end = text.find("\n", b.close)
    end = len(text) if end < 0 else end
    rest = text[b.close + 1 : end].strip()
    if rest not in ("", ";", ","):
        return None  # "})" and the like: part of a larger expression
    stop = end if rest == ";" else b.close + 1  # keep the ";" of "const f = () => {...};", drop a ","
    start = _header_start(text, blank, ls)
    lines = text[start:stop].split("\n")
    if any(line.strip() and not line.startswith(indent) for line in lines):
        return None
    code = "\n".join(line[len(indent):] for line in lines).rstrip() + "\n"
    if len(lines) < cfg.min_lines or len(code) > cfg.max_chars:
        return None
    return code


def _brace_functions(text: str, lang: str, cfg: FunctionSamplesConfig) -> list[str]:
    text = text.replace("\r\n", "\n")
    blank = blank_code(text, lang)
    out: list[str] = []
    todo = _blocks(blank, lang)
    while todo:
        b = todo.pop(0)
        if b.kind == "function":
            s = _sample(text, blank, b, cfg)
            if s is not None:
                out.append(s)
                continue
        if b.kind != "control" and not (lang == "go" and b.kind == "function"):
            todo[0:0] = b.children  # look for functions inside classes, namespaces, wrappers
    return out


def extract_functions(text: str, lang: str, cfg: FunctionSamplesConfig | None = None) -> list[str]:
    """The function-level samples of one source file (without BOS / EOS), in file order."""
    cfg = cfg or FunctionSamplesConfig()
    if lang == "python":
        return _python_functions(text, cfg)
    if lang in _BLANK_RE:
        return _brace_functions(text, lang, cfg)
    raise ValueError(f"no function extractor for language {lang!r}; known: {', '.join(LANGUAGES)}")


def function_samples(docs, cfg: FunctionSamplesConfig) -> tuple[list[tuple[str, str]], dict]:
    """(language, sample) for every training-split document, exact duplicates removed;
    and per-language counts."""
    seen: set[str] = set()
    samples: list[tuple[str, str]] = []
    counts: dict[str, dict[str, int]] = {}
    for d in docs:
        if d.split != "train" or d.lang not in cfg.languages:
            continue
        c = counts.setdefault(d.lang, {"files": 0, "functions": 0, "duplicates": 0})
        c["files"] += 1
        for s in extract_functions(d.text, d.lang, cfg):
            h = hashlib.sha256(s.encode("utf-8")).hexdigest()
            if h in seen:
                c["duplicates"] += 1
                continue
            seen.add(h)
            samples.append((d.lang, s))
            c["functions"] += 1
    return samples, counts


FUNCTIONS_STREAM = "train_functions.npy"  # the function-level token stream, beside train.npy
FUNCTIONS_META = "functions_meta.json"


def encode_function_samples(docs, tokenizer, out_dir, cfg: FunctionSamplesConfig) -> dict:
    """Write ``train_functions.npy``: every sample as ``<s> sample </s>``, in a seeded order;
    returns (and writes) per-language sample and token counts."""
    import json  # noqa: PLC0415
    from pathlib import Path  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    samples, counts = function_samples(docs, cfg)
    if not samples:
        raise RuntimeError("no function-level samples were extracted from the training files")
    ids = [e.ids for e in tokenizer.backend_tokenizer.encode_batch([s for _, s in samples], add_special_tokens=False)]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    dtype = np.uint16 if len(tokenizer) < 65536 else np.int32
    parts = []
    for i in np.random.default_rng(cfg.seed).permutation(len(samples)):
        lang = samples[i][0]
        parts.append(np.asarray([bos, *ids[i], eos], dtype=dtype))
        counts[lang]["tokens"] = counts[lang].get("tokens", 0) + len(parts[-1])
    out = Path(out_dir)
    np.save(out / FUNCTIONS_STREAM, np.concatenate(parts))
    meta = {"config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}, "per_language": counts,
            "samples": len(samples), "tokens": int(sum(len(p) for p in parts))}
    tmp = out / (FUNCTIONS_META + ".tmp")
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(out / FUNCTIONS_META)
    return meta
