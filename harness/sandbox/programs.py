"""Program assembly: prompt + cut completion + the sample's tests, per language, ending with a
completion marker.

A test passes only when its test code ran to its end. Every assembled program therefore ends
with a statement that writes ``Program.marker`` -- a random token made for this program -- as
a line of its standard output, placed where only a normal end of the tests reaches:

* python: the last statement of ``main.py``, after ``check(<entry_point>)`` (added when the test
  does not call ``check`` itself: HumanEval-X's Python tests do, the HumanEval package's do
  not). ``sys.exit(0)``, ``os._exit(0)`` or killing a process in the function ends the program
  before it.
* cpp: the last statement of the test's ``int main()`` (inserted before its closing brace), so
  ``exit(0)`` in the function -- which runs the same exit handlers as a return from ``main`` --
  never reaches it.
* java: ``HarnessMain.main`` calls the test's ``Main.main`` and writes the marker when it
  returns; ``System.exit(0)`` in the method ends the JVM first.
* js: the last statement of ``main.js``; ``process.exit(0)`` ends Node before it.
* go: a ``TestMain`` writes it after ``m.Run()`` returned 0 (every test passed); ``os.Exit(0)``
  inside a test already counts as a failure in Go's test runner, ``syscall.Exit(0)`` skips it.

The marker is written to file descriptor 1 directly (not through ``sys.stdout`` /
``System.out`` / ``os.Stdout``, which the completion may have replaced). A program that goes
out of its way to read its own source and print the token is not caught: the marker guards
against completions that end the process early, not against code written to forge a pass.

Per language, besides the marker:

* cpp: ``#include "harness_std.h"`` (common standard headers: the prompts include few, and the
  reference solutions rely on those in ``declaration``; precompiled once and kept, which makes
  each build about three times faster), then prompt + completion + test.
* java: prompt + completion + test in ``Main.java`` (``class Solution`` + ``public class Main``).
* js: prompt + completion + test in ``main.js``.
* go: ``test_setup`` (``package main`` + testing/testify imports) + the standard-library imports
  the code uses (the prompt's ``import`` block is removed and its packages, plus a list of
  common ones, are imported only when referenced -- Go rejects unused and duplicate imports)
  + prompt + completion + test in ``main_test.go``.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

from harness.sandbox.cutting import close_at_depth_zero
from harness.sandbox.languages import MAIN_FILE, normalise_language

if TYPE_CHECKING:
    from tasks.base import Sample

CPP_HEADERS = [
    "stdio.h", "stdlib.h", "math.h", "string.h", "limits.h",
    "algorithm", "vector", "string", "map", "set", "unordered_map", "unordered_set",
    "sstream", "iostream", "climits", "cmath", "numeric", "queue", "stack", "deque", "list",
    "utility", "functional", "bitset",
]  # fmt: skip
CPP_HEADER_FILE = "harness_std.h"  # included first by C++ programs; precompiled once per process
CPP_HEADER_TEXT = "".join(f"#include <{h}>\n" for h in CPP_HEADERS)
JAVA_WRAPPER = "HarnessMain"  # the class run for Java tests: Main.main, then the marker

# Go standard packages a completion may use without importing them (import path -> identifier)
GO_STD_PACKAGES = [
    "math", "strings", "fmt", "strconv", "sort", "time", "regexp", "bytes", "unicode",
    "unicode/utf8", "math/rand", "math/big", "math/bits", "crypto/md5", "encoding/hex",
    "container/heap", "container/list", "errors", "reflect", "os", "syscall",
]  # fmt: skip


@dataclass
class Program:
    """Files to build and run in one sandbox, and the line that says the tests ran to their end."""

    language: str  # one of LANGUAGES
    files: dict[str, str]  # file name -> text; MAIN_FILE[language] is the entry
    marker: Optional[str] = None  # None: a bare program, judged by its exit status alone


def new_marker() -> str:
    return "spec-harness-tests-done-" + secrets.token_hex(12)


def marker_seen(stdout: str, marker: str) -> bool:
    """Whether the last non-empty line of ``stdout`` is ``marker``."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    return bool(lines) and lines[-1].strip() == marker


def without_marker(stdout: str, marker: Optional[str]) -> str:
    return stdout if not marker else "\n".join(line for line in stdout.splitlines() if line.strip() != marker)


# --------------------------------------------------------------------------- per language

_TOP_LEVEL_CHECK = re.compile(r"^check\s*\(", re.M)
_PY_DEF = re.compile(r"^def\s+([A-Za-z_]\w*)\s*\(", re.M)


