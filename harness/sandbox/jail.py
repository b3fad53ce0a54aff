"""The sandbox: one build or run step of a generated program, isolated and under limits.

Each step is one command line, assembled from maintained tools:

    prlimit --as=.. --data=.. --nproc=.. --fsize=.. --cpu=.. --nofile=.. --core=0 --
        bwrap --unshare-all --unshare-user --disable-userns --die-with-parent ... --seccomp FD --
            PROGRAM ...

started as a dedicated unprivileged uid (``subprocess.Popen(user=...)``) when the harness is
root. ``isolation()`` probes once which layers work here; the package docstring
(``harness.sandbox``) says what each guarantees. This module keeps by hand only what the
tools do not do: choosing a free uid per concurrent run, the syscall filter's list (compiled by
libseccomp), a wall-clock limit, and the reading of the result.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import glob
import json
import os
import pwd
import re
import resource
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

SANDBOX_PATH = "/usr/local/bin:/usr/bin:/bin"
SANDBOX_UID_BASE = 61000  # uids SANDBOX_UID_BASE .. + SANDBOX_SLOTS - 1, used only by the sandbox
SANDBOX_SLOTS = 256
# without bubblewrap: new user (mapped to the caller's uid), PID, network, IPC and UTS namespaces; the
# forked program is PID 1 there, so kill(-1) reaches only its own processes, and --kill-child ends it
# (and with it its namespace) when unshare is killed on a timeout; util-linux's setsid then gives it a
# session of its own, so kill(0) (its process group) cannot reach unshare outside the namespace
UNSHARE_ARGS = ("--user", "--map-current-user", "--pid", "--fork", "--kill-child", "--net", "--ipc", "--uts")
# What a program sees of the host, read-only, besides its own working directory (read-write),
# a fresh /proc of its PID namespace and a minimal /dev: the toolchains and their libraries.
READ_ONLY_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
READ_ONLY_ETC = ("alternatives", "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "java-*")  # under /etc
# Syscalls the filter answers with EPERM: kernel interfaces no test program needs and that are
# not confined by namespaces (keyrings, BPF, perf, userfaultfd, io_uring), inspection of other
# processes, and administration (mounts, namespaces, modules, clocks, reboot), most of which
# already need capabilities the program does not have.
SECCOMP_DENIED = (
    "add_key", "keyctl", "request_key", "bpf", "perf_event_open", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "ptrace", "process_vm_readv",
    "process_vm_writev", "pidfd_getfd", "kcmp", "unshare", "setns", "mount", "umount2", "pivot_root",
    "chroot", "mount_setattr", "move_mount", "open_tree", "fsopen", "fsconfig", "fsmount", "fspick",
    "name_to_handle_at", "open_by_handle_at", "kexec_load", "kexec_file_load", "init_module",
    "finit_module", "delete_module", "reboot", "swapon", "swapoff", "acct", "quotactl", "syslog",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "iopl", "ioperm", "uselib",
    "vhangup", "fanotify_init", "lookup_dcookie",
)  # fmt: skip
FULL, WEAK = "full", "weak"


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
    # size of a run step's working directory, a tmpfs (under bubblewrap): all a program may write
    # there, its files together (it sees the built program's files read-only inside)
    work_dir_mb: int = 64
    output_chars: int = 1500  # how much of the output's tail goes into ``detail``
    python: Optional[str] = None  # interpreter for Python programs; default: one the sandbox can run
    cpp_std: str = "c++17"


@dataclass(frozen=True)
class Isolation:
    """The layers the sandbox uses on this machine (``isolation()`` probes them once)."""

    bwrap: Optional[str]  # bubblewrap's path when its namespaced sandbox starts here; None: plain processes
    seccomp: bool  # the syscall filter is loaded into every program (needs bwrap and libseccomp)
    user: str  # "dedicated uid" (harness is root) | "own uid" (harness is not root) | "root" (no drop: weak)
    prlimit: Optional[str]  # util-linux's prlimit, which sets the resource limits; None: no step can run
    notes: tuple[str, ...] = ()  # why a layer is missing
    # util-linux's unshare, used only without bubblewrap: user/pid/net/ipc/uts namespaces, so a program
    # can neither signal the harness (kill -1, its parent) nor leave processes behind; None: plain processes
    unshare: Optional[str] = None

    @property
    def missing(self) -> list[str]:
        """The layers of full isolation this one lacks, each with how to get it."""
        out = []
        if not self.bwrap:
            out.append("bubblewrap namespaces (apt-get install bubblewrap; needs user namespaces)")
        elif not self.seccomp:
            out.append("the seccomp filter (apt-get install libseccomp2)")
        if self.user == "root":
            out.append("a dedicated unprivileged uid (the harness could not switch uid)")
        if not self.prlimit:
            out.append("resource limits (prlimit: apt-get install util-linux)")
        return out

    @property
    def level(self) -> str:
        return FULL if not self.missing else WEAK

    def layers(self) -> str:
        return ", ".join([
            "bubblewrap (user/mount/pid/net/ipc/uts namespaces, read-only toolchain view)" if self.bwrap
            else "unshare (user/pid/net/ipc/uts namespaces)" if self.unshare else "no namespaces",
            "seccomp" if self.seccomp else "no seccomp",
            self.user,
            "rlimits" if self.prlimit else "no rlimits",
        ])  # fmt: skip

    def describe(self) -> str:
        text = f"{self.level} isolation: {self.layers()}"
        return text + ("; missing: " + "; ".join(self.missing) if self.missing else "")

    def as_dict(self) -> dict[str, Any]:
        return {"level": self.level, "layers": self.describe(), "missing": self.missing, "notes": list(self.notes)}


# --------------------------------------------------------------------------- host facts


def _other_can_run(path: str) -> bool:
    """Whether an unprivileged other user can execute ``path`` (mode bits along the path)."""
    try:
        real = os.path.realpath(path)
        if not os.stat(real).st_mode & 0o001:
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


def _visible_roots() -> list[str]:
    return [os.path.realpath(d) for d in READ_ONLY_DIRS if os.path.isdir(d)]


def can_run(path: str, iso: "Isolation") -> bool:
    """Whether a program in this sandbox can execute ``path``: inside its view, executable by its uid."""
    real = os.path.realpath(path)
    if not os.path.isfile(real) or not os.access(real, os.X_OK):
        return False
    if iso.bwrap and not any(real.startswith(root.rstrip("/") + "/") for root in _visible_roots()):
        return False
    return iso.user != "dedicated uid" or _other_can_run(real)


def which(tool: str, iso: Optional["Isolation"] = None) -> Optional[str]:
    """``tool`` on the sandbox's PATH, if a sandboxed program can run it."""
    found = shutil.which(tool, path=SANDBOX_PATH)
    return found if found and can_run(found, iso or isolation()) else None


