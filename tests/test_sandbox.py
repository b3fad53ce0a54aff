"""Sandboxed execution of generated code, completion cutting, pass semantics and pass@k.

Hostile programs (endless loop, fork bomb, memory hog, output flood, ``rm -rf`` outside the
work directory, reads of /etc/shadow, the repository and other runs, a socket to the host,
signals to everything, leftover background processes, early exit with success status) must
be contained and judged right; reference solutions must pass and wrong ones fail in every
language. The containment tests need full isolation (bubblewrap, seccomp, a dedicated uid
when root): where the machine lacks it they say what is missing; CI installs it (.ci/run).
Kept small for a loaded two-core machine: all 164 HumanEval problems in Python, a few per
other language.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import shutil
import socket
import stat
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from harness import sandbox as ex
from harness.sandbox import jail as sandbox_module
from harness.sandbox import toolchains as toolchains_module
from harness.paths import REPO_ROOT, default_data_dir
from tasks.base import Sample, TaskDataError

FAST = ex.Limits(timeout_s=3.0, compile_timeout_s=60.0, memory_mb=256, max_processes=32)


def python(code: str) -> ex.Program:
    """A bare Python program (no marker: judged by its exit status)."""
    return ex.Program("python", {"main.py": code})


@pytest.fixture(scope="module")
def iso() -> ex.Isolation:
    return ex.isolation()


@pytest.fixture(scope="module")
def full(iso) -> ex.Isolation:
    """Full isolation, or the test says what this machine lacks (CI has it: .ci/run)."""
    if iso.level != ex.FULL:
        pytest.skip(f"full isolation unavailable here: {'; '.join(iso.missing)} (`make test` as root installs bubblewrap)")
    return iso


def named(name: str) -> list[int]:
    """Live processes (not zombies) whose name (``/proc/PID/comm``, set with PR_SET_NAME and
    inherited by forks) is ``name``: a test's own processes, whatever else runs on the machine."""
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and Path(f"/proc/{entry.name}/comm").read_text().strip() == name:
                if Path(f"/proc/{entry.name}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def none_left(name: str) -> bool:
    deadline = time.monotonic() + 5
    while named(name) and time.monotonic() < deadline:
        time.sleep(0.1)
    return named(name) == []


def process_name() -> str:
    return "t" + secrets.token_hex(5)  # comm holds 15 characters


def work_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("spec-harness-exec-*")}


# --------------------------------------------------------------------------- pass@k


def test_pass_at_k_hand_computed():
    assert ex.pass_at_k(5, 2, 1) == pytest.approx(0.4)  # c/n
    assert ex.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert ex.pass_at_k(10, 3, 5) == pytest.approx(1 - 21 / 252)  # 1 - C(7,5)/C(10,5)
    assert ex.pass_at_k(10, 0, 3) == 0.0
    assert ex.pass_at_k(4, 4, 4) == 1.0
    assert ex.pass_at_k(3, 1, 3) == 1.0  # n - c < k: every draw holds the correct one
    assert ex.pass_at_k(1, 1, 1) == 1.0 and ex.pass_at_k(1, 0, 1) == 0.0
    exact = 1 - Fraction(math.comb(187, 10), math.comb(200, 10))
    assert ex.pass_at_k(200, 13, 10) == pytest.approx(float(exact), rel=1e-12)
    for bad in [(3, 1, 4), (3, 4, 1), (0, 0, 1), (3, 1, 0)]:
        with pytest.raises(ValueError):
            ex.pass_at_k(*bad)


