"""Program assembly: prompt + cut completion + the sample's tests, per language, run by the
harness's own code that writes a completion marker after them.

A test passes only when its test code ran to its end. ``Program.marker`` -- a random token made
for this program -- is given to the program on standard input (a pipe, read to its end by the
harness's code before any line of the completion runs; never written into a file), and the
harness's code writes it to file descriptor 1 once the tests returned:

* python: ``harness_main.py`` reads it, runs ``main.py`` (``runpy``), then writes it; ``main.py``
  calls ``check(<entry_point>)`` (added when the test does not call it itself) and wraps the
  entry point so that a result that is not plain data fails (``PY_PLAIN_RESULTS``).
  ``sys.exit(0)``, ``os._exit(0)`` or killing a process in the function ends it before.
* cpp: read from ``.preinit_array`` (before any constructor of the completion); the test's
  ``int main()`` becomes ``harness_tests_main()``, called by a ``main`` that writes the marker
  when it returned 0, so ``exit(0)`` in the function never reaches it.
* java: ``HarnessMain.main`` reads it, calls the test's ``Main.main`` and writes it when that
  returns; ``System.exit(0)`` in the method ends the JVM first.
* js: ``harness_main.js`` reads it, makes ``console.assert`` throw (and freezes ``console`` and
  ``assert``), ``require``s ``main.js``, then writes it; ``process.exit(0)`` ends Node before.
* go: the file's first package-level variable reads it; a ``TestMain`` writes it after
  ``m.Run()`` returned 0 (every test passed); ``syscall.Exit(0)`` skips it.

The marker is written through functions taken before the completion ran (not ``sys.stdout``
/ ``System.out`` / ``os.Stdout``, which the completion may replace). A program that reads its
files finds no marker; what is not caught is code written to forge a pass from inside its own
process (see the package docstring).

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


PY_RUNNER = "harness_main.py"  # run for Python tests: reads the marker, runs main.py, writes the marker
PY_RUNNER_TEXT = """import os
import runpy


def run():
    marker = os.read(0, 4096)  # on standard input, read before any line of main.py runs
    os.close(0)
    write = os.write  # kept: main.py may replace os.write
    runpy.run_path("main.py", run_name="__main__")
    write(1, b"\\n" + marker)


run()
"""
# Rebinds the entry point (after the completion, before the tests) to a wrapper that refuses a
# result that is not plain data: an object whose __eq__ always answers True would pass every
# ``assert candidate(x) == expected``; the tests' expected values are plain data, so an exact
# type check (subclasses refused) leaves ``==`` its built-in meaning.
PY_PLAIN_RESULTS = """

def _harness_plain_results(function):
    plain = (bool, int, float, complex, str, bytes, type(None))

    def is_plain(value, depth=0):
        if type(value) in plain:
            return True
        if depth > 100:
            return False
        if type(value) in (list, tuple, set, frozenset):
            return all(is_plain(v, depth + 1) for v in value)
        if type(value) is dict:
            return all(is_plain(k, depth + 1) and is_plain(v, depth + 1) for k, v in value.items())
        return False

    def checked(*args, **kwargs):
        result = function(*args, **kwargs)
        if not is_plain(result):
            raise TypeError(f"{function.__name__} returned a {type(result).__name__}, not plain data")
        return result

    return checked


