"""Functional correctness: run generated code against the task's tests in a sandbox, and pass@k.

Three layers, each usable on its own:

* ``run_program(language, files, limits)`` builds and runs a program (a dict of file name to
  text; the language's main file is ``MAIN_FILE[language]``) in a fresh sandbox and says how it
  went as an ``ExecResult``.
* ``check_completion(sample, completion, limits)`` cuts a raw generation at the end of the
  function (``truncate_completion``), assembles prompt + completion + the sample's tests
  (``build_program``) and runs it: HumanEval (Python) and HumanEval-X (python, cpp, java, js, go).
* ``score_records`` scores a run's records; ``pass_at_k`` / ``pass_at_k_table`` turn statuses
  into pass@k.

Statuses (``ExecResult.status``):

* ``passed``  -- built, ran, and every test held (exit status 0; for JS also no failed
  ``console.assert``).
* ``failed``  -- the completion is wrong: it does not compile, a test assertion fails, an
  exception escapes, the program crashes or exits non-zero.
* ``timeout`` -- a build or run step passed its wall-clock limit (the whole process tree is
  killed).
* ``error``   -- a sandbox limit ended the program (memory, file size, processes, CPU time) or
  the sandbox itself could not be set up.
* ``skipped`` -- not judged: the language's toolchain (or a library the tests need) is missing,
  the sample has no tests, or the language is unknown. ``detail`` says why and how to fix it.

Only ``passed`` counts as correct for pass@k.

Completion truncation (``truncate_completion``), applied to the raw generated text:

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

Program assembly (``build_program``), per language:

* python: prompt + completion + test, then ``check(<entry_point>)`` unless the test already
  calls ``check`` at top level (HumanEval-X's Python tests do, the HumanEval package's do not).
* cpp: ``#include "harness_std.h"`` (common standard headers: the prompts include few, and the
  reference solutions rely on those in ``declaration``; precompiled once and kept, which
  makes each build about three times faster), prompt + completion + test; ``g++ -std=c++17``,
  linked with ``-lcrypto`` (one test uses ``openssl/md5.h``; two use ``boost/any.hpp``).
* java: prompt + completion + test in ``Main.java`` (``class Solution`` + ``public class Main``),
  ``javac`` then ``java -ea Main``.
* js: prompt + completion + test in ``main.js``, run by ``node`` with a preloaded hook that
  makes a failed ``console.assert`` (which Node only prints) set a non-zero exit status.
* go: ``test_setup`` (``package main`` + testing/testify imports) + the standard-library imports
  the code uses (the prompt's ``import`` block is removed and its packages, plus a list of
  common ones, are imported only when referenced -- Go rejects unused and duplicate imports)
  + prompt + completion + test in ``main_test.go``; ``go test -c`` then the test binary. Go runs
  offline in GOPATH mode (``GO111MODULE=off``, ``GOPATH=/usr/share/gocode`` where Debian's
  ``golang-github-stretchr-testify-dev`` puts testify, ``GOPROXY=off``), with a per-run
  ``GOCACHE`` seeded by hard links from a cache warmed once and kept (a cold build of
  testify costs ~3 s per program, a warm one ~0.6 s). Vet is off (``-vet=off``).

Python programs run under a ``python3`` the sandbox uid can execute: ``sys.executable`` if it
can, else ``python3`` on the sandbox ``PATH`` (``Limits.python`` overrides). The precompiled
header, the warm Go cache and the uid lock files live in ``<tmp>/spec-harness-sandbox-<euid>/``
(private to the harness's user; seeds are keyed by the tool binaries, read-only, and safe to
delete).

The sandbox (``isolation()`` reports what works on this machine). Every build and run step is
a separate process tree, started through a small launcher, in a fresh temporary directory that
is its working directory and ``HOME``/``TMPDIR``:

* wall-clock limit: the step runs in its own session; on timeout the process group is
  SIGKILLed, and stray processes are swept (see below).
* a dedicated unprivileged uid/gid (``SANDBOX_UID_BASE`` + slot, one per concurrent run, no
  supplementary groups) when the harness runs as root. This is what makes ``RLIMIT_NPROC``
  bite (the kernel does not enforce it for root), keeps the program from writing anything it
  does not own, and from signalling the harness. After a run, everything left with that uid is
  killed (``kill(-1, SIGKILL)`` from a helper with that uid). Without root the program runs as
  the harness's user, ``RLIMIT_NPROC`` counts the user's current tasks plus the limit, and
  leftovers are found by a per-run token in their environment (``SANDBOX_ENV_MARKER``).
* namespaces (``unshare``): a new network namespace (only a down loopback: no network at all,
  not even 127.0.0.1), PID namespace (when its first process exits the kernel kills the rest:
  nothing outlives a run) and IPC namespace. As root this needs CAP_SYS_ADMIN; without root, an
  unprivileged user namespace. Each is used when the probe shows it works.
* Landlock (Linux >= 5.13): writes, creations, removals and renames are allowed only beneath the
  temporary directory (and to ``/dev/null``), so world-writable places like ``/tmp`` and
  ``/dev/shm`` are closed too; on ABI >= 4 TCP bind/connect is denied as well (a second line
  for the network), on ABI >= 6 abstract unix sockets and signals are scoped to the sandbox.
* resource limits: ``RLIMIT_AS`` (address space) = ``memory_mb`` for Python and compiled C++
  programs; ``RLIMIT_DATA`` (heap and other private writable memory) = ``memory_mb`` for every
  step. The JVM reserves GiB of address space up front and does not even start under an
  ``RLIMIT_AS`` of 1 GiB (measured); V8 and the Go runtime also reserve address space they do
  not use, so an address-space cap would measure the wrong thing: Java, JS and Go get only
  ``RLIMIT_DATA``, plus their own heap caps (``-Xmx``, ``--max-old-space-size`` = half of
  ``memory_mb``). Build steps (g++, javac, go) get ``RLIMIT_DATA`` = ``compile_memory_mb``.
  Also ``RLIMIT_NPROC`` (tasks, threads count), ``RLIMIT_FSIZE`` (largest file, stdout/stderr
  included), ``RLIMIT_CPU`` (a backstop), ``RLIMIT_NOFILE``, no core files.
* the environment is replaced: ``PATH=/usr/local/bin:/usr/bin:/bin``, ``HOME`` and ``TMPDIR`` =
  the temporary directory, ``LANG=C.UTF-8`` and the few variables a toolchain needs (Go).

Not covered: total disk use (only the size of each file is capped), memory across processes
(rlimits are per process; no cgroups), and, without a network namespace, UDP and non-TCP
sockets (Landlock covers TCP only).
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import io
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tokenize
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from tasks.base import Sample

LANGUAGES = ("python", "cpp", "java", "js", "go")
STATUSES = ("passed", "failed", "timeout", "error", "skipped")
MAIN_FILE = {"python": "main.py", "cpp": "main.cpp", "java": "Main.java", "js": "main.js", "go": "main_test.go"}
ALIASES = {"py": "python", "c++": "cpp", "javascript": "js", "golang": "go"}
SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_UID_BASE = 61000  # uids SANDBOX_UID_BASE .. + SANDBOX_SLOTS - 1, used only by the sandbox
SANDBOX_SLOTS = 256
SANDBOX_ENV_MARKER = "SPEC_HARNESS_SANDBOX"  # set in every step's environment to a per-run token
GO_PATHS = ("/usr/share/gocode",)  # GOPATH candidates holding github.com/stretchr/testify
# HumanEval-X reference solutions that fail their own tests (dataset defects, not the harness):
KNOWN_BAD_REFERENCES = {
    "JavaScript/112": "returns (z, true) -- the comma operator -- instead of [t, true]",
    "JavaScript/155": "evenOddCount(0) gives [0, 0], the test wants [1, 0]",
    "JavaScript/162": "requires the npm package js-md5, which Node does not ship",
}
INSTALL_HINT = {
    "python": "install python3",
    "cpp": "apt-get install g++",
    "java": "apt-get install openjdk-17-jdk-headless",
    "js": "apt-get install nodejs",
    "go": "apt-get install golang-go golang-github-stretchr-testify-dev",
}


@dataclass
class Limits:
    """Per-step limits of the sandbox. Times are wall-clock seconds."""

    timeout_s: float = 10.0  # each run step (the tests)
    compile_timeout_s: float = 60.0  # each build step (g++, javac, go test -c)
    memory_mb: int = 1024  # RLIMIT_DATA of every run step; also RLIMIT_AS for Python and C++
    compile_memory_mb: int = 2048  # RLIMIT_DATA of build steps
    max_processes: int = 128  # RLIMIT_NPROC: tasks (processes and threads) of the sandbox uid
    max_file_mb: int = 64  # RLIMIT_FSIZE: largest file a step may write (stdout/stderr too)
    max_open_files: int = 1024  # RLIMIT_NOFILE
    output_chars: int = 1500  # how much of the output's tail goes into ``detail``
    python: Optional[str] = None  # interpreter for Python programs; default: one the sandbox can run
    cpp_std: str = "c++17"


@dataclass
class ExecResult:
    status: str  # one of STATUSES
    detail: str = ""
    seconds: float = 0.0  # wall time of all steps
    returncode: Optional[int] = None  # of the last step run (negative: killed by that signal)
    stdout: str = ""  # tail of the last step's output
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
    """
    if n < 1 or k < 1 or not 0 <= c <= n:
        raise ValueError(f"pass@k needs n >= 1, k >= 1 and 0 <= c <= n (got n={n}, c={c}, k={k})")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with only {n} samples")
    if n - c < k:  # every draw of k contains a correct one
        return 1.0
    miss = 1.0
    for i in range(n - c + 1, n + 1):
        miss *= 1.0 - k / i
    return 1.0 - miss