def test_pass_at_k_table_groups_and_states_its_denominators():
    rows = []
    for method, verdicts in [("a", {"P/0": ["passed", "failed"], "P/1": ["failed", "failed"]}), ("b", {"P/0": ["passed", "passed"]})]:
        for sid, statuses in verdicts.items():
            rows += [{"method": method, "task": "t", "language": "python", "sample_id": sid, "status": s, "isolation": "full"}
                     for s in statuses]  # fmt: skip
    rows.append({"method": "a", "task": "t", "language": "go", "sample_id": "G/0", "status": "skipped", "isolation": "weak"})
    rows.append({"method": "a", "task": "t", "language": "go", "sample_id": "G/1", "status": "timeout", "isolation": "weak"})
    rows.append({"method": "c", "task": "t", "language": "python", "sample_id": "P/0", "status": "passed"})  # old record
    table = {(r["method"], r["language"]): r for r in ex.pass_at_k_table(rows, ks=(1, 2))}
    a_py = table[("a", "python")]
    assert (a_py["problems"], a_py["judged"], a_py["passed"], a_py["skipped"]) == (2, 4, 1, 0)
    assert a_py["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert a_py["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert a_py["isolation"] == "full"
    assert table[("b", "python")]["pass@1"] == 1.0
    a_go = table[("a", "go")]
    assert (a_go["judged"], a_go["skipped"], a_go["pass@1"], a_go["pass@2"]) == (1, 1, 0.0, None)
    assert a_go["isolation"] == "weak"
    assert table[("c", "python")]["isolation"] == "unrecorded"
    by_task = ex.pass_at_k_table(rows, keys=("method", "task"))
    assert [(r["method"], r["judged"], r["skipped"]) for r in by_task] == [("a", 5, 1), ("b", 2, 0), ("c", 1, 0)]


def test_pass_at_1_columns_and_label_state_denominators_and_isolation():
    from harness.report import pass_at_1_label
    from harness.report import pass_at_1

    rows = [{"method": "m", "task": "t", "language": "python", "sample_id": f"P/{i}", "status": s, "isolation": "full"}
            for i, s in enumerate(["passed", "failed"])]  # fmt: skip
    rows.append({"method": "m", "task": "t", "language": "go", "sample_id": "G/0", "status": "skipped", "isolation": "weak"})
    table = pass_at_1(rows, ["method", "task"])
    row = table.iloc[0].to_dict()
    assert (row["pass@1"], row["pass@1_judged"], row["pass@1_skipped"], row["pass@1_isolation"]) == (0.5, 2, 1, "full")
    assert pass_at_1_label(row) == "0.500 (2 judged, 1 skipped)"
    rows.append({"method": "m", "task": "t", "language": "go", "sample_id": "G/1", "status": "failed", "isolation": "weak"})
    row = pass_at_1(rows, ["method", "task"]).iloc[0].to_dict()
    assert pass_at_1_label(row) == "0.333 (3 judged, 1 skipped), WEAK isolation"


# --------------------------------------------------------------------------- cutting


def test_truncate_python_stops_at_top_level_code():
    prompt = 'def f(x):\n    """Doc."""\n'
    body = "    y = '''\nnot the end\n'''\n    return x\n\n"
    for tail in ["def g():\n    pass\n", "class A:\n    pass\n", 'if __name__ == "__main__":\n    f(1)\n', "print(f(1))\n", "# test\nf(1)\n"]:
        assert ex.truncate_completion("python", prompt, body + tail) == body
    assert ex.truncate_completion("python", prompt, body) == body  # nothing to cut
    assert ex.truncate_completion("python", prompt, "    return (1,\n") == "    return (1,\n"  # unfinished


def test_truncate_brace_languages():
    t = ex.truncate_completion
    assert t("cpp", "/* { */\nint f(){\n", '  return "}"[0] + \'}\'; // }\n}\nint main(){ return 1; }\n') == (
        '  return "}"[0] + \'}\'; // }\n}'
    )
    java = "class Solution {\n    public int f() {\n"
    gen = "        return g();\n    }\n    int g() { return 1; }\n}\npublic class Main { }\n"
    assert t("java", java, gen) == "        return g();\n    }\n    int g() { return 1; }\n}"
    js = t("js", "const f = (x) => {\n", "  return `${x}}`\n}\nconst g = (a) => {\n  return a\n}\nconst testF = () => {}\ntestF()\n")
    assert js == "  return `${x}}`\n}\nconst g = (a) => {\n  return a\n}"
    go = t("go", "func F() int {\n", "    return h('}')\n}\n\n// h helps.\nfunc h(r rune) int {\n    return `}`\n}\nfunc main() {}\n")
    assert go == "    return h('}')\n}\n\n// h helps.\nfunc h(r rune) int {\n    return `}`\n}"
    assert t("go", "func F() int {\n", "    return 1\n}\nfunc TestF(t *testing.T) {}\n") == "    return 1\n}"
    assert t("cpp", "int g(){ return 1; }\nint f(){\n", "  return g();\n}\nint main(){}\n") == "  return g();\n}"
    assert t("cpp", "int f(){\n", "  if (x) {\n    return 1;\n") == "  if (x) {\n    return 1;\n}\n}\n"  # closed for it


# --------------------------------------------------------------------------- isolation level


def test_isolation_probe(iso):
    assert iso.describe().startswith(f"{iso.level} isolation: ")
    assert (iso.level == ex.FULL) == (iso.missing == [])
    if os.geteuid() == 0 and iso.level == ex.FULL:
        assert iso.user == "dedicated uid", "as root the sandbox must drop to a dedicated uid (else RLIMIT_NPROC is void)"


def test_weak_isolation_is_refused_unless_accepted(monkeypatch, iso):
    weak = dataclasses.replace(iso, bwrap=None, seccomp=False)
    monkeypatch.setattr(sandbox_module, "_iso_cache", weak)
    with pytest.raises(ex.IsolationError) as refused:
        ex.require_isolation(ex.FULL)
    line = str(refused.value)
    assert "\n" not in line and "bubblewrap" in line and "run.execute_isolation=weak" in line
    assert ex.require_isolation(ex.WEAK) is weak
    with pytest.raises(ex.IsolationError, match="not one of"):
        ex.require_isolation("strong")

    from harness.config import RunSettings
    from harness.errors import HarnessError
    from harness.runner import sandbox_isolation

    with pytest.raises(HarnessError, match="run.execute_isolation=weak"):
        sandbox_isolation(RunSettings(execute=True))
    assert sandbox_isolation(RunSettings(execute=True, execute_isolation="weak")).level == ex.WEAK


def test_probe_without_bubblewrap_is_weak_and_says_why(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name, **kw: None if name == "bwrap" else real_which(name, **kw))
    monkeypatch.setattr(sandbox_module, "_iso_cache", None)  # probe again; the real result comes back after
    weak = ex.isolation()
    assert weak.level == ex.WEAK and weak.bwrap is None and not weak.seccomp
    assert "bubblewrap" in weak.missing[0] and "bwrap not found (apt-get install bubblewrap)" in weak.notes
    res = ex.run_program(python("print('plain process')"), FAST)  # still runs, as a plain limited process
    assert res.status == "passed" and "plain process" in res.stdout, res


def test_every_result_records_its_isolation(iso):
    sample = Sample(id="T/0", turns=["def f():\n"], language="python", meta={"test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"})
    weak = dataclasses.replace(iso, bwrap=None, seccomp=False)
    for level in (iso, weak):
        results = ex.score_records({"T/0": sample}, [{"method": "m", "task": "t", "sample_id": "T/0", "text": "    return 1\n"}], FAST, iso=level)
        assert results[0]["isolation"] == level.level and results[0]["status"] == "passed", results


def test_an_interpreter_linked_from_outside_the_view_runs_by_its_real_path(tmp_path):
    """A venv's ``python`` is a link, e.g. /tmp/x/.venv/bin/python -> /usr/bin/python3.11: the
    sandbox's view holds the target, not the link (a newcomer's checkout under /tmp failed every
    Python program with "bwrap: execvp ...: No such file or directory")."""
    real = shutil.which("python3", path=sandbox_module.SANDBOX_PATH)
    if real is None:
        pytest.fail("no python3 on the sandbox PATH: this machine cannot run the sandbox tests")
    link = tmp_path / "venv" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(real)
    limits = dataclasses.replace(FAST, python=str(link))
    tools, why = toolchains_module.toolchain("python", limits)
    assert tools == {"python": os.path.realpath(real)}, why
    res = ex.run_program(python("print(6 * 7)\n"), limits)
    assert res.status == "passed" and res.stdout.strip() == "42", res


# --------------------------------------------------------------------------- hostile programs


def test_infinite_loop_times_out_quickly():
    t0 = time.monotonic()
    res = ex.run_program(python("while True:\n    pass\n"), ex.Limits(timeout_s=1.5))
    assert res.status == "timeout", res
    assert time.monotonic() - t0 < 10


def test_fork_bomb_is_contained(full):
    before = len(os.listdir("/proc"))
    name = process_name()
    bomb = (
        "import ctypes, os, time\n"
        f"ctypes.CDLL(None).prctl(15, b'{name}')\n"  # PR_SET_NAME: every fork carries it
        "n = 0\n"
        "for _ in range(100000):\n"
        "    try:\n"
        "        if os.fork() == 0:\n"
        "            os.setsid()\n"  # try to leave the process group the timeout kills
        "    except OSError:\n"
        "        n += 1\n"
        "time.sleep(60)\n"
    )
    t0 = time.monotonic()
    res = ex.run_program(python(bomb), ex.Limits(timeout_s=3.0, max_processes=24))
    assert res.status in ("timeout", "error", "failed"), res
    assert time.monotonic() - t0 < 20
    assert none_left(name), "processes of the fork bomb outlived the run"
    assert len(os.listdir("/proc")) < before + 50


def test_background_processes_do_not_outlive_the_program(full):
    name = process_name()
    sleeper = f"import ctypes, time; ctypes.CDLL(None).prctl(15, b'{name}'); time.sleep(60)"
    prog = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {sleeper!r}], start_new_session=True)\ntime.sleep(0.5)\n"
    res = ex.run_program(python(prog), FAST)
    assert res.status == "passed", res
    assert none_left(name), "a background process outlived its program"


