"""Sandboxed execution of generated code, completion truncation and pass@k.

Hostile programs (endless loop, fork bomb, memory hog, output flood, writes outside the work
directory, a socket to a port this test listens on, signals to everything) must be contained;
reference solutions must pass and wrong ones fail in every language whose toolchain is present.
Kept small for a loaded two-core machine: all 164 HumanEval problems in Python, a few per
other language.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from harness import execution as ex
from harness.paths import REPO_ROOT, default_data_dir
from tasks.base import Sample, TaskDataError

FAST = ex.Limits(timeout_s=3.0, compile_timeout_s=60.0, memory_mb=256, max_processes=32)


@pytest.fixture(scope="module")
def iso() -> ex.Isolation:
    return ex.isolation()


def sandbox_pids() -> list[int]:
    """Processes (any state but zombie) owned by a sandbox uid."""
    lo, hi = ex.SANDBOX_UID_BASE, ex.SANDBOX_UID_BASE + ex.SANDBOX_SLOTS
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry.name}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        uid = int(fields.get("Uid", "0").split()[0])
        if lo <= uid < hi and not fields.get("State", "").strip().startswith("Z"):
            pids.append(int(entry.name))
    return pids


def work_dirs() -> set[str]:
    import tempfile

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


def test_pass_at_k_table_groups_by_method_and_language():
    rows = []
    for method, verdicts in [("a", {"P/0": ["passed", "failed"], "P/1": ["failed", "failed"]}), ("b", {"P/0": ["passed", "passed"]})]:
        for sid, statuses in verdicts.items():
            rows += [{"method": method, "task": "t", "language": "python", "sample_id": sid, "status": s} for s in statuses]
    rows.append({"method": "a", "task": "t", "language": "go", "sample_id": "G/0", "status": "skipped"})
    rows.append({"method": "a", "task": "t", "language": "go", "sample_id": "G/1", "status": "timeout"})
    table = {(r["method"], r["language"]): r for r in ex.pass_at_k_table(rows, ks=(1, 2))}
    a_py = table[("a", "python")]
    assert a_py["problems"] == 2 and a_py["completions"] == 4 and a_py["passed"] == 1
    assert a_py["pass@1"] == pytest.approx((0.5 + 0.0) / 2)
    assert a_py["pass@2"] == pytest.approx((1.0 + 0.0) / 2)
    assert table[("b", "python")]["pass@1"] == 1.0
    a_go = table[("a", "go")]
    assert a_go["skipped"] == 1 and a_go["problems"] == 1 and a_go["pass@1"] == 0.0 and a_go["pass@2"] is None


# --------------------------------------------------------------------------- truncation


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


# --------------------------------------------------------------------------- the sandbox, hostile programs


def test_isolation_probe(iso):
    assert iso.describe()
    if os.geteuid() == 0:
        assert iso.uid_drop, "as root the sandbox must drop to a dedicated uid (else RLIMIT_NPROC is void)"


def test_infinite_loop_times_out_quickly():
    t0 = time.monotonic()
    res = ex.run_program("python", {"main.py": "while True:\n    pass\n"}, ex.Limits(timeout_s=1.5))
    assert res.status == "timeout", res
    assert time.monotonic() - t0 < 10


def test_fork_bomb_is_contained(iso):
    if not iso.process_limit:
        pytest.skip(f"no process limit available here: {iso.describe()}")
    before = len(os.listdir("/proc"))
    bomb = (
        "import os, time\n"
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
    res = ex.run_program("python", {"main.py": bomb}, ex.Limits(timeout_s=3.0, max_processes=24))
    assert res.status in ("timeout", "error", "failed"), res
    assert time.monotonic() - t0 < 20
    deadline = time.monotonic() + 5
    while sandbox_pids() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_pids() == [], "processes of a sandbox uid outlived the run"
    assert len(os.listdir("/proc")) < before + 50


def test_memory_hog_is_stopped_not_the_runner():
    hog = "chunks = []\nwhile True:\n    chunks.append(bytearray(32 * 1024 * 1024))\n"
    res = ex.run_program("python", {"main.py": hog}, ex.Limits(timeout_s=10, memory_mb=256))
    assert res.status == "error" and "memory" in res.detail, res


def test_output_flood_is_capped():
    res = ex.run_program("python", {"main.py": "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"}, ex.Limits(timeout_s=10, max_file_mb=1))
    assert res.status == "error" and "file size" in res.detail, res


def test_writes_outside_the_work_directory_fail(iso):
    token = secrets.token_hex(6)
    targets = [Path(f"/tmp/escape-{token}"), REPO_ROOT / f"escape-{token}", Path(f"/var/tmp/escape-{token}")]
    if Path("/dev/shm").is_dir():
        targets.append(Path(f"/dev/shm/escape-{token}"))
    prog = (
        "import os, sys\n"
        f"targets = {[str(p) for p in targets]!r}\n"
        "open('inside.txt', 'w').write('ok')\n"  # the work directory itself is writable
        "escaped = []\n"
        "for t in targets:\n"
        "    try:\n"
        "        with open(t, 'w') as f:\n"
        "            f.write('escaped')\n"
        "        escaped.append(t)\n"
        "    except OSError as e:\n"
        "        print('denied', t, e.errno)\n"
        "sys.exit(1 if escaped else 0)\n"
    )
    try:
        res = ex.run_program("python", {"main.py": prog}, FAST)
        leaked = [p for p in targets if p.exists()]
    finally:
        for p in targets:
            if p.exists():
                p.unlink()
    if not iso.filesystem_confined:
        pytest.skip(f"Landlock unavailable, world-writable directories stay writable: {iso.describe()}; leaked={leaked}")
    assert leaked == [], f"sandbox wrote outside its directory: {leaked}"
    assert res.status == "passed", res  # the program saw every write denied, and could write at home
    assert res.stdout.count("denied") == len(targets)


def test_network_is_unreachable(iso):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(4)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    accepted: list[object] = []

    def accept() -> None:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline and not stop.is_set():
            try:
                conn, _ = server.accept()
                accepted.append(conn.recv(64))
                conn.close()
            except (socket.timeout, OSError):
                continue

    stop = threading.Event()
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    prog = (
        "import socket\n"
        f"s = socket.create_connection(('127.0.0.1', {port}), timeout=3)\n"
        "s.sendall(b'escaped')\n"
        "s.close()\n"
    )
    try:
        res = ex.run_program("python", {"main.py": prog}, ex.Limits(timeout_s=6))
        time.sleep(0.3)
    finally:
        stop.set()
        th.join(5)
        server.close()
    if not iso.tcp_blocked:
        pytest.skip(f"network isolation unavailable here ({iso.describe()}); the program got through: {bool(accepted)}")
    assert accepted == [], "the sandboxed program reached a socket of the host"
    assert res.status == "failed" and ("unreachable" in res.detail or "Permission" in res.detail or "Errno" in res.detail), res


def test_signals_do_not_reach_the_harness():
    prog = "import os, signal\nfor target in (-1, os.getppid(), 1):\n    try:\n        os.kill(target, signal.SIGKILL)\n    except OSError:\n        pass\n"
    res = ex.run_program("python", {"main.py": prog}, FAST)
    assert res.status in ("passed", "error", "failed"), res  # and this test process is still alive


def test_hostile_cpp(iso):
    tools, why = ex._toolchain("cpp", FAST)
    if tools is None:
        pytest.skip(why)
    loop = ex.run_program("cpp", {"main.cpp": "int main(){ volatile unsigned long x = 0; for(;;) x++; }\n"}, ex.Limits(timeout_s=1.5))
    assert loop.status == "timeout", loop
    hog = "#include <cstring>\n#include <vector>\nint main(){ std::vector<char*> v; for(;;){ char* p = new char[1<<24]; std::memset(p, 1, 1<<24); v.push_back(p);} }\n"
    res = ex.run_program("cpp", {"main.cpp": hog}, ex.Limits(timeout_s=10, memory_mb=256))
    assert res.status == "error" and "memory" in res.detail, res
    if iso.process_limit:
        bomb = "#include <unistd.h>\nint main(){ for(;;) { fork(); } }\n"
        res = ex.run_program("cpp", {"main.cpp": bomb}, ex.Limits(timeout_s=2, max_processes=24))
        assert res.status in ("timeout", "error", "failed"), res
        deadline = time.monotonic() + 5
        while sandbox_pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sandbox_pids() == []
    if iso.filesystem_confined:
        target = Path(f"/tmp/escape-{secrets.token_hex(6)}")
        prog = f'#include <cstdio>\nint main(){{ FILE* f = fopen("{target}", "w"); return f ? 0 : 3; }}\n'
        try:
            res = ex.run_program("cpp", {"main.cpp": prog}, FAST)
            assert not target.exists()
        finally:
            if target.exists():
                target.unlink()
        assert res.status == "failed" and res.returncode == 3, res


def test_missing_toolchain_is_skipped(monkeypatch):
    monkeypatch.setattr(ex, "_which", lambda tool: None)
    res = ex.run_program("go", {"main_test.go": "package main\n"})
    assert res.status == "skipped" and "go not installed" in res.detail and "golang-go" in res.detail
    assert ex.run_program("js", {"main.js": ""}).status == "skipped"
    assert ex.run_program("cobol", {"x": ""}).status == "skipped"


# --------------------------------------------------------------------------- reference and wrong solutions

# wrong bodies for problem 0 (has_close_elements: returns a bool; its tests expect true somewhere)
WRONG = {
    "python": "    return False\n",
    "cpp": "    return false;\n}\n",
    "java": "        return false;\n    }\n}\n",
    "js": "  return false\n}\n",
    "go": "    return false\n}\n",
}
# what a model may write after the function: truncation must drop it, the reference still passes
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
        return HumanEvalX(HumanEvalXConfig(languages=[language], limit=limit)).samples()
    except TaskDataError as e:
        pytest.skip(f"HumanEval-X data missing: {e}")


def judge(samples: list[Sample], language: str, workers: int = 2) -> list[dict]:
    records = []
    for s in samples:
        records.append({"method": "ref", "task": "x", "sample_id": s.id, "text": s.meta["canonical_solution"]})
        records.append({"method": "ref+junk", "task": "x", "sample_id": s.id, "text": s.meta["canonical_solution"] + JUNK[language]})
    records.append({"method": "wrong", "task": "x", "sample_id": samples[0].id, "text": WRONG[language]})
    return ex.score_records({s.id: s for s in samples}, records, ex.Limits(timeout_s=15), workers=workers)


@pytest.mark.parametrize("language", ["python", "cpp", "java", "js", "go"])
def test_reference_passes_and_wrong_fails(language):
    tools, why = ex._toolchain(language, ex.Limits())
    if tools is None:
        pytest.skip(why)
    samples = load_x(language, SUBSET[language])
    if not samples:
        pytest.skip(f"no HumanEval-X {language} data under {default_data_dir()}")
    results = judge(samples, language)
    bad = [(r["method"], r["sample_id"], r["status"], r["detail"][:300]) for r in results if r["method"] != "wrong" and r["status"] != "passed"]
    assert bad == []
    wrong = [r for r in results if r["method"] == "wrong"]
    assert wrong[0]["status"] == "failed", wrong
    table = {r["method"]: r for r in ex.pass_at_k_table(results)}
    assert table["ref"]["pass@1"] == 1.0 and table["wrong"]["pass@1"] == 0.0


def test_humaneval_all_reference_solutions_pass():
    from tasks.humaneval import HumanEval, HumanEvalConfig

    try:
        samples = HumanEval(HumanEvalConfig()).samples()
    except TaskDataError as e:
        pytest.skip(f"HumanEval data missing: {e}")
    records = [{"method": "ref", "task": "humaneval", "sample_id": s.id, "text": s.meta["canonical_solution"]} for s in samples]
    records.append({"method": "other", "task": "humaneval", "sample_id": "HumanEval/0", "turn": 1, "text": ""})
    records.append({"method": "other", "task": "humaneval", "sample_id": "nope", "text": ""})
    dirs_before = work_dirs()
    results = ex.score_records({s.id: s for s in samples}, records, ex.Limits(timeout_s=15), workers=2)
    assert len(samples) == 164
    failed = [(r["sample_id"], r["status"], r["detail"][:300]) for r in results[:164] if r["status"] != "passed"]
    assert failed == []
    assert set(results[0]) >= {"method", "task", "sample_id", "language", "status", "detail"}
    assert results[0]["language"] == "python"
    assert [r["status"] for r in results[164:]] == ["skipped", "skipped"]
    assert work_dirs() <= dirs_before, "temporary work directories were left behind"
