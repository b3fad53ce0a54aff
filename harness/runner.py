"""The runner: the only place that times anything.

For every sample (and every turn of a multi-turn sample) it runs `autoregressive`
first, as the reference, and then the other requested methods in an order rotated
from sample to sample, each timed with the device synchronised, tokenisation outside
the timer and tokens counted from ids. Each record is appended to ``samples.jsonl``
(flushed and fsynced) the moment it exists, so a killed run loses at most the pair in
flight and a re-run with the same directory resumes.
"""

from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch
from tqdm import tqdm

from harness.config import MethodConfig, ModelConfig, RunSettings, SamplingConfig
from harness.engine import Engine
from harness.lossless import EXACT, NOT_CHECKED, compare
from harness.paths import REPO_ROOT
from harness.registry import METHODS, TASKS
from harness.report import load_runs, metrics
from harness.results import Record, RunDir, cpu_name, git_commit, package_versions, resume_key
from methods.base import Method, StopRule
from tasks.base import Sample, Task, TaskConfig, render_prompt

REFERENCE = "autoregressive"


class HarnessError(Exception):
    """A user-facing error: one line naming the problem and the fix."""


@dataclass
class Experiment:
    model: ModelConfig
    task: TaskConfig
    methods: dict[str, MethodConfig]  # requested methods by name (autoregressive is added)
    run: RunSettings
    sampling: SamplingConfig
    config: dict  # the resolved config as plain data, stored in the manifest


@dataclass
class RunResult:
    path: Path
    table: pd.DataFrame
    resumed: bool
    skipped: int  # (method, sample, turn) records found from an earlier run
    notices: list[str]


def build_methods(exp: Experiment, engine: Engine) -> dict[str, Method]:
    names = [REFERENCE] + [n for n in exp.methods if n != REFERENCE]
    methods: dict[str, Method] = {}
    for name in names:
        cls = METHODS.get(name)
        cfg = exp.methods.get(name) or cls.config_class()
        methods[name] = cls(cfg, engine, exp.sampling)
    return methods


def model_label(engine: Engine) -> str:
    label = engine.cfg.name
    if engine.cfg.random_init and "UNTRAINED" not in label:
        label += " (UNTRAINED)"
    return label


def make_manifest(exp: Experiment, engine: Engine) -> dict:
    threads = torch.get_num_threads()
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": exp.config,
        "git": git_commit(),
        "packages": package_versions(),
        "environment": {
            "device": str(engine.device),
            "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else cpu_name(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "host": platform.node(),
            "pid": os.getpid(),
            "cpu": cpu_name(),
            "threads": threads,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "model": {
            "label": model_label(engine),
            "path": engine.cfg.path,
            "dtype": engine.cfg.dtype,
            "untrained": engine.cfg.random_init,
            "parameters": sum(p.numel() for p in engine.model.parameters()),
            "architecture": type(engine.model).__name__,
        },
        "seed": exp.run.seed,
        "reference": f"greedy {REFERENCE} of the same model ({model_label(engine)})",
    }


def encode(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text).input_ids