def _get(obj: Any, key: str, default: Any = None) -> Any:
    if isinstance(obj, Mapping):
        return obj.get(key, default)
    return getattr(obj, key, default)


def pass_at_k_table(results: Iterable[Any], ks: Iterable[int] = (1,)) -> list[dict[str, Any]]:
    """pass@k per (method, task, language) from per-completion results.

    ``results`` are dicts (or objects) with ``method``, ``task``, ``language``, ``sample_id`` and
    ``status`` -- what ``score_records`` returns. Several results for one (method, sample) are
    its ``n`` completions. ``skipped`` results are left out (not judged); a sample with fewer
    than k judged completions does not count towards pass@k. Rows are sorted; each holds
    ``problems``, ``completions``, ``passed``, ``skipped`` and ``pass@<k>`` (None if no problem
    has k completions).
    """
    ks = sorted(set(int(k) for k in ks))
    groups: dict[tuple, dict[str, list[bool]]] = {}
    skipped: dict[tuple, int] = {}
    for r in results:
        key = (str(_get(r, "method", "")), str(_get(r, "task", "")), str(_get(r, "language") or ""))
        if _get(r, "status") == "skipped":
            skipped[key] = skipped.get(key, 0) + 1
            groups.setdefault(key, {})
            continue
        groups.setdefault(key, {}).setdefault(str(_get(r, "sample_id")), []).append(_get(r, "status") == "passed")
    rows = []
    for key in sorted(groups):
        per_problem = groups[key]
        row: dict[str, Any] = {
            "method": key[0],
            "task": key[1],
            "language": key[2],
            "problems": len(per_problem),
            "completions": sum(len(v) for v in per_problem.values()),
            "passed": sum(sum(v) for v in per_problem.values()),
            "skipped": skipped.get(key, 0),
        }
        for k in ks:
            vals = [pass_at_k(len(v), sum(v), k) for v in per_problem.values() if len(v) >= k]
            row[f"pass@{k}"] = sum(vals) / len(vals) if vals else None
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- truncation


def normalise_language(language: Optional[str]) -> str:
    name = str(language or "").strip().lower()
    return ALIASES.get(name, name)


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


def _close_at_depth_zero(text: str, language: str, start: int = 0) -> tuple[int, int]:
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
    end, depth = _close_at_depth_zero(prompt + completion, language, len(prompt))
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
        end, _ = _close_at_depth_zero(completion[brace:], language)
        if end < 0:
            break
        cut = brace + end
    return completion[:cut]


# --------------------------------------------------------------------------- assembly

CPP_HEADERS = [
    "stdio.h", "stdlib.h", "math.h", "string.h", "limits.h",
    "algorithm", "vector", "string", "map", "set", "unordered_map", "unordered_set",
    "sstream", "iostream", "climits", "cmath", "numeric", "queue", "stack", "deque", "list",
    "utility", "functional", "bitset",
]  # fmt: skip

CPP_HEADER_FILE = "harness_std.h"  # included first by C++ programs; precompiled once per process
CPP_HEADER_TEXT = "".join(f"#include <{h}>\n" for h in CPP_HEADERS)

# Go standard packages a completion may use without importing them (import path -> identifier)
GO_STD_PACKAGES = [
    "math", "strings", "fmt", "strconv", "sort", "time", "regexp", "bytes", "unicode",
    "unicode/utf8", "math/rand", "math/big", "math/bits", "crypto/md5", "encoding/hex",
    "container/heap", "container/list", "errors", "reflect",
]  # fmt: skip