{entry} = _harness_plain_results({entry})
"""


def _python(sample: "Sample", prompt: str, completion: str, test: str) -> dict[str, str]:
    meta = sample.meta or {}
    entry = meta.get("entry_point")
    if not entry:
        defs = _PY_DEF.findall(meta.get("declaration") or prompt)
        entry = defs[-1] if defs else None
    if not entry:
        raise ValueError(f"{sample.id}: no entry point to call check() with")
    text = prompt + completion + "\n" + PY_PLAIN_RESULTS.replace("{entry}", entry) + "\n" + test + "\n"
    if not _TOP_LEVEL_CHECK.search(test):
        text += f"\ncheck({entry})\n"
    return {MAIN_FILE["python"]: text, PY_RUNNER: PY_RUNNER_TEXT}


_CPP_MAIN = re.compile(r"\bint\s+main\s*\(\s*\)\s*\{")


# Read first (from .preinit_array, before any constructor of the completion), kept in a static buffer
CPP_MARKER_READ = """static char harness_marker[256];
static void harness_read_marker() { fread(harness_marker, 1, sizeof harness_marker - 1, stdin); }
__attribute__((section(".preinit_array"), used)) static void (*harness_read_first)() = harness_read_marker;
"""
CPP_MAIN = """
int main() {
    int status = harness_tests_main();
    if (status == 0) { fputs("\\n", stdout); fputs(harness_marker, stdout); fflush(stdout); }
    return status;
}
"""


def _cpp(sample: "Sample", prompt: str, completion: str, test: str) -> dict[str, str]:
    found = _CPP_MAIN.search(test)
    end = close_at_depth_zero(test, "cpp", found.end() - 1)[0] if found else -1
    if end < 0:
        raise ValueError(f"{sample.id}: the tests have no complete `int main() {{...}}` to end with the marker")
    # the test's main becomes a function (returning 0 at its end, as main would), called by ours
    body = test[found.end() : end - 1] + "    return 0;\n"
    test = test[: found.start()] + "int harness_tests_main() {" + body + test[end - 1 :] + CPP_MAIN
    text = f'#include "{CPP_HEADER_FILE}"\n' + CPP_MARKER_READ + prompt + completion + "\n" + test + "\n"
    return {CPP_HEADER_FILE: CPP_HEADER_TEXT, MAIN_FILE["cpp"]: text}


JAVA_WRAPPER_TEXT = (
    f"public class {JAVA_WRAPPER} {{\n"
    "    public static void main(String[] args) throws Throwable {\n"
    "        byte[] marker = System.in.readAllBytes();  // before any class of the program loads\n"
    "        java.io.FileOutputStream out = new java.io.FileOutputStream(java.io.FileDescriptor.out);\n"
    "        Main.main(args);\n"
    "        out.write('\\n');\n"
    "        out.write(marker);\n"
    "        out.flush();\n"
    "    }\n"
    "}\n"
)


def _java(sample: "Sample", prompt: str, completion: str, test: str) -> dict[str, str]:
    return {MAIN_FILE["java"]: prompt + completion + "\n" + test + "\n", f"{JAVA_WRAPPER}.java": JAVA_WRAPPER_TEXT}


JS_RUNNER = "harness_main.js"  # run for JS tests: reads the marker, locks the assertions, runs main.js
JS_RUNNER_TEXT = """'use strict';
const fs = require('fs');
const line = Buffer.concat([Buffer.from('\\n'), fs.readFileSync(0)]);  // the marker, before main.js runs
const writeSync = fs.writeSync;
// Node's console.assert only prints: a failed assertion throws here, and neither it nor console
// nor the assert module can be replaced by the program
function failing(condition, ...data) {
  if (!condition) throw new Error('Assertion failed' + (data.length ? ': ' + data.join(' ') : ''));
}
Object.defineProperty(console, 'assert', { value: failing, writable: false, configurable: false });
Object.defineProperty(globalThis, 'console', { value: console, writable: false, configurable: false });
Object.freeze(console);
Object.freeze(require('assert'));
Object.freeze(require('assert').strict);
require('./main.js');
writeSync(1, line);
"""


def _js(sample: "Sample", prompt: str, completion: str, test: str) -> dict[str, str]:
    return {MAIN_FILE["js"]: prompt + completion + "\n" + test + "\n", JS_RUNNER: JS_RUNNER_TEXT}


_GO_IMPORT_RE = re.compile(r'^\s*(?:import\s+)?(?:[A-Za-z_]\w*\s+)?"([^"]+)"\s*$', re.M)


def _go_imports(block: str) -> list[str]:
    return _GO_IMPORT_RE.findall(block or "")


def _strip_go_comments_and_strings(code: str) -> str:
    code = re.sub(r"/\*.*?\*/", " ", code, flags=re.S)
    code = re.sub(r"//[^\n]*", " ", code)
    code = re.sub(r"`[^`]*`", '""', code)
    return re.sub(r'"(?:\\.|[^"\\\n])*"', '""', code)


# The first package-level variable of the file: initialised before any of the completion's
GO_MARKER_READ = """var harnessMarker, _ = harness_io.ReadAll(harness_os.Stdin)

"""
GO_TEST_MAIN = """func TestMain(m *testing.M) {
    code := m.Run()
    if code == 0 {
        harness_os.NewFile(1, "stdout").Write(append([]byte("\\n"), harnessMarker...))
    }
    harness_os.Exit(code)
}
"""


def _go(sample: "Sample", prompt: str, completion: str, test: str) -> dict[str, str]:
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
    imports = "import (\n" + "".join(f'    "{p}"\n' for p in extra) + '    harness_io "io"\n    harness_os "os"\n)\n'
    text = setup + "\n" + imports + "\n" + GO_MARKER_READ + code + "\n\n" + test + "\n\n" + GO_TEST_MAIN
    return {MAIN_FILE["go"]: text}


_ASSEMBLE = {"python": _python, "cpp": _cpp, "java": _java, "js": _js, "go": _go}


def build_program(sample: "Sample", completion: str, marker: Optional[str] = None) -> Program:
    """The program that runs ``sample``'s tests on ``completion`` (already cut) and ends by
    writing ``marker`` (a new random one if not given). ValueError if it cannot be assembled."""
    language = normalise_language(sample.language or "python")
    if language not in _ASSEMBLE:
        raise ValueError(f"unknown language {language!r}")
    marker = marker or new_marker()
    meta = sample.meta or {}
    files = _ASSEMBLE[language](sample, sample.turns[0], completion, meta.get("test") or "")
    return Program(language, files, marker)
