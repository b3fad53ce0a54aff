"""Typed configuration shared by the library. Plain dataclasses: the command line
registers them with Hydra's ConfigStore (harness/cli.py); nothing else imports Hydra.

Method configs live beside each method (methods/<name>.py) and task configs beside
each task (tasks/<name>.py); both subclass the small bases defined here and in
tasks/base.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from harness.errors import HarnessError


class ConfigValueError(HarnessError, ValueError):
    """A config value outside its allowed range; the message names the key, the range and the fix."""


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigValueError naming ``key``, its ``value`` and the ``allowed`` range unless ``ok``."""
    if not ok:
        raise ConfigValueError(f"{key}={value!r} is not valid: {allowed}")


def check_device(name: str, key: str = "model.device") -> None:
    """The device must exist on this machine: ``auto``, ``cpu``, or ``cuda``/``cuda:N`` with CUDA present."""
    import torch  # noqa: PLC0415 (this module is plain dataclasses; only the device check needs torch)

    kind, _, index = name.partition(":")
    require(name == "auto" or name == "cpu" or (kind == "cuda" and (not index or index.isdigit())), key, name,
            "must be auto, cpu, cuda or cuda:N")  # fmt: skip
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        require(count > 0, key, name, f"this machine has no CUDA device; use {key}=cpu|auto")
        require(int(index or 0) < count, key, name,
                f"this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")  # fmt: skip


@dataclass
class ModelConfig:
    name: str = "custom"  # label used in outputs
    path: str = ""  # hub id or local directory (relative paths also tried from the repo root)
    tokenizer: Optional[str] = None  # tokenizer id/path when it differs from `path`
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    dtype: str = "float32"  # float32 | bfloat16 | float16
    device: str = "auto"  # auto (CUDA when present, else CPU) | cpu | cuda | cuda:N
    attn_implementation: str = "sdpa"  # sdpa | eager (both accept custom 4-D masks)
    random_init: bool = False  # build from config.json with random weights (untrained!)
    seed: int = 0  # seed for random_init
    trust_remote_code: bool = False  # only when you trust the model's repository
    draft: Optional[str] = None  # default draft model (registry name or path) for `speculative`
    # The compiled mode (harness/compiled.py): a static KV cache and torch.compile'd forwards
    # (CUDA graphs on CUDA) for the baseline and every method; compiling happens in the warm-up
    compile: bool = False  # false = eager transformers forwards over a growing cache
    # forward sizes compiled (tokens): a forward is padded to the next one; a longer one (a prompt) runs eagerly.
    # 2 is a bucket of its own: speculative's gamma-1 verify and its draft's catch-up are 2-token forwards, which
    # would otherwise run the 4-row graph (make tables-buckets: results/compile-buckets.md; the measured gain is
    # within a noisy machine's spread, see docs/compiled.md)
    compile_buckets: list[int] = field(default_factory=lambda: [1, 2, 4, 16, 64])
    compile_cache_len: int = 0  # static KV cache entries; 0 = fitted by the runner (longest prompt + max_new_tokens + padding)

    def check(self) -> None:
        """Every value in its range (and the device present), before anything loads."""
        require(self.dtype in ("float32", "bfloat16", "float16"), "model.dtype", self.dtype,
                "must be float32 or bfloat16 or float16")  # fmt: skip
        require(self.attn_implementation in ("sdpa", "eager"), "model.attn_implementation", self.attn_implementation,
                "must be sdpa or eager")  # fmt: skip
        require(all(b >= 1 for b in self.compile_buckets), "model.compile_buckets", self.compile_buckets,
                "must be sizes >= 1")  # fmt: skip
        require(self.compile_cache_len >= 0, "model.compile_cache_len", self.compile_cache_len,
                "must be >= 0 (0 = fitted)")  # fmt: skip
        check_device(self.device)


@dataclass
class MethodConfig:
    """Base of every method's config; subclasses add their own fields."""

    name: str = "?"  # registry name

    def check(self) -> None:
        """Values in range, before anything loads; methods with bounded fields override it."""


@dataclass
class SamplingConfig:
    do_sample: bool = False  # False = greedy (the lossless comparison mode)
    temperature: float = 1.0  # applied to p (and to q, for draft methods)
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1.0 = off

    def check(self) -> None:
        """Every value in its range: a sampling run never quietly turns greedy or unfiltered."""
        if self.do_sample:
            require(self.temperature > 0, "sampling.temperature", self.temperature,
                    "must be > 0 when sampling.do_sample=true (greedy decoding: sampling.do_sample=false)")
        require(0 < self.top_p <= 1, "sampling.top_p", self.top_p, "must be 0 < top_p <= 1 (1 = off)")
        require(self.top_k >= 0, "sampling.top_k", self.top_k, "must be >= 0 (0 = off)")