_GO_IMPORT_RE = re.compile(r'^\s*(?:import\s+)?(?:[A-Za-z_]\w*\s+)?"([^"]+)"\s*$', re.M)


def _go_imports(block: str) -> list[str]:
    return _GO_IMPORT_RE.findall(block or "")


def _strip_go_comments_and_strings(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)
    code = re.sub(r"//[^\n]*", " ", code)
    code = re.sub(r"`[^`]*`", '""', code)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', code)


def _go_program(meta: Mapping[str, Any], prompt: str, completion: str) -> str:
    setup = meta.get("test_setup") or 'package main\n\nimport (\n    "testing"\n    "github.com/stretchr/testify/assert"\n)\n'
    import_block = meta.get("import") or ""
    body = prompt
    if import_block.strip() and import_block in body:
        body = body.replace(import_block, "", 1)
    else:  # drop any import block at the top of the prompt
        body = re.sub(r"^\s*import\s*(\([^)]*\)|\"[^\"]*\")\s*", "", body)
    code = body + completion
    candidates = list(dict.fromkeys(_go_imports(import_block) + _go_imports(prompt) + GO_STD_PACKAGES))
    have = set(_go_imports(setup))
    visible = _strip_go_comments_and_strings(code)
    extra = [p for p in candidates if p not in have and re.search(r"\b" + re.escape(p.rsplit("/", 1)[-1]) + r"\.", visible)]
    imports = ("import (\n" + "".join(f'    "{p}"\n' for p in extra) + ")\n") if extra else ""
    return setup + "\n" + imports + "\n" + code + "\n\n" + meta.get("test", "") + "\n"


_TOP_LEVEL_CHECK = re.compile(r"^check\s*\(", re.M)
_PY_DEF = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.M)


def build_program(sample: "Sample", completion: str) -> dict[str, str]:
    """The program files for ``sample``'s tests run on ``completion`` (already truncated)."""
    language = normalise_language(sample.language or "python")
    meta = sample.meta or {}
    prompt = sample.turns[0]
    test = meta.get("test") or ""
    if language == "python":
        text = prompt + completion + "\n\n" + test + "\n"
        if not _TOP_LEVEL_CHECK.search(test):
            entry = meta.get("entry_point")
            if not entry:
                defs = _PY_DEF.findall(meta.get("declaration") or prompt)
                entry = defs[-1] if defs else None
            if not entry:
                raise ValueError(f"{sample.id}: no entry point to call check() with")
            text += f"\ncheck({entry})\n"
        return {MAIN_FILE["python"]: text}
    if language == "cpp":
        return {
            CPP_HEADER_FILE: CPP_HEADER_TEXT,
            MAIN_FILE["cpp"]: f'#include "{CPP_HEADER_FILE}"\n' + prompt + completion + "\n" + test + "\n",
        }
    if language == "java":
        return {MAIN_FILE["java"]: prompt + completion + "\n" + test + "\n"}
    if language == "js":
        return {MAIN_FILE["js"]: prompt + completion + "\n" + test + "\n"}
    if language == "go":
        return {MAIN_FILE["go"]: _go_program(meta, prompt, completion)}
    raise ValueError(f"unknown language {language!r}")


# --------------------------------------------------------------------------- sandbox launcher

# Runs as the harness's user (root or not) with ``-I -S``; argv[1] is a JSON config, fd
# ``status_fd`` reports setup errors and, in PID-namespace mode, the program's wait status.
_LAUNCHER = r"""
import ctypes, json, os, resource, struct, sys
cfg = json.loads(sys.argv[1])
fd = cfg["status_fd"]
libc = ctypes.CDLL(None, use_errno=True)
def report(obj):
    try:
        os.write(fd, (json.dumps(obj) + "\n").encode())
    except OSError:
        pass
def fail(what):
    report({"setup_error": what})
    os._exit(125)
def errno_text():
    return os.strerror(ctypes.get_errno())
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
flags = cfg["unshare"]
if flags:
    if cfg.get("userns"):
        uid, gid = os.getuid(), os.getgid()
    if libc.unshare(ctypes.c_int(flags)) != 0:
        fail("unshare: " + errno_text())
    if cfg.get("userns"):
        try:
            with open("/proc/self/setgroups", "w") as f:
                f.write("deny")
            with open("/proc/self/uid_map", "w") as f:
                f.write("%d %d 1" % (uid, uid))
            with open("/proc/self/gid_map", "w") as f:
                f.write("%d %d 1" % (gid, gid))
        except OSError as e:
            fail("user namespace maps: %s" % e)
if cfg["pidns"]:
    pid = os.fork()
    if pid:  # the launcher: wait for the namespace's first process, mirror its exit
        while True:
            try:
                _, st = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
        os._exit(os.waitstatus_to_exitcode(st) & 0xFF if os.WIFEXITED(st) else 124)
    # pid 1 of the new namespace: run the program as pid 2 and report its status
    child = os.fork()
    if child:
        while True:
            try:
                p, st = os.waitpid(-1, 0)
            except ChildProcessError:
                os._exit(0)
            except InterruptedError:
                continue
            if p == child:
                if os.WIFSIGNALED(st):
                    report({"signal": os.WTERMSIG(st)})
                else:
                    report({"exit": os.WEXITSTATUS(st)})
                os._exit(0)  # the kernel now kills whatever is left in the namespace
try:
    for name, value in cfg["rlimits"].items():
        res = getattr(resource, name)
        soft, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY and value > hard:
            value = hard
        resource.setrlimit(res, (value, value))
except (OSError, ValueError) as e:
    fail("setrlimit %s: %s" % (name, e))
try:
    os.chdir(cfg["cwd"])
except OSError as e:
    fail("chdir: %s" % e)
if cfg.get("uid") is not None:
    try:
        os.setgroups([])
        os.setgid(cfg["gid"])
        os.setuid(cfg["uid"])
    except OSError as e:
        fail("dropping privileges: %s" % e)
if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
    fail("no_new_privs: " + errno_text())
ll = cfg.get("landlock")
if ll:
    abi = ll["abi"]
    fs_write = (1 << 1) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 9) | (1 << 10) | (1 << 11) | (1 << 12)
    if abi >= 2:
        fs_write |= 1 << 13  # REFER
    if abi >= 3:
        fs_write |= 1 << 14  # TRUNCATE
    net = ((1 << 0) | (1 << 1)) if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP
    scoped = ((1 << 0) | (1 << 1)) if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    if abi >= 6:
        attr = struct.pack("QQQ", fs_write, net, scoped)
    elif abi >= 4:
        attr = struct.pack("QQ", fs_write, net)
    else:
        attr = struct.pack("Q", fs_write)
    buf = ctypes.create_string_buffer(attr, len(attr))
    rs = libc.syscall(444, buf, ctypes.c_size_t(len(attr)), 0)
    if rs < 0:
        fail("landlock_create_ruleset: " + errno_text())
    file_rights = (1 << 1) | ((1 << 14) if abi >= 3 else 0)
    for path, rights in [(p, fs_write) for p in ll["dirs"]] + [(p, file_rights) for p in ll["files"]]:
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError as e:
            fail("landlock path %s: %s" % (path, e))
        rule = ctypes.create_string_buffer(struct.pack("=Qi", rights & fs_write, pfd), 12)
        if libc.syscall(445, rs, 1, rule, 0) != 0:
            fail("landlock_add_rule %s: %s" % (path, errno_text()))
        os.close(pfd)
    if libc.syscall(446, rs, 0) != 0:
        fail("landlock_restrict_self: " + errno_text())
    os.close(rs)
os.close(fd)
try:
    os.execve(cfg["argv"][0], cfg["argv"], cfg["env"])
except OSError as e:
    sys.stderr.write("sandbox: cannot execute %s: %s\n" % (cfg["argv"][0], e))
    os._exit(127)
"""

CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000


@dataclass(frozen=True)
class Isolation:
    """What the sandbox can use on this machine (``isolation()`` probes it once)."""

    uid_drop: bool  # programs run as a dedicated unprivileged uid (harness is root)
    unshare_flags: int  # namespaces each step gets
    userns: bool  # those namespaces come with a user namespace (harness not root)
    landlock_abi: int  # 0: no Landlock
    notes: tuple[str, ...] = ()  # what did not work, and why

    @property
    def network_isolated(self) -> bool:
        return bool(self.unshare_flags & CLONE_NEWNET)

    @property
    def tcp_blocked(self) -> bool:
        return self.network_isolated or self.landlock_abi >= 4

    @property
    def pid_namespace(self) -> bool:
        return bool(self.unshare_flags & CLONE_NEWPID)

    @property
    def filesystem_confined(self) -> bool:
        """Writes outside the temporary directory fail (not only where the uid lacks permission)."""
        return self.landlock_abi >= 1

    @property
    def process_limit(self) -> bool:
        return self.uid_drop or os.geteuid() != 0

    def describe(self) -> str:
        parts = [
            "dedicated uid" if self.uid_drop else ("own uid" if os.geteuid() != 0 else "root (no uid drop!)"),
            "net namespace" if self.network_isolated else "no net namespace",
            "pid namespace" if self.pid_namespace else "no pid namespace",
            f"landlock abi {self.landlock_abi}" if self.landlock_abi else "no landlock",
        ]
        if self.userns:
            parts.append("user namespace")
        return ", ".join(parts) + ("; " + "; ".join(self.notes) if self.notes else "")


def _landlock_abi() -> int:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        abi = libc.syscall(444, None, ctypes.c_size_t(0), 1)  # LANDLOCK_CREATE_RULESET_VERSION
        return max(int(abi), 0)
    except (OSError, AttributeError):
        return 0


def _other_can_run(path: str) -> bool:
    """Whether an unprivileged other user can execute ``path`` (mode bits along the path)."""
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
        if not st.st_mode & 0o001:
            return False
        parent = os.path.dirname(real)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def _which(tool: str) -> Optional[str]:
    found = shutil.which(tool, path=SANDBOX_PATH)
    if found and os.geteuid() == 0 and not _other_can_run(found):
        return None
    return found


_slot_lock = threading.Lock()
_STATE_DIR_NAME = "spec-harness-sandbox"


def _state_dir() -> Path:
    """A private directory for lock files and the Go cache seed (per user)."""
    d = Path(tempfile.gettempdir()) / f"{_STATE_DIR_NAME}-{os.geteuid()}"
    d.mkdir(mode=0o700, exist_ok=True)
    st = d.stat()
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        raise RuntimeError(f"{d} is not a private directory of this user; remove it")
    return d


