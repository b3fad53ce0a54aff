"""One process per device: a job that asks for ``device=auto`` on a host with several GPUs
takes the first GPU no other job holds (an exclusive lock file per GPU, released when the
job ends), so parallel sweep jobs (joblib, Ray, submitit) never share a GPU. Where the
launcher already gave the job its own GPU (Ray's ``num_gpus``, SLURM's ``--gpus``),
``CUDA_VISIBLE_DEVICES`` shows one device and there is nothing to choose.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def lock_dir() -> Path:
    return Path(os.environ.get("HARNESS_DEVICE_LOCKS", Path(tempfile.gettempdir()) / "harness-device-locks"))


def physical_id(index: int) -> str:
    """The id of visible CUDA device ``index`` as the host knows it (for host-wide locks)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[index] if index < len(visible) else str(index)


@contextmanager
def claim_device(requested: str, count: int | None = None, locks: Path | None = None) -> Iterator[str]:
    """Yield the device string a job should use. ``auto`` with more than one visible GPU
    holds an exclusive lock on the first free one for the duration of the block; any other
    request (``cpu``, ``cuda:1``, ``auto`` with 0 or 1 GPU) is passed through unchanged."""
    if count is None:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if requested != "auto" or count <= 1:
        yield requested
        return
    locks = locks or lock_dir()
    locks.mkdir(parents=True, exist_ok=True)
    while True:
        for index in range(count):
            f = open(locks / f"cuda-{physical_id(index)}.lock", "w")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                continue
            try:
                f.write(f"{os.getpid()}\n")
                f.flush()
                yield f"cuda:{index}"
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
                f.close()
            return
        import time

        time.sleep(1.0)  # every GPU is held by another job of this host: wait for one