def _seccomp_program() -> tuple[Optional[bytes], str]:
    """The filter as BPF (what ``bwrap --seccomp`` loads), compiled by libseccomp; or (None, why)."""
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None, "libseccomp not found (apt-get install libseccomp2)"
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    allow, deny = 0x7FFF0000, 0x00050000 | errno.EPERM  # SCMP_ACT_ALLOW, SCMP_ACT_ERRNO(EPERM)
    ctx = lib.seccomp_init(allow)
    if not ctx:
        return None, "seccomp_init failed"
    try:
        for call in SECCOMP_DENIED:
            number = lib.seccomp_syscall_resolve_name(call.encode())
            if number < 0:  # not a syscall of this architecture
                continue
            rc = lib.seccomp_rule_add_array(ctx, deny, number, 0, None)
            if rc < 0:
                return None, f"seccomp_rule_add {call}: {os.strerror(-rc)}"
        fd = os.memfd_create("seccomp-bpf")
        try:
            rc = lib.seccomp_export_bpf(ctx, fd)
            if rc < 0:
                return None, f"seccomp_export_bpf: {os.strerror(-rc)}"
            os.lseek(fd, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
            return b"".join(chunks), ""
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _bwrap_args(work: str, capped_mb: Optional[int] = None) -> list[str]:
    """bubblewrap's options for a step whose working directory is ``work`` (same path inside).
    ``capped_mb``: the directory inside is a tmpfs of that size holding every entry of ``work``
    bound read-only (a run step); None: ``work`` itself, writable (a build step)."""
    args = ["--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session",
            "--hostname", "sandbox", "--tmpfs", "/"]  # fmt: skip
    for d in READ_ONLY_DIRS:
        if os.path.islink(d):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            args += ["--ro-bind", d, d]
    for pattern in READ_ONLY_ETC:
        for path in sorted(glob.glob(os.path.join("/etc", pattern))):
            args += ["--ro-bind", path, path]
    args += ["--proc", "/proc", "--dev", "/dev"]
    if capped_mb is None:
        args += ["--bind", work, work]
    else:
        args += ["--size", str(capped_mb * 1024 * 1024), "--tmpfs", work]
        for entry in sorted(os.listdir(work)):
            args += ["--ro-bind", os.path.join(work, entry), os.path.join(work, entry)]
    return args + ["--chdir", work, "--remount-ro", "/dev", "--remount-ro", "/"]


# --------------------------------------------------------------------------- uids


def _state_dir() -> Path:
    """A private directory for uid locks and build seeds (per harness user). Always under /tmp,
    never $TMPDIR: the sandbox uids are the host's, so every harness process on the host (another
    TMPDIR, another checkout) must see the same locks, or two runs share a uid and each one's
    sweep kills the other's programs."""
    d = Path("/tmp") / f"spec-harness-sandbox-{os.geteuid()}"
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
    """Kill every process of ``uid`` (weak isolation only: without a PID namespace, a program's
    background processes outlive it). ``kill -9 -1`` as that uid reaches all of them."""
    for _ in range(50):
        done = subprocess.run(["/bin/sh", "-c", "kill -9 -1"], user=uid, group=uid, extra_groups=[],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        if done.returncode != 0:  # nothing left to kill
            return


def _count_tasks(uid: int) -> int:
    """Tasks (threads included) of ``uid`` now: RLIMIT_NPROC counts them all when we cannot switch uid."""
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            text = Path(f"/proc/{entry.name}/status").read_text()
        except OSError:
            continue
        m = re.search(r"^Uid:\s+(\d+)", text, re.M)
        t = re.search(r"^Threads:\s+(\d+)", text, re.M)
        if m and int(m.group(1)) == uid:
            n += int(t.group(1)) if t else 1
    return n


# --------------------------------------------------------------------------- steps


@dataclass
class Step:
    """How one command went."""

    returncode: Optional[int]  # negative: killed by that signal; None: timed out or never started
    timed_out: bool
    seconds: float
    stdout: str  # tail
    stderr: str  # tail
    setup_error: Optional[str] = None  # the sandbox itself failed (the program never ran)
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
            f.seek(max(0, f.tell() - chars * 4))
            data = f.read()
    except OSError:
        return ""
    return data.decode("utf-8", "replace")[-chars:]


def _json_documents(text: str) -> list[dict]:
    """The JSON objects bwrap wrote to its status fd, one after another."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        i = text.find("{", i)
        if i < 0:
            return out
        try:
            doc, i = decoder.raw_decode(text, i)
            out.append(doc)
        except ValueError:
            return out


class Sandbox:
    """One fresh temporary directory and the means to run steps in it (a context manager)."""

    def __init__(self, limits: Limits, iso: Optional[Isolation] = None):
        self.limits = limits
        self.iso = iso if iso is not None else isolation()
        self.slot = _Slot()
        self.base: Optional[Path] = None
        self.work: Optional[Path] = None  # the working directory, HOME and TMPDIR of every step
        self._steps = 0

    @property
    def uid(self) -> Optional[int]:
        return self.slot.uid

    def __enter__(self) -> "Sandbox":
        if self.iso.user == "dedicated uid":
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
            if self.uid is not None and not self.iso.bwrap and self._steps:
                _sweep_uid(self.uid)
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

    def _rlimits(self, timeout: float, memory_mb: int, address_space: bool) -> dict[str, int]:
        """prlimit's option name -> value; never above the harness's own hard limits."""
        lim, mb = self.limits, 1024 * 1024
        want = {"data": memory_mb * mb, "fsize": lim.max_file_mb * mb, "nofile": lim.max_open_files,
                "cpu": int(2 * timeout) + 5, "core": 0}  # fmt: skip
        if address_space:
            want["as"] = memory_mb * mb
        if self.iso.user == "dedicated uid":
            want["nproc"] = lim.max_processes
        elif os.geteuid() != 0:  # the limit counts every task of the harness's user
            want["nproc"] = _count_tasks(os.geteuid()) + lim.max_processes
        for name in list(want):
            hard = resource.getrlimit(getattr(resource, f"RLIMIT_{name.upper()}"))[1]
            if hard != resource.RLIM_INFINITY:
                want[name] = min(want[name], hard)
        return want

    def run(self, argv: list[str], timeout: float, memory_mb: int, address_space: bool,
            env: Optional[dict[str, str]] = None, stdin: bytes = b"", capped_work: bool = False) -> Step:  # fmt: skip
        """Run ``argv`` in the working directory: ``memory_mb`` is RLIMIT_DATA (and RLIMIT_AS
        with ``address_space``), ``timeout`` the wall-clock limit; ``env`` adds to the cleared
        environment (PATH, HOME, TMPDIR, LANG); ``stdin`` is all its standard input (a pipe);
        ``capped_work``: the working directory is a tmpfs of ``Limits.work_dir_mb`` over the
        files already there, read-only (under bubblewrap; a run step)."""
        assert self.base is not None and self.work is not None
        self._steps += 1
        out_path = self.base / f"step{self._steps}.out"
        err_path = self.base / f"step{self._steps}.err"
        if not self.iso.prlimit:
            return Step(None, False, 0.0, "", "", setup_error="prlimit not found (apt-get install util-linux)")
        work = str(self.work)
        full_env = {"PATH": SANDBOX_PATH, "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8", **(env or {})}
        exe = argv[0] if os.sep in argv[0] else (shutil.which(argv[0], path=SANDBOX_PATH) or argv[0])
        cmd = [self.iso.prlimit, *(f"--{k}={v}" for k, v in self._rlimits(timeout, memory_mb, address_space).items()), "--"]
        fds: list[int] = []
        status_r = -1
        try:
            if self.iso.bwrap:
                status_r, status_w = os.pipe()
                fds.append(status_w)
                capped = self.limits.work_dir_mb if capped_work else None
                cmd += [self.iso.bwrap, *_bwrap_args(work, capped), "--json-status-fd", str(status_w)]
                if self.iso.seccomp:
                    program, why = _seccomp_program_cached()
                    if program is None:
                        return Step(None, False, 0.0, "", "", setup_error=why)
                    fd = os.memfd_create("seccomp", 0)
                    fds.append(fd)
                    os.write(fd, program)
                    os.lseek(fd, 0, os.SEEK_SET)
                    cmd += ["--seccomp", str(fd)]
                cmd.append("--")
            elif self.iso.unshare:  # the program is PID 1 of its own namespace; it dies with unshare
                cmd += [self.iso.unshare, *UNSHARE_ARGS, "--", "setsid"]
            cmd += [exe, *argv[1:]]
            user: dict[str, Any] = {"user": self.uid, "group": self.uid, "extra_groups": []} if self.uid is not None else {}
            t0 = time.monotonic()
            timed_out = False
            stdin_r = subprocess.DEVNULL
            if stdin:  # a pipe holding all of it (and closed), so the program reads it once, to its end
                stdin_r, stdin_w = os.pipe()
                os.write(stdin_w, stdin)
                os.close(stdin_w)
            try:
                with open(out_path, "wb") as fo, open(err_path, "wb") as fe:
                    proc = subprocess.Popen(cmd, stdin=stdin_r, stdout=fo, stderr=fe, cwd=work, env=full_env,
                                            start_new_session=True, close_fds=True, pass_fds=fds, **user)  # fmt: skip
            finally:
                if stdin:
                    os.close(stdin_r)
            for fd in fds:
                os.close(fd)
            fds = []
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                # bwrap's process group; its PID namespace dies with it (--die-with-parent)
                timed_out = True
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            seconds = time.monotonic() - t0
            status = []
            if status_r >= 0:
                chunks = []
                while chunk := os.read(status_r, 65536):
                    chunks.append(chunk)
                status = _json_documents(b"".join(chunks).decode("utf-8", "replace"))
        finally:
            for fd in fds:
                os.close(fd)
            if status_r >= 0:
                os.close(status_r)
        stderr_head = _head(err_path, 4000)
        returncode: Optional[int] = proc.returncode
        setup_error = None
        if self.iso.bwrap and not timed_out:
            exits = [d["exit-code"] for d in status if "exit-code" in d]
            if not exits:  # bwrap failed before the program ran, and said why on stderr
                setup_error = stderr_head.strip().splitlines()[0] if stderr_head.strip() else f"bwrap exited {returncode}"
            else:  # 128 + N: killed by signal N (bwrap reports it like a shell)
                returncode = -(exits[-1] - 128) if 128 < exits[-1] <= 128 + 64 else exits[-1]
        elif stderr_head.startswith("prlimit: "):
            setup_error = stderr_head.strip().splitlines()[0]
        return Step(
            returncode=None if timed_out else returncode,
            timed_out=timed_out,
            seconds=seconds,
            stdout=_tail(out_path, self.limits.output_chars),
            stderr=_tail(err_path, self.limits.output_chars),
            setup_error=setup_error,
            stderr_head=stderr_head,
        )


_seccomp_lock = threading.Lock()
_seccomp_cache: Optional[tuple[Optional[bytes], str]] = None


def _seccomp_program_cached() -> tuple[Optional[bytes], str]:
    global _seccomp_cache
    with _seccomp_lock:
        if _seccomp_cache is None:
            _seccomp_cache = _seccomp_program()
        return _seccomp_cache


# --------------------------------------------------------------------------- the probe

_iso_lock = threading.Lock()
_iso_cache: Optional[Isolation] = None


def isolation(refresh: bool = False) -> Isolation:
    """Probe (once) which layers work here: each candidate, strongest first, must run /bin/true."""
    global _iso_cache
    with _iso_lock:
        if _iso_cache is not None and not refresh:
            return _iso_cache
        notes: list[str] = []
        prlimit = shutil.which("prlimit", path=SANDBOX_PATH)
        if not prlimit:
            notes.append("prlimit not found (apt-get install util-linux): no step can run")
        bwrap = shutil.which("bwrap", path=SANDBOX_PATH)
        if not bwrap:
            notes.append("bwrap not found (apt-get install bubblewrap)")
        program, why = _seccomp_program_cached()
        if program is None:
            notes.append(why)
        unshare = None if bwrap or not shutil.which("setsid", path=SANDBOX_PATH) else shutil.which("unshare", path=SANDBOX_PATH)
        users = ["dedicated uid", "root"] if os.geteuid() == 0 else ["own uid"]
        sandboxes: list[tuple[Optional[str], bool, Optional[str]]] = []  # (bwrap, seccomp, unshare), strongest first
        if bwrap and program is not None:
            sandboxes.append((bwrap, True, None))
        if bwrap:
            sandboxes.append((bwrap, False, None))
        if unshare:
            sandboxes.append((None, False, unshare))
        sandboxes.append((None, False, None))
        candidates = [Isolation(bw, sc, user, prlimit, unshare=us) for user in users for bw, sc, us in sandboxes]
        chosen = None
        for iso in candidates if prlimit else []:  # without prlimit nothing runs: no probe
            try:
                with Sandbox(Limits(max_processes=64), iso) as sb:
                    step = sb.run(["/bin/true"], timeout=30, memory_mb=256, address_space=True)
            except Exception as e:  # noqa: BLE001 - a probe: anything wrong means 'not this one'
                notes.append(f"{iso.layers()}: {type(e).__name__}: {e}")
                continue
            if step.returncode == 0 and not step.setup_error:
                chosen = iso
                break
            notes.append(f"{iso.layers()} failed: {step.setup_error or step.stderr.strip() or step.returncode}")
        if chosen is None:
            notes.append("no sandbox configuration started /bin/true; every run will report an error")
            chosen = candidates[-1]
        _iso_cache = Isolation(chosen.bwrap, chosen.seccomp, chosen.user, chosen.prlimit, tuple(notes), chosen.unshare)
        return _iso_cache


class IsolationError(Exception):
    """Execution refused: the sandbox is below full isolation and weak was not accepted."""


def require_isolation(accept: str = FULL, setting: str = "run.execute") -> Isolation:
    """The probed isolation if ``accept`` allows it: ``full`` refuses anything less, ``weak`` takes it.
    ``setting``: the config key whose ``true`` asked for execution (``<setting>_isolation`` names
    the acceptance), as the refusal names them (``export.execute`` for ``harness zoo``)."""
    if accept not in (FULL, WEAK):
        raise IsolationError(f"{setting}_isolation={accept!r} is not one of {FULL}, {WEAK}")
    iso = isolation()
    if iso.level != FULL and accept != WEAK:
        raise IsolationError(
            f"{setting}=true refused: the sandbox here lacks {'; '.join(iso.missing)}; "
            f"install what is missing, or pass {setting}_isolation={WEAK} to run generated code with only "
            f"{iso.layers()} (recorded as weak in every output)"
        )
    return iso
