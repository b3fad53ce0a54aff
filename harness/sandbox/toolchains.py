"""Building and running a program in each language, in the sandbox, and the verdict.

``run_program(program, limits)`` builds and runs a ``Program`` (``programs.py``) in a fresh
sandbox and says how it went as an ``ExecResult``:

* python: ``python3 -I -B harness_main.py`` (``main.py`` for a bare program) under an
  interpreter the sandbox can run (``sys.executable`` when it lies inside the sandbox's view
  and the sandbox uid may execute it, else ``python3`` on the sandbox ``PATH``;
  ``Limits.python`` overrides).
* cpp: ``g++ -std=c++17 -o main *.cpp -lcrypto`` (one test uses ``openssl/md5.h``; two use
  ``boost/any.hpp``), then ``./main``. ``harness_std.h`` is precompiled once and kept.
* java: ``javac`` on every ``.java`` file, then ``java -ea HarnessMain`` (``Main`` for a bare
  program).
* js: ``node harness_main.js`` (``main.js`` for a bare program), which makes a failed
  ``console.assert`` (which Node only prints) throw before it runs ``main.js``.
* go: ``go test -c`` then the test binary. Go runs offline in GOPATH mode (``GO111MODULE=off``,
  ``GOPATH=/usr/share/gocode`` where Debian's ``golang-github-stretchr-testify-dev`` puts
  testify, ``GOPROXY=off``), with a per-run ``GOCACHE`` seeded by hard links from a cache
  warmed once and kept (a cold build of testify costs ~3 s per program, a warm one ~0.6 s).
  Vet is off (``-vet=off``).

The precompiled header and the warm Go cache live in ``<tmp>/spec-harness-sandbox-<euid>/``
(private to the harness's user; keyed by the tool binaries, read-only, safe to delete).

Memory: ``RLIMIT_AS`` = ``memory_mb`` for Python and compiled C++ programs; ``RLIMIT_DATA`` =
``memory_mb`` for every run step. The JVM reserves GiB of address space up front and does not
even start under an ``RLIMIT_AS`` of 1 GiB (measured); V8 and the Go runtime also reserve
address space they do not use: Java, JS and Go get only ``RLIMIT_DATA`` plus their own heap
caps (``-Xmx``, ``--max-old-space-size`` = half of ``memory_mb``). Build steps get
``RLIMIT_DATA`` = ``compile_memory_mb``.

Run steps get the marker on standard input and their working directory as a tmpfs of
``Limits.work_dir_mb`` (the built files inside, read-only); build steps write into the
sandbox's directory on the host (only the toolchain's outputs, each file capped by
``RLIMIT_FSIZE``).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from harness.sandbox.languages import INSTALL_HINT, LANGUAGES, MAIN_FILE, normalise_language
from harness.sandbox.programs import (CPP_HEADER_FILE, CPP_HEADER_TEXT, JAVA_WRAPPER, JS_RUNNER, PY_RUNNER, Program,
                                      marker_seen, without_marker)
from harness.sandbox.jail import Isolation, Limits, Sandbox, Step, _state_dir, can_run, isolation, which

STATUSES = ("passed", "failed", "timeout", "error", "skipped")
GO_PATHS = ("/usr/share/gocode",)  # GOPATH candidates holding github.com/stretchr/testify


SETUP_FAILED = "sandbox setup failed"  # an ``error`` detail's start when the sandbox itself did not start


@dataclass
class ExecResult:
    """How a program went. ``status``:

    * ``passed``  -- built, ran to the end of its tests (the completion marker is the last line
      of its output) and exited 0; for JS also no ``Assertion failed`` on stderr. A bare program
      (no marker) passes on exit status 0.
    * ``failed``  -- the completion is wrong: it does not compile, a test assertion fails, an
      exception escapes, the program crashes, exits non-zero, or exits 0 before its tests ended.
    * ``timeout`` -- a build or run step passed its wall-clock limit (everything it started is
      killed).
    * ``error``   -- a sandbox limit ended the program (memory, file size, processes, CPU time) or
      the sandbox itself could not be set up.
    * ``skipped`` -- not judged: the language's toolchain (or a library the tests need) is
      missing, the sample has no tests, or the language is unknown. ``detail`` says why and how
      to fix it.
    """

    status: str  # one of STATUSES
    detail: str = ""
    seconds: float = 0.0  # wall time of all steps
    returncode: Optional[int] = None  # of the last step run (negative: killed by that signal)
    stdout: str = ""  # tail of the last step's output (the marker line removed)
    stderr: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- toolchains


def toolchain(language: str, limits: Limits, iso: Optional[Isolation] = None) -> tuple[Optional[dict[str, str]], str]:
    """Paths of the tools a language needs, as the sandbox can run them, or (None, why not)."""
    iso = iso or isolation()
    hint = INSTALL_HINT.get(language, "")
    if language == "python":
        for c in [limits.python] if limits.python else [sys.executable, "python3"]:
            path = c if c and os.sep in c else (which(c, iso) if c else None)
            if path and can_run(path, iso):
                # the file can_run checked: a venv's python is a link from outside the sandbox's view
                # (a checkout under /tmp, /home) to an interpreter inside it, and only the target is there
                return {"python": os.path.realpath(path)}, ""
        return None, f"no python interpreter the sandbox can run ({hint})"
    need = {"cpp": ["g++"], "java": ["javac", "java"], "js": ["node"], "go": ["go"]}.get(language)
    if need is None:
        return None, f"unknown language {language!r}"
    tools = {}
    for t in need:
        p = which(t, iso)
        if not p:
            return None, f"{t} not installed ({hint})"
        tools[t] = p
    if language == "go":
        for gp in GO_PATHS:
            if os.path.isdir(os.path.join(gp, "src", "github.com", "stretchr", "testify", "assert")):
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


# --------------------------------------------------------------------------- build seeds

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


def _make_seed(key: str, files: Mapping[str, str], argv: list[str], product: str, limits: Limits,
               env: Optional[Callable[[Path], dict[str, str]]] = None) -> Optional[Path]:  # fmt: skip
    """Build something reusable (a warm Go cache, a precompiled header) once, keep it.

    The build runs in the sandbox like any other step; ``product`` (a file or directory it
    leaves in the work directory) goes to ``<state dir>/seed-<hash of key>/``, read-only and
    owned by the harness's user, where later runs and later processes find it (the key names
    the tool binaries, so an upgrade builds a new one); runs hard-link it into their own
    directory. None if the build fails (runs then just go slower).
    """
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
                    step = sb.run(argv, timeout=max(limits.compile_timeout_s, 120), memory_mb=limits.compile_memory_mb,
                                  address_space=False, env=env(sb.work) if env else None)  # fmt: skip
                    built = sb.work / product
                    if step.returncode == 0 and built.exists():
                        tmp = Path(tempfile.mkdtemp(prefix=final.name + ".tmp-", dir=state))
                        shutil.move(str(built), str(tmp / product))
                        for dirpath, _dirnames, filenames in os.walk(tmp):
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
    testify = os.path.join(tools["gopath"], "src/github.com/stretchr/testify/assert")
    return _make_seed(
        f"go:{_file_stamp(tools['go'])}:{_file_stamp(testify)}",
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
            if name != "trim.txt":
                _link_file(Path(dirpath) / name, d / name)


def _link_file(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


# --------------------------------------------------------------------------- verdicts

_LIMIT_PATTERNS = [
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
_LIMIT_SIGNALS = {
    signal.SIGXCPU: "CPU time limit (SIGXCPU)",
    signal.SIGXFSZ: "file size limit (SIGXFSZ)",
    signal.SIGKILL: "killed (SIGKILL)",
}


def _limit_hit(step: Step) -> Optional[str]:
    if step.returncode is not None and step.returncode < 0 and -step.returncode in _LIMIT_SIGNALS:
        return _LIMIT_SIGNALS[signal.Signals(-step.returncode)]
    text = step.stderr_head + "\n" + step.stderr + "\n" + step.stdout
    for pattern, what in _LIMIT_PATTERNS:
        if pattern in text:
            return what
    return None


def _describe_exit(step: Step) -> str:
    rc = step.returncode
    if rc is None:
        return "no exit status"
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    return f"exit status {rc}"


def _with_output(head: str, step: Step, chars: int) -> str:
    out = (step.stderr.strip() + ("\n" if step.stderr.strip() and step.stdout.strip() else "") + step.stdout.strip()).strip()
    if len(out) > chars:
        out = "..." + out[-chars:]
    return head + (": " + out if out else "")


def _result(status: str, detail: str, step: Step, returncode: Optional[int] = None) -> ExecResult:
    return ExecResult(status, detail, step.seconds, returncode, step.stdout, step.stderr)


def _judge_run(step: Step, limits: Limits, program: Program) -> ExecResult:
    if step.setup_error:
        return _result("error", f"{SETUP_FAILED}: {step.setup_error}", step, step.returncode)
    if step.timed_out:
        return _result("timeout", _with_output(f"timed out after {limits.timeout_s:g} s", step, 300), step)
    limit = _limit_hit(step) if step.returncode != 0 else None
    if limit:
        first = step.stderr_head.strip()[:300]
        return _result("error", limit + (": " + first if first else ""), step, step.returncode)
    finished = program.marker is None or marker_seen(step.stdout, program.marker)
    step.stdout = without_marker(step.stdout, program.marker)
    failed_assert = program.language == "js" and "Assertion failed" in step.stderr
    if step.returncode == 0 and finished and not failed_assert:
        return _result("passed", "", step, 0)
    if failed_assert:
        head = "assertion failed"
    elif step.returncode == 0:
        head = "exit status 0 before the tests ran to their end (no completion marker)"
    else:
        head = _describe_exit(step)
    return _result("failed", _with_output(head, step, limits.output_chars), step, step.returncode)


def _judge_build(step: Step, limits: Limits, what: str) -> Optional[ExecResult]:
    """None if the build step succeeded, else the result to return."""
    if step.setup_error:
        return _result("error", f"{SETUP_FAILED}: {step.setup_error}", step, step.returncode)
    if step.timed_out:
        return _result("timeout", f"{what} timed out after {limits.compile_timeout_s:g} s", step)
    if step.returncode == 0:
        return None
    limit = _limit_hit(step)
    if limit and limit != "process limit":
        return _result("error", _with_output(f"{what}: {limit}", step, limits.output_chars), step, step.returncode)
    return _result("failed", _with_output(f"{what} failed", step, limits.output_chars), step, step.returncode)


# --------------------------------------------------------------------------- running

def run_program(program: Program, limits: Optional[Limits] = None, iso: Optional[Isolation] = None) -> ExecResult:
    """Build and run ``program`` in a fresh sandbox (``iso``: the probed isolation by default).

    Python runs ``harness_main.py`` (or ``main.py``); C++ compiles the ``.cpp`` files; Java
    compiles every ``.java`` file and runs ``HarnessMain`` (or ``Main``); JS runs
    ``harness_main.js`` (or ``main.js``); Go builds the package (``go test -c``) and runs its
    tests. A missing toolchain gives ``skipped``.
    """
    limits = limits or Limits()
    iso = iso or isolation()
    language = normalise_language(program.language)
    files = program.files
    t0 = time.monotonic()
    if language not in LANGUAGES:
        return ExecResult("skipped", f"unknown language {language!r} (known: {', '.join(LANGUAGES)})")
    main = MAIN_FILE[language]
    if main not in files:
        raise ValueError(f"{language} programs need a {main} (got {', '.join(files) or 'no files'})")
    tools, why = toolchain(language, limits, iso)
    if tools is None:
        return ExecResult("skipped", why)
    seed = _go_seed_cache(tools, limits) if language == "go" else None
    mem, cmem = limits.memory_mb, limits.compile_memory_mb

    def finish(res: ExecResult) -> ExecResult:
        res.seconds = time.monotonic() - t0
        return res

    try:
        with Sandbox(limits, iso) as sb:
            assert sb.work is not None
            for name, text in files.items():
                sb.write(name, text)

            def build(argv: list[str], what: str, env: Optional[dict[str, str]] = None) -> Optional[ExecResult]:
                step = sb.run(argv, limits.compile_timeout_s, cmem, address_space=False, env=env)
                return _judge_build(step, limits, what)

            marker = f"{program.marker}\n".encode() if program.marker else b""  # on stdin, never in a file

            def execute(argv: list[str], address_space: bool, env: Optional[dict[str, str]] = None) -> ExecResult:
                step = sb.run(argv, limits.timeout_s, mem, address_space=address_space, env=env, stdin=marker,
                              capped_work=True)  # fmt: skip
                return finish(_judge_run(step, limits, program))

            if language == "python":
                entry = PY_RUNNER if PY_RUNNER in files else main
                return execute([tools["python"], "-I", "-B", entry], address_space=True)
            if language == "cpp":
                if files.get(CPP_HEADER_FILE) == CPP_HEADER_TEXT:
                    pch = _cpp_pch(tools, limits)
                    if pch is not None:
                        _link_file(pch, sb.work / (CPP_HEADER_FILE + ".gch"))
                sources = [n for n in files if n.endswith((".cpp", ".cc"))]
                bad = build([tools["g++"], f"-std={limits.cpp_std}", "-o", "main", *sources, "-lcrypto"], "compilation")
                return finish(bad) if bad else execute(["./main"], address_space=True)
            if language == "java":
                jvm = ["-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:-UsePerfData", "-Xss8m"]
                sources = sorted(n for n in files if n.endswith(".java"))
                javac_jvm = [f"-J{o}" for o in jvm + [f"-Xmx{max(64, cmem // 2)}m"]]
                bad = build([tools["javac"], *javac_jvm, "-encoding", "UTF-8", "-nowarn", "-d", ".", *sources], "compilation")
                if bad:
                    return finish(bad)
                entry = JAVA_WRAPPER if f"{JAVA_WRAPPER}.java" in files else "Main"
                java = [tools["java"], "-ea", *jvm, f"-Xmx{max(64, mem // 2)}m", f"-Djava.io.tmpdir={sb.work}", "-cp", "."]
                return execute([*java, entry], address_space=False)
            if language == "js":
                entry = JS_RUNNER if JS_RUNNER in files else main
                node = [tools["node"], f"--max-old-space-size={max(64, mem // 2)}", entry]
                return execute(node, address_space=False)
            if language == "go":
                if seed is not None:
                    _link_tree(seed, sb.work / ".gocache", sb.uid)
                go_build = [tools["go"], "test", "-c", "-o", "main.test", "-vet=off"]
                bad = build(go_build, "go build", env=_go_env(sb.work, tools["gopath"]))
                if bad:
                    return finish(bad)
                return execute(["./main.test"], address_space=False, env={"GOMAXPROCS": "2", "GOTRACEBACK": "single"})
    except OSError as e:
        return ExecResult("error", f"sandbox: {type(e).__name__}: {e}", time.monotonic() - t0)
    raise AssertionError("unreachable")