def test_memory_hog_is_stopped_not_the_runner():
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024 * 1024))\n"
    res = ex.run_program(python(hog), ex.Limits(timeout_s=10, memory_mb=256))
    assert res.status == "error" and "memory" in res.detail, res


def test_output_flood_is_capped():
    res = ex.run_program(python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"), ex.Limits(timeout_s=10, max_file_mb=1))
    assert res.status == "error" and "file size" in res.detail, res


def canary(directory: Path) -> Path:
    """A world-writable directory holding a world-writable file: only the sandbox protects it."""
    d = directory / f"canary-{secrets.token_hex(6)}"
    d.mkdir()
    (d / "file").write_text("keep me")
    os.chmod(d, 0o777)
    os.chmod(d / "file", 0o666)
    return d


def test_rm_rf_and_writes_outside_the_work_directory_fail(full):
    canaries = [canary(Path(tempfile.gettempdir())), canary(REPO_ROOT)]
    writes = [Path(f"/tmp/escape-{secrets.token_hex(6)}"), REPO_ROOT / f"escape-{secrets.token_hex(6)}"]
    if Path("/dev/shm").is_dir():
        writes.append(Path(f"/dev/shm/escape-{secrets.token_hex(6)}"))
    prog = (
        "import os, subprocess, shutil\n"
        "open('inside.txt', 'w').write('ok')\n"  # the work directory itself is writable
        f"for d in {[str(c) for c in canaries]!r}:\n"
        "    subprocess.run(['rm', '-rf', d])\n"
        "    shutil.rmtree(d, ignore_errors=True)\n"
        "escaped = []\n"
        f"for t in {[str(w) for w in writes]!r}:\n"
        "    try:\n"
        "        open(t, 'w').write('escaped')\n"
        "        escaped.append(t)\n"
        "    except OSError as e:\n"
        "        print('denied', t, e.errno)\n"
        "assert os.path.exists('inside.txt') and not escaped, escaped\n"
    )
    try:
        res = ex.run_program(python(prog), FAST)
        survived = [(c / "file").read_text() for c in canaries]
        leaked = [w for w in writes if w.exists()]
    finally:
        for c in canaries:
            shutil.rmtree(c, ignore_errors=True)
        for w in writes:
            if w.exists():
                w.unlink()
    assert survived == ["keep me"] * len(canaries), "rm -rf reached outside the work directory"
    assert leaked == [], f"the sandbox wrote outside its directory: {leaked}"
    assert res.status == "passed" and res.stdout.count("denied") == len(writes), res


def test_reads_of_secrets_repository_home_and_other_runs_fail(full):
    other_run = Path(tempfile.mkdtemp(prefix="spec-harness-exec-"))  # another run's work, readable by all
    (other_run / "main.py").write_text("secret of another run")
    os.chmod(other_run, 0o755)
    os.chmod(other_run / "main.py", 0o644)
    readme = REPO_ROOT / "README.md"
    assert readme.stat().st_mode & stat.S_IROTH, "the test needs a world-readable repository file"
    targets = ["/etc/shadow", "/etc/passwd", str(readme), str(other_run / "main.py"), os.path.expanduser("~/.bashrc"), "/home", "/root"]
    prog = (
        "import os\n"
        "got = []\n"
        f"for t in {targets!r}:\n"
        "    try:\n"
        "        got.append((t, os.listdir(t) if os.path.isdir(t) else open(t).read(20)))\n"
        "    except OSError as e:\n"
        "        print('denied', t, e.errno)\n"
        "print('visible:', sorted(os.listdir('/tmp')), sorted(os.listdir(os.path.dirname(os.getcwd()))))\n"
        "assert not got, got\n"
    )
    try:
        res = ex.run_program(python(prog), FAST)
    finally:
        shutil.rmtree(other_run, ignore_errors=True)
    assert res.status == "passed", res
    assert res.stdout.count("denied") == len(targets)
    visible = res.stdout.split("visible:")[1]
    assert other_run.name not in visible and "['work']" in visible, res.stdout  # only its own run's directory


def test_sockets_reach_nothing(full):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn.recv(64))
                conn.close()
            except OSError:
                continue

    th = threading.Thread(target=accept, daemon=True)
    th.start()
    prog = (
        "import socket\n"
        "errors = []\n"
        f"for address in [('127.0.0.1', {port}), ('1.1.1.1', 53), ('8.8.8.8', 443)]:\n"
        "    try:\n"
        "        socket.create_connection(address, timeout=2).sendall(b'escaped')\n"
        "    except OSError as e:\n"
        "        errors.append(e.errno)\n"
        "print(errors)\n"
        "assert len(errors) == 3\n"
    )
    try:
        res = ex.run_program(python(prog), ex.Limits(timeout_s=8))
        time.sleep(0.3)
    finally:
        stop.set()
        th.join(5)
        server.close()
    assert accepted == [], "the sandboxed program reached a socket of the host"
    assert res.status == "passed", res  # every connection failed inside the program