def _python(sample: "Sample", prompt: str, completion: str, test: str, marker: str) -> dict[str, str]:
    meta = sample.meta or {}
    text = prompt + completion + "\n\n" + test + "\n"
    if not _TOP_LEVEL_CHECK.search(test):
        entry = meta.get("entry_point")
        if not entry:
            defs = _PY_DEF.findall(meta.get("declaration") or prompt)
            entry = defs[-1] if defs else None
        if not entry:
            raise ValueError(f"{sample.id}: no entry point to call check() with")
        text += f"\ncheck({entry})\n"
    text += f"\n__import__('os').write(1, b'\\n{marker}\\n')\n"
    return {MAIN_FILE["python"]: text}


_CPP_MAIN = re.compile(r"\bint\s+main\s*\(\s*\)\s*\{")


def _cpp(sample: "Sample", prompt: str, completion: str, test: str, marker: str) -> dict[str, str]:
    found = _CPP_MAIN.search(test)
    end = close_at_depth_zero(test, "cpp", found.end() - 1)[0] if found else -1
    if end < 0:
        raise ValueError(f"{sample.id}: the tests have no complete `int main() {{...}}` to end with the marker")
    write = f'fputs("\\n{marker}\\n", stdout); fflush(stdout);'  # stdio.h comes with harness_std.h
    test = test[: end - 1] + f"    {write}\n" + test[end - 1 :]
    text = f'#include "{CPP_HEADER_FILE}"\n' + prompt + completion + "\n" + test + "\n"
    return {CPP_HEADER_FILE: CPP_HEADER_TEXT, MAIN_FILE["cpp"]: text}


def _java(sample: "Sample", prompt: str, completion: str, test: str, marker: str) -> dict[str, str]:
    wrapper = (
        f"public class {JAVA_WRAPPER} {{\n"
        "    public static void main(String[] args) throws Throwable {\n"
        "        Main.main(args);\n"
        "        java.io.FileOutputStream out = new java.io.FileOutputStream(java.io.FileDescriptor.out);\n"
        f'        out.write("\\n{marker}\\n".getBytes());\n'
        "        out.flush();\n"
        "    }\n"
        "}\n"
    )
    return {MAIN_FILE["java"]: prompt + completion + "\n" + test + "\n", f"{JAVA_WRAPPER}.java": wrapper}


def _js(sample: "Sample", prompt: str, completion: str, test: str, marker: str) -> dict[str, str]:
    end = f"\n;require('fs').writeSync(1, '\\n{marker}\\n');\n"
    return {MAIN_FILE["js"]: prompt + completion + "\n" + test + "\n" + end}


_GO_IMPORT_RE = re.compile(r'^\s*(?:import\s+)?(?:[A-Za-z_]\w*\s+)?"([^"]+)"\s*$', re.M)


def _go_imports(block: str) -> list[str]:
    return _GO_IMPORT_RE.findall(block or "")


def _strip_go_comments_and_strings(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)
    code = re.sub(r"//[^\n]*", " ", code)
    code = re.sub(r"`[^`]*`", '""', code)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', code)


def _go(sample: "Sample", prompt: str, completion: str, test: str, marker: str) -> dict[str, str]:
    meta: Mapping[str, Any] = sample.meta or {}
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
    # "os" under its own name: the completion may import or use "os" too (Go allows both)
    imports = "import (\n" + "".join(f'    "{p}"\n' for p in extra) + '    harness_os "os"\n)\n'
    test_main = (
        "func TestMain(m *testing.M) {\n"
        "    code := m.Run()\n"
        "    if code == 0 {\n"
        f'        harness_os.NewFile(1, "stdout").WriteString("\\n{marker}\\n")\n'
        "    }\n"
        "    harness_os.Exit(code)\n"
        "}\n"
    )
    return {MAIN_FILE["go"]: setup + "\n" + imports + "\n" + code + "\n\n" + test + "\n\n" + test_main}


_ASSEMBLE = {"python": _python, "cpp": _cpp, "java": _java, "js": _js, "go": _go}


def build_program(sample: "Sample", completion: str, marker: Optional[str] = None) -> Program:
    """The program that runs ``sample``'s tests on ``completion`` (already cut) and ends by
    writing ``marker`` (a new random one if not given). ValueError if it cannot be assembled."""
    language = normalise_language(sample.language or "python")
    if language not in _ASSEMBLE:
        raise ValueError(f"unknown language {language!r}")
    marker = marker or new_marker()
    meta = sample.meta or {}
    files = _ASSEMBLE[language](sample, sample.turns[0], completion, meta.get("test") or "", marker)
    return Program(language, files, marker)