class _Slot:
    """A claimed sandbox uid (root) -- one per concurrent run, locked across processes."""

    def __init__(self) -> None:
        self.uid: Optional[int] = None
        self._fd: Optional[int] = None

    def claim(self) -> None:
        locks = _state_dir()
        for i in range(SANDBOX_SLOTS):
            uid = SANDBOX_UID_BASE + i
            try:
                pwd.getpwuid(uid)
                continue  # a real account: not ours to use
            except KeyError:
                pass
            fd = os.open(locks / f"uid-{uid}.lock", os.O_CREAT | os.O_RDWR | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self.uid, self._fd = uid, fd
            return
        raise RuntimeError(f"all {SANDBOX_SLOTS} sandbox uids are busy")

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
        self._fd = self.uid = None


def _sweep_uid(uid: int) -> None:
    """Kill every process of ``uid`` (a sandbox uid): a helper with that uid sends kill(-1)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            for _ in range(1000):
                try:
                    os.kill(-1, signal.SIGKILL)  # every process of this uid but this one
                except ProcessLookupError:
                    break
                time.sleep(0.001)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def _sweep_marked(token: str) -> None:
    """Kill this user's processes whose environment carries ``token`` (no sandbox uid to sweep).

    Forked children share the parent's environment block, so this finds a run's leftovers
    unless a program went out of its way to rewrite its own environment memory.
    """
    marker = f"{SANDBOX_ENV_MARKER}={token}".encode()
    me = os.getpid()
    for _ in range(50):
        found = 0
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                if marker not in Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0"):
                    continue
                os.kill(int(entry.name), signal.SIGKILL)
                found += 1
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.01)


def _count_tasks(uid: int) -> int:
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                text = f.read()
        except OSError:
            continue
        m = re.search(r"^Uid:\s+(\d+)", text, re.M)
        t = re.search(r"^Threads:\s+(\d+)", text, re.M)
        if m and int(m.group(1)) == uid:
            n += int(t.group(1)) if t else 1
    return n


@dataclass
class _Step:
    returncode: Optional[int]  # negative: signal
    timed_out: bool
    seconds: float
    stdout: str
    stderr: str
    setup_error: Optional[str] = None
    stderr_head: str = ""  # the start of stderr too: fatal messages come before long traces


def _head(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            return f.read(chars * 4).decode("utf-8", "replace")[:chars]
    except OSError:
        return ""


def _tail(path: Path, chars: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars * 4))
            data = f.read()
    except OSError:
        return ""
    text = data.decode("utf-8", "replace")
    return text[-chars:]


class Sandbox:
    """One fresh temporary directory and the means to run steps in it (a context manager)."""

    def __init__(self, limits: Limits, iso: Optional[Isolation] = None):
        self.limits = limits
        self.iso = iso if iso is not None else isolation()
        self.slot = _Slot()
        self.base: Optional[Path] = None
        self.work: Optional[Path] = None
        self._steps = 0
        self._needs_sweep = False
        self.token = secrets.token_hex(8)

    @property
    def uid(self) -> Optional[int]:
        return self.slot.uid

    def __enter__(self) -> "Sandbox":
        if self.iso.uid_drop:
            self.slot.claim()
        self.base = Path(tempfile.mkdtemp(prefix="spec-harness-exec-"))
        os.chmod(self.base, 0o711)
        self.work = self.base / "work"
        self.work.mkdir(mode=0o700)
        if self.uid is not None:
            os.chown(self.work, self.uid, self.uid)
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self._needs_sweep and self.uid is not None:
                _sweep_uid(self.uid)
            elif self._needs_sweep and os.geteuid() != 0:
                _sweep_marked(self.token)
        finally:
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
            self.slot.release()

    def write(self, name: str, text: str) -> Path:
        assert self.work is not None
        path = self.work / name
        if path.resolve().parent != self.work.resolve():
            raise ValueError(f"program file names must be plain names, got {name!r}")
        path.write_text(text, encoding="utf-8")
        os.chmod(path, 0o644)
        return path

    def run(
        self,
        argv: list[str],
        timeout: float,
        memory_mb: int,
        address_space: bool,
        env: Optional[dict[str, str]] = None,
    ) -> _Step:
        assert self.base is not None and self.work is not None
        lim = self.limits
        self._steps += 1
        out_path = self.base / f"step{self._steps}.out"
        err_path = self.base / f"step{self._steps}.err"
        mb = 1024 * 1024
        rlimits: dict[str, int] = {
            "RLIMIT_DATA": memory_mb * mb,
            "RLIMIT_FSIZE": lim.max_file_mb * mb,
            "RLIMIT_NOFILE": lim.max_open_files,
            "RLIMIT_CPU": int(2 * timeout) + 5,
            "RLIMIT_CORE": 0,
        }
        if address_space:
            rlimits["RLIMIT_AS"] = memory_mb * mb
        if self.iso.uid_drop:
            rlimits["RLIMIT_NPROC"] = lim.max_processes
        elif os.geteuid() != 0:
            rlimits["RLIMIT_NPROC"] = _count_tasks(os.geteuid()) + lim.max_processes
        full_env = {
            "PATH": SANDBOX_PATH,
            "HOME": str(self.work),
            "TMPDIR": str(self.work),
            "LANG": "C.UTF-8",
            SANDBOX_ENV_MARKER: self.token,
        }
        full_env.update(env or {})
        exe = argv[0] if os.sep in argv[0] else (shutil.which(argv[0], path=SANDBOX_PATH) or argv[0])
        r, w = os.pipe()
        cfg: dict[str, Any] = {
            "argv": [exe] + list(argv[1:]),
            "env": full_env,
            "cwd": str(self.work),
            "rlimits": rlimits,
            "uid": self.uid,
            "gid": self.uid,
            "unshare": self.iso.unshare_flags,
            "userns": self.iso.userns,
            "pidns": self.iso.pid_namespace,
            "status_fd": w,
            "landlock": (
                {"abi": self.iso.landlock_abi, "dirs": [str(self.work)], "files": ["/dev/null"]}
                if self.iso.landlock_abi
                else None
            ),
        }
        t0 = time.monotonic()
        timed_out = False
        try:
            with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-S", "-c", _LAUNCHER, json.dumps(cfg)],
                    stdin=subprocess.DEVNULL,
                    stdout=fo,
                    stderr=fe,
                    cwd=str(self.base),
                    env={"PATH": SANDBOX_PATH, "LANG": "C.UTF-8"},
                    start_new_session=True,
                    close_fds=True,
                    pass_fds=(w,),
                )
            os.close(w)
            w = -1
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                self._needs_sweep = True
            seconds = time.monotonic() - t0
            chunks = []
            while True:
                data = os.read(r, 65536)
                if not data:
                    break
                chunks.append(data)
        finally:
            if w >= 0:
                os.close(w)
            os.close(r)
        if not self.iso.pid_namespace:
            self._needs_sweep = True  # background processes would outlive the step
        returncode: Optional[int] = proc.returncode
        setup_error = None
        for line in b"".join(chunks).decode("utf-8", "replace").splitlines():
            with contextlib.suppress(ValueError):
                msg = json.loads(line)
                if "setup_error" in msg:
                    setup_error = msg["setup_error"]
                elif "signal" in msg:
                    returncode = -int(msg["signal"])
                elif "exit" in msg:
                    returncode = int(msg["exit"])
        if timed_out:
            returncode = None
        return _Step(
            returncode=returncode,
            timed_out=timed_out,
            seconds=seconds,
            stdout=_tail(out_path, lim.output_chars),
            stderr=_tail(err_path, lim.output_chars),
            setup_error=setup_error,
            stderr_head=_head(err_path, 4000),
        )


_iso_lock = threading.Lock()
_iso_cache: Optional[Isolation] = None


def isolation(refresh: bool = False) -> Isolation:
    """Probe (once) which isolation mechanisms work here, trying the strongest first."""
    global _iso_cache
    with _iso_lock:
        if _iso_cache is not None and not refresh:
            return _iso_cache
        root = os.geteuid() == 0
        notes: list[str] = []
        abi = _landlock_abi()
        if not abi:
            notes.append("Landlock unavailable (kernel < 5.13 or disabled): writes are limited only by file permissions")
        want = CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC
        if root:
            tries = [(want, False), (CLONE_NEWNET | CLONE_NEWIPC, False), (CLONE_NEWPID, False), (0, False)]
        else:
            tries = [(want | CLONE_NEWUSER, True), (0, False)]
        probe_limits = Limits(max_processes=64)
        chosen: Optional[Isolation] = None
        candidates = [
            Isolation(uid_drop=drop, unshare_flags=flags, userns=userns, landlock_abi=ll)
            for drop in ([True, False] if root else [False])
            for ll in ([abi, 0] if abi else [0])
            for flags, userns in tries
        ]
        for iso in candidates:
            try:
                with Sandbox(probe_limits, iso) as sb:
                    step = sb.run(["/bin/true"], timeout=30, memory_mb=256, address_space=True)
            except Exception as e:  # noqa: BLE001 - a probe: anything wrong means 'not this one'
                notes.append(f"probe {iso.describe()}: {type(e).__name__}: {e}")
                continue
            if step.returncode == 0 and not step.setup_error:
                chosen = iso
                break
            notes.append(f"{iso.describe()} failed: {step.setup_error or step.stderr.strip() or step.returncode}")
        if chosen is None:
            notes.append("no sandbox configuration started /bin/true; runs will report errors")
            chosen = Isolation(uid_drop=False, unshare_flags=0, userns=False, landlock_abi=0)
        if not chosen.network_isolated:
            notes.append("no network namespace (needs CAP_SYS_ADMIN, or unprivileged user namespaces)")
        _iso_cache = Isolation(chosen.uid_drop, chosen.unshare_flags, chosen.userns, chosen.landlock_abi, tuple(notes))
        return _iso_cache


# --------------------------------------------------------------------------- languages

_MEMORY_PATTERNS = [
    ("OutOfMemoryError", "memory limit (OutOfMemoryError)"),
    ("MemoryError", "memory limit (MemoryError)"),
    ("std::bad_alloc", "memory limit (std::bad_alloc)"),
    ("heap out of memory", "memory limit (JavaScript heap)"),
    ("Fatal process out of memory", "memory limit (V8)"),
    ("runtime: out of memory", "memory limit (Go runtime)"),
    ("Cannot allocate memory", "memory limit"),
    ("insufficient memory for the Java Runtime", "memory limit (JVM)"),
    ("Resource temporarily unavailable", "process limit"),
    ("unable to create native thread", "process limit (threads)"),
    ("failed to create new OS thread", "process limit (threads)"),
    ("File size limit exceeded", "file size limit"),
    ("File too large", "file size limit"),
]
_LIMIT_SIGNALS = {signal.SIGXCPU: "CPU time limit (SIGXCPU)", signal.SIGXFSZ: "file size limit (SIGXFSZ)", signal.SIGKILL: "killed (SIGKILL)"}


def _limit_hit(step: _Step) -> Optional[str]:
    if step.returncode is not None and step.returncode < 0 and -step.returncode in _LIMIT_SIGNALS:
        return _LIMIT_SIGNALS[signal.Signals(-step.returncode)]
    text = step.stderr_head + "\n" + step.stderr + "\n" + step.stdout
    for pattern, what in _MEMORY_PATTERNS:
        if pattern in text:
            return what
    return None


def _describe_exit(step: _Step) -> str:
    rc = step.returncode
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def _with_output(head: str, step: _Step, chars: int) -> str:
    out = (step.stderr.strip() + ("\n" if step.stderr.strip() and step.stdout.strip() else "") + step.stdout.strip()).strip()
    if len(out) > chars:
        out = "..." + out[-chars:]
    return head + (": " + out if out else "")


def _toolchain(language: str, limits: Limits) -> tuple[Optional[dict[str, str]], str]:
    """Paths of the tools a language needs, or (None, why not)."""
    hint = INSTALL_HINT.get(language, "")
    if language == "python":
        candidates = [limits.python] if limits.python else [sys.executable, "python3"]
        for c in candidates:
            path = c if c and os.sep in c else (_which(c) if c else None)
            if path and os.path.exists(path) and (os.geteuid() != 0 or _other_can_run(path)):
                return {"python": path}, ""
        return None, f"no python interpreter the sandbox user can run ({hint})"
    need = {"cpp": ["g++"], "java": ["javac", "java"], "js": ["node"], "go": ["go"]}.get(language)
    if need is None:
        return None, f"unknown language {language!r}"
    tools = {}
    for t in need:
        p = _which(t)
        if not p:
            return None, f"{t} not installed ({hint})"
        tools[t] = p
    if language == "go":
        for gp in [os.environ.get("GOPATH", "")] + list(GO_PATHS):
            if gp and os.path.isdir(os.path.join(gp, "src", "github.com", "stretchr", "testify", "assert")):
                tools["gopath"] = gp
                break
        else:
            return None, f"testify not found under {', '.join(GO_PATHS)} ({hint})"
    return tools, ""


def _go_env(work: Path, gopath: str) -> dict[str, str]:
    return {
        "GO111MODULE": "off",
        "GOPATH": gopath,
        "GOCACHE": str(work / ".gocache"),
        "GOPROXY": "off",
        "GOFLAGS": "",
        "GOTOOLCHAIN": "local",
        "GOTELEMETRY": "off",
        "GOMAXPROCS": "2",
    }


_seed_lock = threading.Lock()
_seeds: dict[str, Optional[Path]] = {}

_GO_WARMUP = """package main

import (
    "testing"
    "github.com/stretchr/testify/assert"
)

func TestWarm(t *testing.T) {
    assert := assert.New(t)
    assert.Equal(1, 1)
}
"""


def _file_stamp(path: str) -> str:
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        return f"{real}:{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        return real


def _make_seed(
    key: str, files: Mapping[str, str], argv: list[str], product: str, limits: Limits, env: Any = None
) -> Optional[Path]:
    """Build something reusable (a warm Go cache, a precompiled header) once, keep it.

    The build runs in the sandbox like any other step; ``product`` (a file or directory it
    leaves in the work directory) goes to ``<state dir>/seed-<hash of key>/``, read-only and
    owned by the harness's user, where later runs and later processes find it (the key names
    the tool binaries, so an upgrade builds a new one); runs hard-link it into their own
    directory. None if the build fails (runs then just go slower).
    """
    import hashlib

    with _seed_lock:
        if key in _seeds:
            return _seeds[key]
        seed = None
        try:
            state = _state_dir()
            final = state / ("seed-" + hashlib.sha256(key.encode()).hexdigest()[:20])
            if (final / "complete").is_file() and (final / product).exists():
                seed = final / product
            else:
                with Sandbox(limits) as sb:
                    assert sb.work is not None
                    for name, text in files.items():
                        sb.write(name, text)
                    step = sb.run(
                        argv,
                        timeout=max(limits.compile_timeout_s, 120),
                        memory_mb=limits.compile_memory_mb,
                        address_space=False,
                        env=env(sb.work) if callable(env) else env,
                    )
                    built = sb.work / product
                    if step.returncode == 0 and built.exists():
                        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=state))
                        shutil.move(str(built), str(tmp / product))
                        for dirpath, dirnames, filenames in os.walk(tmp):
                            os.chown(dirpath, os.geteuid(), os.getegid())
                            os.chmod(dirpath, 0o755)
                            for name in filenames:
                                p = os.path.join(dirpath, name)
                                os.chown(p, os.geteuid(), os.getegid())
                                os.chmod(p, 0o444)
                        (tmp / "complete").write_text(key + "\n")
                        if final.exists():  # a stale or half-made one
                            shutil.rmtree(final, ignore_errors=True)
                        try:
                            os.rename(tmp, final)
                        except OSError:  # another process was quicker: use theirs
                            shutil.rmtree(tmp, ignore_errors=True)
                        if (final / product).exists():
                            seed = final / product
        except Exception:  # noqa: BLE001 - no seed only means slower builds
            seed = None
        _seeds[key] = seed
        return seed


def _go_seed_cache(tools: dict[str, str], limits: Limits) -> Optional[Path]:
    """A Go build cache with testify (and what it imports) already compiled."""
    return _make_seed(
        f"go:{_file_stamp(tools['go'])}:{_file_stamp(os.path.join(tools['gopath'], 'src/github.com/stretchr/testify/assert'))}",
        {"warm_test.go": _GO_WARMUP},
        [tools["go"], "test", "-c", "-o", "warm.test", "-vet=off"],
        ".gocache",
        limits,
        env=lambda work: _go_env(work, tools["gopath"]),
    )


def _cpp_pch(tools: dict[str, str], limits: Limits) -> Optional[Path]:
    """``CPP_HEADER_FILE`` precompiled (``.gch``): C++ builds take a third of the time."""
    return _make_seed(
        f"cpp:{_file_stamp(tools['g++'])}:{limits.cpp_std}:{CPP_HEADER_TEXT}",
        {CPP_HEADER_FILE: CPP_HEADER_TEXT},
        [tools["g++"], f"-std={limits.cpp_std}", "-x", "c++-header", CPP_HEADER_FILE, "-o", CPP_HEADER_FILE + ".gch"],
        CPP_HEADER_FILE + ".gch",
        limits,
    )


def _link_tree(src: Path, dest: Path, uid: Optional[int]) -> None:
    """Recreate ``src``'s directories under ``dest`` (owned by ``uid``) with hard-linked files."""
    for dirpath, _dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        d = dest if rel == "." else dest / rel
        d.mkdir(exist_ok=True)
        if uid is not None:
            os.chown(d, uid, uid)
        for name in filenames:
            if name == "trim.txt":
                continue
            _link_file(Path(dirpath) / name, d / name)