def test_signals_do_not_reach_the_harness():
    prog = "import os, signal\nfor target in (-1, os.getppid(), 1):\n    try:\n        os.kill(target, signal.SIGKILL)\n    except OSError:\n        pass\n"
    res = ex.run_program(python(prog), FAST)
    assert res.status in ("passed", "error", "failed"), res  # and this test process is still alive


def test_uid_slots_are_host_wide_whatever_the_temporary_directory(monkeypatch, tmp_path):
    """Two runs with different TMPDIRs must not claim the same sandbox uid (each sweeps its uid)."""
    first = sandbox_module._Slot()
    first.claim()
    try:
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        second = sandbox_module._Slot()
        second.claim()
        try:
            assert second.uid != first.uid
        finally:
            second.release()
    finally:
        first.release()


def test_unshare_layer_confines_signals_without_bubblewrap():
    """Without bubblewrap the program runs inside unshare's namespaces: it is PID 1 of its own
    PID namespace, kill(-1) reaches only its own processes, and a child it leaves behind dies with it."""
    unshare = shutil.which("unshare", path=sandbox_module.SANDBOX_PATH)
    prlimit = shutil.which("prlimit", path=sandbox_module.SANDBOX_PATH)
    assert unshare and prlimit, "util-linux (unshare, prlimit) is part of every Debian system"
    user = "dedicated uid" if os.geteuid() == 0 else "own uid"
    iso = ex.Isolation(None, False, user, prlimit, unshare=unshare)
    marker = f"spec-harness-left-{secrets.token_hex(4)}"
    leaver = ("import os, subprocess\n"  # a child in a session of its own, left running
              f"subprocess.Popen(['{marker}', '30'], executable='/bin/sleep', start_new_session=True)\n"
              "print(os.getpid(), flush=True)\n")  # fmt: skip
    killer = ("import contextlib, os, signal\n"  # every process it may signal, then its parent
              "for target in (-1, os.getppid()):\n"
              "    with contextlib.suppress(OSError):\n"
              "        os.kill(target, signal.SIGKILL)\n"
              "print('alive')\n")  # fmt: skip
    with sandbox_module.Sandbox(FAST, iso) as sb:
        sb.write("leaver.py", leaver)
        sb.write("killer.py", killer)
        left_step = sb.run(["/usr/bin/python3", "leaver.py"], timeout=10, memory_mb=256, address_space=False)
        time.sleep(0.2)
        left = [p for p in Path("/proc").iterdir() if p.name.isdigit() and marker in _cmdline(p)]
        kill_step = sb.run(["/usr/bin/python3", "killer.py"], timeout=10, memory_mb=256, address_space=False)
    assert "unshare (user/pid/net/ipc/uts namespaces)" in iso.layers()
    assert left_step.setup_error is None and left_step.stdout.split() == ["1"], left_step  # PID 1 of its namespace
    assert left == [], "a process the program started outlived its step"
    assert kill_step.stdout.split() == ["alive"], kill_step  # and this test process is alive too


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return ""


