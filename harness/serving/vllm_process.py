"""The harness's side of the vLLM worker: start it, check it answers, stop it on every exit.

The worker (``vllm_worker.py``) runs in vLLM's own environment (``make vllm`` builds
``.venv-vllm``) in a process group of its own, so stopping it stops vLLM's engine core too:
``VllmWorker.close`` asks it to quit, then signals the group (SIGTERM, then SIGKILL). The
runner uses it as a context manager, so a normal exit, an exception or Ctrl-C all close it,
and ``stop_on_sigterm`` turns a SIGTERM of the harness into the same exception path. Should
the harness die without running any of that (SIGKILL), the worker gets the kernel's
parent-death signal and takes its group down itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from harness.errors import HarnessError
from harness.paths import REPO_ROOT

WORKER = Path(__file__).with_name("vllm_worker.py")
MAKE_VLLM = "run `make vllm` (builds .venv-vllm, vLLM's own environment; docs/vllm.md)"


class VllmError(HarnessError):
    """vLLM is missing, broken, or refused a request; the message is one line naming the fix or vLLM's reason."""


@dataclass
class WorkerSettings:
    python: Path  # the interpreter of vLLM's environment
    log: Path  # the worker's stderr (vLLM's own log)
    threads: int  # CPU threads vLLM computes with (VLLM_CPU_OMP_THREADS_BIND)
    kv_cache_gib: int  # KV cache vLLM reserves on CPU, whole GiB (VLLM_CPU_KVCACHE_SPACE)
    timeout_s: float  # longest wait for one reply (a load included)


def vllm_python(path: str) -> Path:
    """The interpreter of vLLM's environment, checked to import vLLM; VllmError naming `make vllm` if not."""
    python = Path(path) if Path(path).is_absolute() else REPO_ROOT / path
    if not python.exists():
        raise VllmError(f"no vLLM environment at {python.parent.parent}; {MAKE_VLLM}")
    done = subprocess.run([str(python), "-P", "-c", "import vllm; print(vllm.__version__)"],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines()
        raise VllmError(f"vLLM does not import in {python} ({lines[-1] if lines else 'no output'}); {MAKE_VLLM}")
    return python


def worker_env(settings: WorkerSettings) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # nothing of the harness's environment leaks into vLLM's
    env["VLLM_CPU_KVCACHE_SPACE"] = str(settings.kv_cache_gib)
    env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{settings.threads - 1}" if settings.threads > 1 else "0"
    env["OMP_NUM_THREADS"] = str(settings.threads)
    env["TOKENIZERS_PARALLELISM"] = "false"
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    return env


class VllmWorker:
    """One vLLM engine in a child process group; ``request`` sends one JSON line and reads the reply."""

    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        settings.log.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(settings.log, "a")
        self.proc = subprocess.Popen(
            [str(settings.python), "-P", str(WORKER)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            env=worker_env(settings), cwd=REPO_ROOT, start_new_session=True,  # its own process group
        )  # fmt: skip
        self.pgid = self.proc.pid
        settings.log.with_suffix(".pid").write_text(str(self.pgid))  # the process group, for whoever must stop it

    def __enter__(self) -> "VllmWorker":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def request(self, message: dict) -> dict:
        """Send ``message``; the reply, or VllmError with vLLM's reason (or the log's last line)."""
        if self.proc.poll() is not None:
            raise VllmError(f"the vLLM worker exited (code {self.proc.returncode}): {self.log_tail()}")
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self._read_line()
        if not line:
            raise VllmError(f"the vLLM worker exited (code {self.proc.wait()}): {self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise VllmError(f"{reply['error']} (vLLM's log: {self.settings.log})")
        return reply

    def _read_line(self) -> str:
        """One line of the worker's replies, or VllmError after ``timeout_s``."""
        box: list[str] = []
        reader = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(self.settings.timeout_s)
        if reader.is_alive():
            self.close()
            raise VllmError(f"the vLLM worker did not answer within {self.settings.timeout_s:.0f} s; "
                            f"see {self.settings.log} (raise vllm.timeout_s on a slow machine)")  # fmt: skip
        return box[0]

    def log_tail(self) -> str:
        lines = [x for x in self.settings.log.read_text(errors="replace").splitlines() if x.strip()]
        errors = [x for x in lines if "Error" in x]
        return (errors or lines or ["(empty log)"])[-1].strip() + f" (log: {self.settings.log})"

    def alive(self) -> bool:
        """Whether any process of the worker's group is left."""
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        return True

    def close(self) -> None:
        """Quit, then SIGTERM and SIGKILL the worker's whole process group until none of it is left."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=20)
            except (OSError, ValueError, subprocess.TimeoutExpired):
                pass
        for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if not self.alive():
                break
            try:
                os.killpg(self.pgid, sig)
            except ProcessLookupError:
                break
            wait_for_group(self, wait)
        if self.proc.poll() is None:
            self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass
        self._log.close()


def wait_for_group(worker: VllmWorker, seconds: float) -> None:
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end and worker.alive():
        worker.proc.poll()  # reap the leader, so a zombie does not count as alive
        time.sleep(0.1)


class stop_on_sigterm:
    """Within this block a SIGTERM raises KeyboardInterrupt, so the cleanup of every ``with`` runs."""

    def __enter__(self) -> "stop_on_sigterm":
        self._old: Optional[Any] = None
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._raise)
        return self

    @staticmethod
    def _raise(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    def __exit__(self, *exc: Any) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