def _link_file(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def _judge_run(step: _Step, limits: Limits, timeout: float, language: str) -> ExecResult:
    chars = limits.output_chars
    if step.setup_error:
        return ExecResult("error", f"sandbox setup failed: {step.setup_error}", step.seconds, step.returncode, step.stdout, step.stderr)
    if step.timed_out:
        return ExecResult("timeout", _with_output(f"timed out after {timeout:g} s", step, 300), step.seconds, None, step.stdout, step.stderr)
    limit = _limit_hit(step) if step.returncode != 0 else None
    if limit:
        first = step.stderr_head.strip()[:300]
        return ExecResult("error", limit + (": " + first if first else ""), step.seconds, step.returncode, step.stdout, step.stderr)
    failed_assert = language == "js" and "Assertion failed" in step.stderr
    if step.returncode == 0 and not failed_assert:
        return ExecResult("passed", "", step.seconds, 0, step.stdout, step.stderr)
    head = "assertion failed" if failed_assert else _describe_exit(step)
    return ExecResult("failed", _with_output(head, step, chars), step.seconds, step.returncode, step.stdout, step.stderr)


def _judge_build(step: _Step, limits: Limits, what: str) -> Optional[ExecResult]:
    """None if the build step succeeded, else the result to return."""
    if step.setup_error:
        return ExecResult("error", f"sandbox setup failed: {step.setup_error}", step.seconds, step.returncode, step.stdout, step.stderr)
    if step.timed_out:
        return ExecResult("timeout", f"{what} timed out after {limits.compile_timeout_s:g} s", step.seconds, None, step.stdout, step.stderr)
    if step.returncode == 0:
        return None
    limit = _limit_hit(step)
    if limit and limit != "process limit":
        return ExecResult("error", _with_output(f"{what}: {limit}", step, limits.output_chars), step.seconds, step.returncode, step.stdout, step.stderr)
    return ExecResult("failed", _with_output(f"{what} failed", step, limits.output_chars), step.seconds, step.returncode, step.stdout, step.stderr)


_JS_HOOK = """'use strict';
// Node's console.assert only prints; make a failed assertion fail the run.
console.assert = function (condition, ...data) {
  if (!condition) {
    process.exitCode = 1;
    process.stderr.write('Assertion failed' + (data.length ? ': ' + data.join(' ') : '') + '\\n');
  }
};
"""


def run_program(language: str, files: Mapping[str, str], limits: Optional[Limits] = None) -> ExecResult:
    """Build and run a program in a fresh sandbox; ``files[MAIN_FILE[language]]`` is the entry.

    Python runs ``main.py``; C++ compiles ``main.cpp`` (+ other ``.cpp`` files given); Java
    compiles every ``.java`` file and runs ``Main``; JS runs ``main.js``; Go builds the package
    (``go test -c``) and runs its tests. A missing toolchain gives ``skipped``.
    """
    limits = limits or Limits()
    language = normalise_language(language)
    t0 = time.monotonic()
    if language not in LANGUAGES:
        return ExecResult("skipped", f"unknown language {language!r} (known: {', '.join(LANGUAGES)})")
    main = MAIN_FILE[language]
    if main not in files:
        raise ValueError(f"{language} programs need a {main} (got {', '.join(files) or 'no files'})")
    tools, why = _toolchain(language, limits)
    if tools is None:
        return ExecResult("skipped", why)
    seed = _go_seed_cache(tools, limits) if language == "go" else None
    mem, cmem = limits.memory_mb, limits.compile_memory_mb
    try:
        with Sandbox(limits) as sb:
            assert sb.work is not None
            for name, text in files.items():
                sb.write(name, text)
            spent = 0.0

            def finish(res: ExecResult) -> ExecResult:
                res.seconds = time.monotonic() - t0
                return res

            def build(argv: list[str], what: str, env: Optional[dict[str, str]] = None) -> Optional[ExecResult]:
                nonlocal spent
                step = sb.run(argv, limits.compile_timeout_s, cmem, address_space=False, env=env)
                spent += step.seconds
                return _judge_build(step, limits, what)

            def execute(argv: list[str], address_space: bool, env: Optional[dict[str, str]] = None) -> ExecResult:
                step = sb.run(argv, limits.timeout_s, mem, address_space=address_space, env=env)
                return finish(_judge_run(step, limits, limits.timeout_s, language))

            if language == "python":
                return execute([tools["python"], "-I", "-B", main], address_space=True)
            if language == "cpp":
                if files.get(CPP_HEADER_FILE) == CPP_HEADER_TEXT:
                    pch = _cpp_pch(tools, limits)
                    if pch is not None:
                        _link_file(pch, sb.work / (CPP_HEADER_FILE + ".gch"))
                sources = [n for n in files if n.endswith((".cpp", ".cc"))]
                bad = build([tools["g++"], f"-std={limits.cpp_std}", "-o", "main", *sources, "-lcrypto"], "compilation")
                if bad:
                    return finish(bad)
                return execute(["./main"], address_space=True)
            if language == "java":
                heap = max(64, mem // 2)
                jvm = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData", "-Xss8m"]
                sources = sorted(n for n in files if n.endswith(".java"))
                bad = build(
                    [tools["javac"], *(f"-J{o}" for o in jvm + [f"-Xmx{max(64, cmem // 2)}m"]), "-encoding", "UTF-8", "-nowarn", "-d", ".", *sources],
                    "compilation",
                )
                if bad:
                    return finish(bad)
                return execute(
                    [tools["java"], "-ea", *jvm, f"-Xmx{heap}m", f"-Djava.io.tmpdir={sb.work}", "-cp", ".", "Main"],
                    address_space=False,
                )
            if language == "js":
                sb.write("assert_hook.js", _JS_HOOK)
                return execute(
                    [tools["node"], f"--max-old-space-size={max(64, mem // 2)}", "--require", "./assert_hook.js", main],
                    address_space=False,
                )
            if language == "go":
                env = _go_env(sb.work, tools["gopath"])
                if seed is not None:
                    _link_tree(seed, sb.work / ".gocache", sb.uid)
                bad = build([tools["go"], "test", "-c", "-o", "main.test", "-vet=off"], "go build", env=env)
                if bad:
                    return finish(bad)
                run_env = {"GOMAXPROCS": "2", "GOTRACEBACK": "single"}
                return execute(["./main.test"], address_space=False, env=run_env)
    except OSError as e:
        return ExecResult("error", f"sandbox: {type(e).__name__}: {e}", time.monotonic() - t0)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- task level

_MISSING_HEADERS = {
    "boost/": ("/usr/include/boost", "apt-get install libboost-dev"),
    "openssl/": ("/usr/include/openssl", "apt-get install libssl-dev"),
}


def check_completion(sample: "Sample", completion: str, limits: Optional[Limits] = None, truncate: bool = True) -> ExecResult:
    """Run ``sample``'s tests on a raw generated ``completion`` (truncated first, see module doc)."""
    limits = limits or Limits()
    language = normalise_language(sample.language or "python")
    meta = sample.meta or {}
    if language not in LANGUAGES:
        return ExecResult("skipped", f"language {sample.language!r} has no test runner")
    if not meta.get("test"):
        return ExecResult("skipped", f"{sample.id} has no tests")
    prompt = sample.turns[0]
    body = truncate_completion(language, prompt, completion) if truncate else completion
    if language == "cpp":
        fixed = prompt + meta.get("test", "")
        for prefix, (where, hint) in _MISSING_HEADERS.items():
            if f"<{prefix}" in fixed.replace(" ", "") and not os.path.isdir(where):
                return ExecResult("skipped", f"the tests need {where} ({hint})")
    try:
        files = build_program(sample, body)
    except ValueError as e:
        return ExecResult("skipped", str(e))
    return run_program(language, files, limits)


def _record_dict(record: Any) -> dict[str, Any]:
    if isinstance(record, Mapping):
        return dict(record)
    if is_dataclass(record) and not isinstance(record, type):
        return asdict(record)
    return dict(vars(record))


def score_records(
    samples_by_id: Mapping[str, "Sample"],
    records: Iterable[Any],
    limits: Optional[Limits] = None,
    workers: int = 1,
    progress: Optional[Any] = None,
) -> list[dict[str, Any]]:
    """Judge each record's generated text: one result dict per record, in order.

    ``records`` are ``samples.jsonl`` rows (dicts, or ``Record`` objects) with ``method``,
    ``task``, ``sample_id``, ``text`` and optionally ``turn`` and ``language``. Only turn 0 is
    judged (the tasks with tests are single-turn); other turns are ``skipped``. Identical
    (sample, truncated completion) pairs -- every lossless method reproduces the baseline's
    text -- run once and share the verdict. ``workers`` runs that many programs at a time.
    ``progress``, if given, is called with (done, total) after each program.

    Each result: ``method``, ``task``, ``sample_id``, ``language``, ``status``, ``detail``,
    ``seconds`` (of the shared run).
    """
    limits = limits or Limits()
    rows = [_record_dict(r) for r in records]
    keys: list[Optional[tuple[str, str]]] = []
    jobs: dict[tuple[str, str], tuple["Sample", str]] = {}
    out: list[dict[str, Any]] = []
    for row in rows:
        sid = str(row.get("sample_id"))
        sample = samples_by_id.get(sid)
        language = row.get("language") or (sample.language if sample else None)
        res = {
            "method": row.get("method"),
            "task": row.get("task"),
            "sample_id": sid,
            "language": normalise_language(language) if language else None,
            "status": "skipped",
            "detail": "",
            "seconds": 0.0,
        }
        out.append(res)
        key = None
        if sample is None:
            res["detail"] = f"no sample {sid!r} among the {len(samples_by_id)} given"
        elif int(row.get("turn") or 0) != 0:
            res["detail"] = "only the first turn is judged"
        elif not (sample.meta or {}).get("test"):
            res["detail"] = f"{sid} has no tests"
        else:
            lang = normalise_language(sample.language or "python")
            text = str(row.get("text") or "")
            body = truncate_completion(lang, sample.turns[0], text) if lang in LANGUAGES else text
            key = (sid, body)
            jobs.setdefault(key, (sample, body))
        keys.append(key)
    verdicts: dict[tuple[str, str], ExecResult] = {}
    done = 0
    lock = threading.Lock()

    def work(key: tuple[str, str]) -> None:
        nonlocal done
        sample, body = jobs[key]
        try:
            res = check_completion(sample, body, limits, truncate=False)
        except Exception as e:  # noqa: BLE001 - one broken program must not stop the scoring
            res = ExecResult("error", f"harness: {type(e).__name__}: {e}")
        with lock:
            verdicts[key] = res
            done += 1
            if progress:
                progress(done, len(jobs))

    if workers <= 1:
        for key in jobs:
            work(key)
    else:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            list(pool.map(work, list(jobs)))
    for res, key in zip(out, keys):
        if key is not None:
            v = verdicts[key]
            res.update(status=v.status, detail=v.detail, seconds=round(v.seconds, 3))
    return out


__all__ = [
    "ALIASES", "ExecResult", "INSTALL_HINT", "Isolation", "KNOWN_BAD_REFERENCES", "LANGUAGES", "Limits", "MAIN_FILE", "SANDBOX_UID_BASE",
    "SANDBOX_SLOTS", "STATUSES", "Sandbox", "build_program", "check_completion", "isolation", "normalise_language",
    "pass_at_k", "pass_at_k_table", "run_program", "score_records", "truncate_completion",
]  # fmt: skip