def test_seccomp_denies_keyrings_and_ptrace(full):
    prog = (
        "import ctypes, ctypes.util, errno, platform\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        "numbers = {'x86_64': (250, 101), 'aarch64': (219, 117)}[platform.machine()]  # keyctl, ptrace\n"
        "for nr in numbers:\n"
        "    assert libc.syscall(nr, 0, 0, 0, 0) == -1 and ctypes.get_errno() == errno.EPERM, nr\n"
    )
    res = ex.run_program(python(prog), FAST)
    assert res.status == "passed", res


def test_hostile_cpp(full):
    tools, why = ex.toolchain("cpp", FAST)
    assert tools is not None, why
    loop = ex.run_program(ex.Program("cpp", {"main.cpp": "int main(){ volatile unsigned long x = 0; for(;;) x++; }\n"}), ex.Limits(timeout_s=1.5))
    assert loop.status == "timeout", loop
    hog = "#include <cstring>\n#include <vector>\nint main(){ std::vector<char*> v; for(;;){ char* p = new char[1<<24]; std::memset(p, 1, 1<<24); v.push_back(p);} }\n"
    res = ex.run_program(ex.Program("cpp", {"main.cpp": hog}), ex.Limits(timeout_s=10, memory_mb=256))
    assert res.status == "error" and "memory" in res.detail, res
    name = process_name()
    bomb = f'#include <sys/prctl.h>\n#include <unistd.h>\nint main(){{ prctl(PR_SET_NAME, "{name}"); for(;;) {{ fork(); }} }}\n'
    res = ex.run_program(ex.Program("cpp", {"main.cpp": bomb}), ex.Limits(timeout_s=2, max_processes=24))
    assert res.status in ("timeout", "error", "failed"), res
    assert none_left(name), "processes of the fork bomb outlived the run"
    target = Path(f"/tmp/escape-{secrets.token_hex(6)}")
    prog = f'#include <cstdio>\nint main(){{ FILE* f = fopen("{target}", "w"); return f ? 0 : 3; }}\n'
    try:
        res = ex.run_program(ex.Program("cpp", {"main.cpp": prog}), FAST)
        assert not target.exists()
    finally:
        if target.exists():
            target.unlink()
    assert res.status == "failed" and res.returncode == 3, res