def run(exp: Experiment, log: Callable[[str], None] = print) -> RunResult:
    settings = exp.run
    if settings.max_new_tokens <= 0:
        raise HarnessError(f"max_new_tokens must be positive, got {settings.max_new_tokens} (--max-new-tokens N)")
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)

    task: Task = TASKS.get(exp.task.name)(exp.task)
    samples = task.samples()
    if not samples:
        raise HarnessError(f"task '{exp.task.name}' has no samples with these filters; loosen them or raise --limit")
    out = Path(settings.out or REPO_ROOT / "results" / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S"))
    rundir = RunDir(out)
    run_key = resume_key(exp.config)
    resumed = rundir.check(run_key, settings.force)  # fail fast, before loading anything
    records, notices = rundir.records(drop_corrupt=settings.drop_corrupt)

    engine = Engine.load(exp.model)
    methods = build_methods(exp, engine)
    check_context(engine, samples, settings.max_new_tokens)
    if not resumed:
        rundir.create(make_manifest(exp, engine), run_key)
    done = {r.key: r for r in records}
    task_name = exp.task.name
    total = sum(len(s.turns) for s in samples) * len(methods)
    pending = total - sum(1 for s in samples for t in range(len(s.turns)) for m in methods if (m, task_name, s.id, t) in done)
    skipped = total - pending
    for notice in notices:
        log(notice)
    if resumed:
        log(f"resuming {out}: {skipped} of {total} (method, sample, turn) records already done, {pending} to run")

    if pending:
        warm_up(engine, methods, samples[0], settings)
    bar = tqdm(total=pending, desc="decoding", unit="gen", disable=not settings.progress, dynamic_ncols=True)
    for index, sample in enumerate(samples):
        order = rotate([m for m in methods if m != REFERENCE], index)
        replies: list[str] = []
        for turn in range(len(sample.turns)):
            prompt_ids = encode(engine, render_prompt(sample, turn, replies, engine.tokenizer))
            check_length(engine, sample, turn, len(prompt_ids), settings.max_new_tokens)
            stop = StopRule(settings.max_new_tokens, frozenset(engine.eos_ids))
            seed = settings.seed + index
            reference = done.get((REFERENCE, task_name, sample.id, turn))
            for name in [REFERENCE] + order:
                key = (name, task_name, sample.id, turn)
                if key in done:
                    continue
                record = run_one(exp, engine, methods[name], name, sample, turn, prompt_ids, stop, seed, reference)
                rundir.append(record)
                done[key] = record
                if name == REFERENCE:
                    reference = record
                bar.update(1)
            replies.append(reference.text)
    bar.close()
    if settings.execute:
        execute(rundir, samples, rundir.records()[0], settings, log)
    table = rundir.write_summary(metrics(load_runs([out], one_shard=True)))
    return RunResult(out, table, resumed, skipped, notices)


def execute(rundir: RunDir, samples: list[Sample], records: list[Record], settings: RunSettings, log) -> None:
    """Judge every completion against its task's tests in the sandbox (harness/execution.py)."""
    from harness.execution import score_records

    if not any("test" in s.meta for s in samples):
        raise HarnessError("run.execute=true needs a task with tests (humaneval, humaneval-x)")
    log(f"executing {len(records)} completions in the sandbox ...")
    results = score_records({s.id: s for s in samples}, records, workers=settings.execute_workers)
    rundir.write_execution(results)
    skipped = {r["detail"] for r in results if r["status"] == "skipped"}
    for reason in sorted(skipped):
        log(f"skipped: {reason}")


def rotate(items: list[str], k: int) -> list[str]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def check_context(engine: Engine, samples: list[Sample], max_new_tokens: int) -> None:
    """Fail before any work if a first-turn prompt cannot fit with max_new_tokens."""
    for sample in samples:
        ids = encode(engine, render_prompt(sample, 0, [], engine.tokenizer))
        check_length(engine, sample, 0, len(ids), max_new_tokens)


def check_length(engine: Engine, sample: Sample, turn: int, prompt_tokens: int, max_new_tokens: int) -> None:
    if prompt_tokens + max_new_tokens > engine.max_length:
        raise HarnessError(
            f"sample {sample.id} turn {turn}: prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} "
            f"exceeds the model's context of {engine.max_length}; lower --max-new-tokens or --limit/filter the task"
        )


def warm_up(engine: Engine, methods: dict[str, Method], sample: Sample, settings: RunSettings) -> None:
    """Generate a few tokens per method, untimed and discarded (allocator, caches, lazy init)."""
    prompt_ids = encode(engine, render_prompt(sample, 0, [], engine.tokenizer))
    stop = StopRule(settings.warmup_tokens, frozenset(engine.eos_ids))
    for _ in range(settings.warmup):
        for method in methods.values():
            method.generate(prompt_ids, stop, seed=settings.seed)


def run_one(
    exp: Experiment,
    engine: Engine,
    method: Method,
    name: str,
    sample: Sample,
    turn: int,
    prompt_ids: list[int],
    stop: StopRule,
    seed: int,
    reference: Optional[Record],
) -> Record:
    drafts = method.draft_engines()
    for e in [engine] + drafts:
        e.forward_log = []
    engine.reset_peak_memory()
    start = engine.clock()
    gen = method.generate(prompt_ids, stop, seed=seed)
    wall = engine.clock() - start
    peak = engine.peak_memory_bytes()
    target_log, draft_log = engine.forward_log, [entry for e in drafts for entry in e.forward_log]
    for e in [engine] + drafts:
        e.forward_log = None

    checked = not exp.sampling.do_sample and not gen.lossy
    fields: dict = {"status": NOT_CHECKED}
    if checked and name == REFERENCE:
        fields = {"status": EXACT}
    elif checked and reference is not None:
        fields = asdict(compare(engine, prompt_ids, reference.tokens, gen.tokens, exp.run.tie_margin))
    return Record(
        method=name,
        task=exp.task.name,
        sample_id=sample.id,
        turn=turn,
        model=model_label(engine),
        prompt_tokens=len(prompt_ids),
        tokens=gen.tokens,
        text=engine.tokenizer.decode(gen.tokens, skip_special_tokens=True),
        wall_time_s=wall,
        forward_time_s=sum(t for _, t in target_log) + sum(t for _, t in draft_log),
        prefill_time_s=target_log[0][1] if target_log else None,
        draft_forward_time_s=sum(t for _, t in draft_log),
        verify_tokens=sum(n for n, _ in target_log[1:]),
        peak_memory_bytes=peak,
        target_forwards=gen.target_forwards,
        draft_forwards=gen.draft_forwards,
        accepted_per_step=gen.accepted_per_step,
        proposed_per_position=gen.proposed_per_position,
        accepted_per_position=gen.accepted_per_position,
        lossy=gen.lossy,
        language=sample.language,
        category=sample.category,
        seed=seed,
        extra=gen.extra,
        **fields,
    )