@dataclass
class RunSettings:
    max_new_tokens: int = 128  # per turn
    seed: int = 0  # seed for sampling methods (sample i uses seed + i)
    warmup: int = 1  # samples generated and discarded per method before timing
    warmup_tokens: int = 16  # max_new_tokens during warm-up
    threads: int = 0  # torch CPU threads; 0 = leave torch's default
    tie_margin: float = 1e-3  # a first mismatch whose reference top1-top2 logit margin is below this is a `tie`
    out: Optional[str] = None  # run directory (default results/runs/<timestamp>)
    force: bool = False  # append to an existing run directory made with another config
    drop_corrupt: bool = False  # move corrupt lines of samples.jsonl aside on resume
    progress: bool = True  # show a progress bar
    execute: bool = False  # run each completion against the task's tests in a sandbox (pass@1); opt-in
    execute_workers: int = 1  # sandboxed programs run at a time
    # "full": run.execute=true refuses to run unless the sandbox has every isolation layer
    # (harness/sandbox/__init__.py); "weak": run with what this machine has, recorded as weak
    # in the manifest, execution.jsonl, summary.csv and the leaderboards' pass@1 column
    execute_isolation: str = "full"
    # the engine the methods run on: harness (this project's own engine, harness/engine.py) | vllm (vLLM's own
    # implementation of each method, in .venv-vllm; docs/vllm.md)
    engine: str = "harness"
    # run.engine=vllm: requests kept in flight together, one run directory per value (e.g. [1,4,16])
    concurrency: list[int] = field(default_factory=lambda: [1])

    def check(self) -> None:
        """Every value in its range (the run directory itself is checked by ``RunDir``)."""
        require(self.max_new_tokens >= 1, "run.max_new_tokens", self.max_new_tokens, "must be >= 1 (--max-new-tokens N)")
        require(self.warmup >= 0, "run.warmup", self.warmup, "must be >= 0")
        require(self.warmup_tokens >= 1, "run.warmup_tokens", self.warmup_tokens, "must be >= 1")
        require(self.threads >= 0, "run.threads", self.threads, "must be >= 1 (or 0 = torch's default)")
        require(self.tie_margin >= 0, "run.tie_margin", self.tie_margin, "must be >= 0")
        require(self.execute_workers >= 1, "run.execute_workers", self.execute_workers, "must be >= 1")
        require(self.execute_isolation in ("full", "weak"), "run.execute_isolation", self.execute_isolation,
                "must be full or weak")  # fmt: skip
        require(self.engine in ("harness", "vllm"), "run.engine", self.engine, "must be harness or vllm (--engine)")
        require(bool(self.concurrency) and all(c >= 1 for c in self.concurrency), "run.concurrency", self.concurrency,
                "must be one or more integers >= 1 (e.g. run.concurrency=1,4,16)")  # fmt: skip


@dataclass
class VllmSettings:
    """How run.engine=vllm starts vLLM (harness/serving/, docs/vllm.md)."""

    python: str = ".venv-vllm/bin/python"  # interpreter of vLLM's own environment (`make vllm` builds it)
    threads: int = 1  # CPU threads vLLM computes with (its engine core is pinned to cores 0..threads-1)
    kv_cache_gib: int = 1  # KV cache vLLM reserves on CPU (whole GiB: VLLM_CPU_KVCACHE_SPACE)
    max_model_len: int = 0  # context vLLM reserves KV cache for; 0 = the model's own context
    enforce_eager: bool = True  # false = let vLLM compile its forwards (torch.compile / CUDA graphs)
    num_speculative_tokens: int = 3  # tokens the EAGLE and Medusa heads draft per step (vLLM drafts chains)
    side_by_side: bool = True  # also run each method as the harness implements it (OUT/harness); false = the reference only
    timeout_s: float = 900.0  # longest wait for one answer of vLLM (loading a model included)
    rounds: int = 3  # timed rounds per method and concurrency, each [plain vLLM batch, method batch], order alternating
    gpu_memory_share: float = 0.4  # share of GPU memory each of the two live engines takes (on CUDA; CPU ignores it)

    def check(self) -> None:
        require(self.threads >= 1, "vllm.threads", self.threads, "must be >= 1")
        require(self.kv_cache_gib >= 1, "vllm.kv_cache_gib", self.kv_cache_gib, "must be >= 1")
        require(self.max_model_len >= 0, "vllm.max_model_len", self.max_model_len, "must be >= 0 (0 = the model's own)")
        require(self.num_speculative_tokens >= 1, "vllm.num_speculative_tokens", self.num_speculative_tokens, "must be >= 1")
        require(self.timeout_s > 0, "vllm.timeout_s", self.timeout_s, "must be > 0")
        require(self.rounds >= 1, "vllm.rounds", self.rounds, "must be >= 1")
        require(0 < self.gpu_memory_share <= 0.5, "vllm.gpu_memory_share", self.gpu_memory_share,
                "must be in (0, 0.5]: two engines share the GPU")  # fmt: skip