def test_missing_toolchain_is_skipped(monkeypatch):
    monkeypatch.setattr(toolchains_module, "which", lambda tool, iso=None: None)
    res = ex.run_program(ex.Program("go", {"main_test.go": "package main\n"}))
    assert res.status == "skipped" and "go not installed" in res.detail and "golang-go" in res.detail
    assert ex.run_program(ex.Program("js", {"main.js": ""})).status == "skipped"
    assert ex.run_program(ex.Program("cobol", {"x": ""})).status == "skipped"


# --------------------------------------------------------------------------- pass semantics

# wrong bodies for problem 0 (has_close_elements: returns a bool; its tests expect true somewhere)
WRONG = {
    "python": "    return False\n",
    "cpp": "    return false;\n}\n",
    "java": "        return false;\n    }\n}\n",
    "js": "  return false\n}\n",
    "go": "    return false\n}\n",
}
# bodies for problem 0 that end the process with a success status before any test ran
EARLY_EXIT = {
    "python": [
        "    import sys\n    sys.exit(0)\n",
        "    import os\n    os._exit(0)\n",
        "    raise SystemExit(0)\n",
        "    import os, signal\n    os.kill(os.getppid(), signal.SIGKILL)\n    os.kill(1, signal.SIGKILL)\n    os._exit(0)\n",
    ],
    "cpp": ["    exit(0);\n}\n", "    quick_exit(0);\n}\n", "    _Exit(0);\n}\n"],
    "java": ["        System.exit(0);\n        return false;\n    }\n}\n", "        Runtime.getRuntime().halt(0);\n        return false;\n    }\n}\n"],
    "js": ["  process.exit(0)\n}\n", "  process.kill(process.ppid, 'SIGKILL'); process.exit(0)\n}\n"],
    "go": ["    os.Exit(0)\n    return false\n}\n", "    syscall.Exit(0)\n    return false\n}\n"],
}
# what a model may write after the function: cutting must drop it, the reference still passes
JUNK = {
    "python": "\n\nprint('junk')\nassert False\n",
    "cpp": "\nint main() { return 1; }\n",
    "java": "\npublic class Main { public static void main(String[] a) { throw new RuntimeException(); } }\n",
    "js": "\nprocess.exit(3)\n",
    "go": "\nfunc TestJunk(t *testing.T) { t.Fatal(\"junk\") }\n",
}
SUBSET = {"python": 8, "cpp": 4, "java": 3, "js": 10, "go": 3}


def load_x(language: str, limit: int) -> list[Sample]:
    from tasks.humaneval_x import HumanEvalX, HumanEvalXConfig

    try:
        samples = HumanEvalX(HumanEvalXConfig(languages=[language], limit=limit)).samples()
    except TaskDataError as e:
        pytest.fail(f"HumanEval-X data missing: {e}")
    assert samples, f"no HumanEval-X {language} data under {default_data_dir()}"
    return samples


def needs_toolchain(language: str) -> None:
    """Skips, with the reason in pytest's summary, where this machine lacks the language's toolchain
    (as root, `make test` installs every one: scripts/system-deps.sh)."""
    tools, why = ex.toolchain(language, ex.Limits())
    if tools is None:
        pytest.skip(f"{why} (`make test` as root installs it: scripts/system-deps.sh)")


@pytest.mark.parametrize("language", ["python", "cpp", "java", "js", "go"])
def test_reference_passes_wrong_fails_early_exit_fails(language, full):
    needs_toolchain(language)
    samples = load_x(language, SUBSET[language])
    records = []
    for s in samples:
        records.append({"method": "ref", "task": "x", "sample_id": s.id, "text": s.meta["canonical_solution"]})
        records.append({"method": "ref+junk", "task": "x", "sample_id": s.id, "text": s.meta["canonical_solution"] + JUNK[language]})
    records.append({"method": "wrong", "task": "x", "sample_id": samples[0].id, "text": WRONG[language]})
    for i, body in enumerate(EARLY_EXIT[language]):
        records.append({"method": f"early-exit-{i}", "task": "x", "sample_id": samples[0].id, "text": body})
    results = ex.score_records({s.id: s for s in samples}, records, ex.Limits(timeout_s=15), workers=2)
    by_method = {r["method"]: r for r in results}
    bad = [(r["method"], r["sample_id"], r["status"], r["detail"][:300]) for r in results if r["method"].startswith("ref") and r["status"] != "passed"]
    assert bad == []
    assert by_method["wrong"]["status"] == "failed", by_method["wrong"]
    for i in range(len(EARLY_EXIT[language])):
        early = by_method[f"early-exit-{i}"]
        assert early["status"] == "failed" and "no completion marker" in early["detail"], early  # exit 0 before the tests ended
    table = {r["method"]: r for r in ex.pass_at_k_table(results)}
    assert table["ref"]["pass@1"] == 1.0 and table["wrong"]["pass@1"] == 0.0
    assert {r["isolation"] for r in results} == {ex.FULL}


def test_early_exit_with_status_0_is_told_apart(full):
    """The plain ``exit(0)`` variants fail for the right reason: no completion marker."""
    s = load_x("python", 1)[0]
    res = ex.check_completion(s, EARLY_EXIT["python"][1], FAST)
    assert res.status == "failed" and res.returncode == 0 and "before the tests ran to their end" in res.detail, res
    res = ex.check_completion(s, s.meta["canonical_solution"], FAST)
    assert res.passed and "spec-harness-tests-done" not in res.stdout, res  # the marker line is not shown


def test_early_exit_fails_under_weak_isolation_too(iso):
    weak = dataclasses.replace(iso, bwrap=None, seccomp=False)
    s = load_x("python", 1)[0]
    assert ex.check_completion(s, s.meta["canonical_solution"], FAST, iso=weak).status == "passed"
    assert ex.check_completion(s, EARLY_EXIT["python"][0], FAST, iso=weak).status == "failed"


def test_humaneval_all_reference_solutions_pass(monkeypatch):
    from tasks.humaneval import HumanEval, HumanEvalConfig

    own = Path(tempfile.mkdtemp(prefix="spec-harness-test-"))  # its own: other runs on this host make theirs
    os.chmod(own, 0o711)  # the sandbox's uid passes through to its working directory
    monkeypatch.setattr(tempfile, "tempdir", str(own))

    samples = HumanEval(HumanEvalConfig()).samples()
    records = [{"method": "ref", "task": "humaneval", "sample_id": s.id, "text": s.meta["canonical_solution"]} for s in samples]
    records.append({"method": "other", "task": "humaneval", "sample_id": "HumanEval/0", "turn": 1, "text": ""})
    records.append({"method": "other", "task": "humaneval", "sample_id": "nope", "text": ""})
    dirs_before = work_dirs()
    results = ex.score_records({s.id: s for s in samples}, records, ex.Limits(timeout_s=15), workers=2)
    assert len(samples) == 164
    failed = [(r["sample_id"], r["status"], r["detail"][:300]) for r in results[:164] if r["status"] != "passed"]
    assert failed == []
    assert set(results[0]) >= {"method", "task", "sample_id", "language", "status", "detail", "isolation"}
    assert results[0]["language"] == "python"
    assert [r["status"] for r in results[164:]] == ["skipped", "skipped"]
    assert work_dirs() <= dirs_before, "temporary work directories were left behind"
    shutil.rmtree(own)


# --------------------------------------------------------------------------- forged passes

# bodies for problem 0 written to be judged passed without being right
ALWAYS_EQUAL = (
    "    class Yes:\n"
    "        def __eq__(self, other):\n"
    "            return True\n"
    "        __hash__ = object.__hash__\n"
    "    return Yes()\n"
)
JS_UNDO_ASSERTIONS = (
    "  process.stderr.write = () => true\n"
    "  console.assert = () => {}\n"
    "  process.on('uncaughtException', () => { process.exitCode = 0 })\n"
    "  process.on('exit', () => { process.exitCode = 0 })\n"
    "  return false\n}\n"
)
# read every file it can see for the marker, print it and leave with status 0
READ_MARKER = {
    "python": (
        "    import os, re, sys\n"
        "    for name in os.listdir('.'):\n"
        "        found = re.search(r'spec-harness-tests-done-[0-9a-f]+', open(name, errors='ignore').read())\n"
        "        if found:\n"
        "            os.write(1, ('\\n' + found.group(0) + '\\n').encode())\n"
        "            os._exit(0)\n"
        "    return False\n"
    ),
    "js": (
        "  const fs = require('fs')\n"
        "  for (const name of fs.readdirSync('.')) {\n"
        "    const found = fs.readFileSync(name, 'latin1').match(/spec-harness-tests-done-[0-9a-f]+/)\n"
        "    if (found) { fs.writeSync(1, '\\n' + found[0] + '\\n'); process.exit(0) }\n"
        "  }\n"
        "  return false\n}\n"
    ),
    "cpp": (
        "    for (const char* name : {\"main.cpp\", \"main\"}) {\n"
        "        FILE* f = fopen(name, \"rb\"); if (!f) continue;\n"
        "        std::string text; int c; while ((c = fgetc(f)) != EOF) text += (char)c;\n"
        "        size_t at = text.find(std::string(\"spec-harness-\") + \"tests-done-\");\n"
        "        if (at != std::string::npos) { printf(\"\\n%s\\n\", text.substr(at, 48).c_str()); fflush(stdout); exit(0); }\n"
        "    }\n"
        "    return false;\n}\n"
    ),
}


def test_an_always_equal_object_fails(full):
    s = load_x("python", 1)[0]
    res = ex.check_completion(s, ALWAYS_EQUAL, FAST)
    assert res.status == "failed" and "has_close_elements returned a Yes, not plain data" in res.detail, res
    assert ex.check_completion(s, s.meta["canonical_solution"], FAST).passed  # the control: plain data passes


def test_js_assertion_failures_cannot_be_undone(full):
    needs_toolchain("js")
    s = load_x("js", 1)[0]
    res = ex.check_completion(s, JS_UNDO_ASSERTIONS, FAST)
    assert res.status == "failed" and "before the tests ran to their end" in res.detail, res
    res = ex.check_completion(s, WRONG["js"], FAST)
    assert res.status == "failed" and "Assertion failed" in res.detail, res


@pytest.mark.parametrize("language", sorted(READ_MARKER))
def test_the_marker_is_not_in_any_file_the_program_reads(language, full):
    needs_toolchain(language)
    s = load_x(language, 1)[0]
    res = ex.check_completion(s, READ_MARKER[language], FAST)
    assert res.status == "failed" and "spec-harness-tests-done" not in res.stdout, res
    program = ex.build_program(s, s.meta["canonical_solution"])
    assert not any(program.marker in text for text in program.files.values())


def test_the_work_directory_is_size_capped(full):
    limits = dataclasses.replace(FAST, work_dir_mb=16)
    code = (
        "import os\n"
        "total = 0\n"
        "try:\n"
        "    for i in range(8):\n"
        "        with open(f'f{i}', 'wb') as f:\n"
        "            f.write(b'x' * (4 << 20))\n"
        "        total += 4 << 20\n"
        "except OSError as e:\n"
        "    print('stopped', e.errno, total)\n"
        "    raise SystemExit(3)\n"
    )
    res = ex.run_program(python(code), limits)
    assert res.status == "failed" and res.returncode == 3 and "stopped 28 16777216" in res.stdout, res  # ENOSPC at 16 MiB
    assert ex.run_program(python(code), dataclasses.replace(FAST, work_dir_mb=64)).passed  # 32 MiB fit in 64
