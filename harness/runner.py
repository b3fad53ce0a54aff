"""The runner: the only place that times anything.

For every sample (and every turn of a multi-turn sample) it runs the requested methods
and `autoregressive`, the reference, in an order rotated from sample to sample (the
reference included, so no method always runs first or right after it), each timed with
the device synchronised before and after the generation only, tokenisation outside the
timer and tokens counted from ids. A record is compared with the reference's tokens once
that exists and then appended to ``samples.jsonl`` (flushed and fsynced), complete, so a
killed run loses at most the records of the (sample, turn) in flight and a re-run with
the same directory resumes.
"""

from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import torch


from harness.compiled import compile_count
from harness.config import MethodConfig, ModelConfig, RunSettings, SamplingConfig, VllmSettings
from harness.engine import Engine
from harness.errors import HarnessError
from harness.leaderboard import run_leaderboard
from harness.lossless import EXACT, NOT_CHECKED, compare
from harness.paths import REPO_ROOT
from harness.progress import Progress
from harness.registry import METHODS, TASKS
from harness.repetition import repetition_share
from harness.report import load_runs, metrics
from harness.results import Record, RunDir, cpu_name, git_commit, package_versions, resume_key
from harness.stops import StopRule, StopStrings
from methods.base import Method
from tasks.base import Sample, Task, TaskConfig, render_prompt

REFERENCE = "autoregressive"


@dataclass
class Experiment:
    model: ModelConfig
    task: TaskConfig
    methods: dict[str, MethodConfig]  # requested methods by name (autoregressive is added)
    run: RunSettings
    sampling: SamplingConfig
    config: dict  # the resolved config as plain data, stored in the manifest
    vllm: VllmSettings = field(default_factory=VllmSettings)  # how run.engine=vllm starts vLLM

    def __post_init__(self) -> None:
        """Every value checked here, once, before any data or model loads (config.ConfigValueError)."""
        for part in (self.run, self.sampling, self.model, self.vllm, *self.methods.values()):
            part.check()


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
        "forward_mode": forward_mode_record(engine),
        "engine": {"name": "harness"},
    }


def forward_mode_record(engine: Engine) -> dict:
    """How forwards run, eager or compiled (model.compile), for the manifest's ``forward_mode`` record:
    leaderboards show it and refuse to merge modes."""
    if engine.compiled is None:
        return {"mode": "eager"}
    c = engine.compiled
    return {"mode": "compiled", "buckets": list(c.buckets), "static_cache_len": c.static_len,
            "backend": "inductor, CUDA graphs" if c.cuda else "inductor"}  # fmt: skip


def encode(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer(text).input_ids


def encode_reference(engine: Engine, sample: Sample) -> Optional[list[int]]:
    """The sample's reference text as token ids (no special tokens), or None when it has none."""
    if sample.reference is None:
        return None
    return engine.tokenizer(sample.reference, add_special_tokens=False).input_ids


def generate(method: Method, prompt_ids: list[int], stop: StopRule, seed: int, reference_ids: Optional[list[int]]):
    """``method.generate``, with the sample's reference for the methods that use one (``uses_reference``)."""
    if method.uses_reference:
        return method.generate(prompt_ids, stop, seed=seed, reference_ids=reference_ids)
    return method.generate(prompt_ids, stop, seed=seed)


def check_references(methods: dict[str, Method], samples: list[Sample]) -> None:
    """Fail before any work if a method that needs a reference (``requires_reference``) meets a
    sample without one."""
    for name, method in methods.items():
        missing = [s.id for s in samples if s.reference is None] if method.requires_reference else []
        if missing:
            raise HarnessError(
                f"{name} copies from the sample's reference, but {len(missing)} sample(s) have none "
                f"(first: {missing[0]}); give each a reference (a jsonl \"reference\" field) or set "
                f"method.{name}.source=auto"
            )


def stop_strings(engine: Engine, task: Task, sample: Sample) -> Optional[StopStrings]:
    """The sample's stop strings, matched in the output decoded as ``Record.text`` is; None if none."""
    strings = task.stop_strings(sample)
    if not strings:
        return None
    return StopStrings(strings, lambda ids: engine.tokenizer.decode(ids, skip_special_tokens=True))


def out_dir(settings: RunSettings) -> Path:
    """The run directory: run.out, or a new one under results/runs named by the time."""
    return Path(settings.out or REPO_ROOT / "results" / "runs" / datetime.now().strftime("%Y%m%d-%H%M%S"))


def run(exp: Experiment, log: Callable[[str], None] = print) -> RunResult:
    settings = exp.run
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)

    task: Task = TASKS.get(exp.task.name)(exp.task)
    samples = task.samples()
    if not samples:
        raise HarnessError(f"task '{exp.task.name}' has no samples with these filters; loosen them or raise --limit")
    out = out_dir(settings)
    rundir = RunDir(out)
    run_key = resume_key(exp.config)
    rundir.check_writable()  # fail fast, before loading anything
    rundir.lock()  # the one writer until this process ends
    resumed = rundir.check(run_key, settings.force)
    if not resumed and rundir.has_manifest():
        log(f"taking over {out}: its manifest has no records yet (a run that never started); starting afresh")
        rundir.take_over()
    if settings.execute:
        sandbox_isolation(settings)  # refuse weak isolation before generating anything
    records, notices = rundir.records(repair=True, drop_corrupt=settings.drop_corrupt)  # the only writer

    engine = Engine.load(exp.model)
    methods = build_methods(exp, engine)
    samples, dropped = fit_context(engine, methods, samples, settings.max_new_tokens, exp.task.too_long)
    if not samples:
        raise HarnessError(f"every one of the {len(dropped)} prompts is longer than the model's context of "
                           f"{engine.max_length} allows with max_new_tokens {settings.max_new_tokens}; "
                           "lower --max-new-tokens or use a model with a longer context")  # fmt: skip
    check_references(methods, samples)
    fit_static_caches(engine, methods, samples, max(settings.max_new_tokens, settings.warmup_tokens))
    if not resumed:
        rundir.create(make_manifest(exp, engine), run_key)
        for entry in dropped:
            rundir.append_dropped(entry)
    for entry in dropped:
        log(f"dropped sample {entry['sample_id']}: {entry['reason']} (task.too_long=drop)")
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
        warm_up(engine, methods, samples[0], settings, log)
    # a bar with the method and sample in flight and an ETA; off with run.progress=false (--quiet) and
    # when stderr is not a terminal (CI logs)
    with Progress(pending, "decoding", "gen", enabled=settings.progress) as bar:
        for index, sample in enumerate(samples):
            order = rotate(list(methods), index)  # the reference rotates with the others
            reference_ids = encode_reference(engine, sample)
            replies: list[str] = []
            for turn in range(len(sample.turns)):
                prompt_ids = encode(engine, render_prompt(sample, turn, replies, engine.tokenizer))
                problem = length_problem(engine, methods, len(prompt_ids), settings.max_new_tokens)
                if problem is not None and exp.task.too_long == "drop":  # this turn and the ones after it
                    if not any((sample.id, turn) == (d["sample_id"], d["turn"]) for d in rundir.dropped()):
                        rundir.append_dropped(dropped_entry(engine, sample, turn, len(prompt_ids), problem))
                    log(f"dropped sample {sample.id} from turn {turn}: {problem} (task.too_long=drop)")
                    bar.advance(sum(1 for t in range(turn, len(sample.turns)) for m in methods
                                    if (m, task_name, sample.id, t) not in done))
                    break
                check_length(engine, methods, sample, turn, len(prompt_ids), settings.max_new_tokens)
                stop = StopRule(settings.max_new_tokens, frozenset(engine.eos_ids), stop_strings(engine, task, sample))
                seed = settings.seed + index
                reference = done.get((REFERENCE, task_name, sample.id, turn))
                waiting: list[Record] = []  # finished, not yet compared: appended once the reference exists
                for position, name in enumerate(order):
                    if (name, task_name, sample.id, turn) in done:
                        continue
                    bar.item(f"{name} on {sample.id}" + (f" turn {turn}" if turn else ""))
                    graphs = compile_count() if engine.compiled is not None else 0
                    record = run_one(exp, engine, methods[name], name, sample, turn, prompt_ids, stop, seed, position,
                                     reference_ids)  # fmt: skip
                    if engine.compiled is not None and compile_count() > graphs:  # should not happen: say so
                        log(f"notice: {name} compiled {compile_count() - graphs} graph(s) inside the timer "
                            f"on sample {sample.id}")  # fmt: skip
                    bar.advance()
                    if name == REFERENCE:
                        reference = record
                        rundir.append_text(sample_text(engine, sample.id, turn, prompt_ids, record.tokens))
                        waiting.insert(0, record)  # written first, so a record never precedes its reference
                    else:
                        waiting.append(record)
                    if reference is None:
                        continue
                    for finished in waiting:
                        finished = check(exp, engine, finished, prompt_ids, reference)
                        rundir.append(finished)
                        done[finished.key] = finished
                    waiting = []
                replies.append(reference.text)
    if settings.execute:
        execute(rundir, samples, rundir.records()[0], settings, log)
    table = rundir.write_summary(metrics(load_runs([out], one_shard=True)))
    rundir.write_leaderboard(run_leaderboard(table, rundir.manifest(), rundir.dropped()))
    return RunResult(out, table, resumed, skipped, notices)


def execute(rundir: RunDir, samples: list[Sample], records: list[Record], settings: RunSettings, log) -> None:
    """Judge every completion against its task's tests in the sandbox (harness/sandbox/)."""
    from harness.sandbox import SETUP_FAILED, score_records

    if not any("test" in s.meta for s in samples):
        raise HarnessError("run.execute=true needs a task with tests (humaneval, humaneval-x)")
    iso = sandbox_isolation(settings)
    log(f"executing {len(records)} completions in the sandbox: {iso.describe()}")
    results = score_records({s.id: s for s in samples}, records, workers=settings.execute_workers, iso=iso)
    rundir.write_execution(results, iso.as_dict())
    broken = [r["detail"] for r in results if r["status"] == "error" and r["detail"].startswith(SETUP_FAILED)]
    if broken:  # not the completions' verdicts: a pass@1 over them would blame the model for the sandbox
        raise HarnessError(f"the sandbox did not start for {len(broken)} of {len(results)} completions ({broken[0][:200]}); "
                           "fix its set-up (harness/sandbox/__init__.py says what it needs) and rerun with the same --out: "
                           "the generations are kept")  # fmt: skip
    skipped = {r["detail"] for r in results if r["status"] == "skipped"}
    for reason in sorted(skipped):
        log(f"skipped: {reason}")


def sandbox_isolation(settings: RunSettings):
    """The sandbox's isolation (``harness.sandbox.Isolation``) for ``run.execute=true``;
    below full isolation a HarnessError unless ``run.execute_isolation=weak`` accepts it."""
    from harness.sandbox import IsolationError, require_isolation

    try:
        return require_isolation(settings.execute_isolation)
    except IsolationError as e:
        raise HarnessError(str(e)) from None


def rotate(items: list[str], k: int) -> list[str]:
    if not items:
        return items
    k %= len(items)
    return items[k:] + items[:k]


def fit_context(
    engine: Engine, methods: dict[str, Method], samples: list[Sample], max_new_tokens: int, too_long: str
) -> tuple[list[Sample], list[dict]]:
    """The samples whose first-turn prompt fits the context with max_new_tokens, and the ones
    left out (``task.too_long=drop``); with ``too_long=error`` the first that does not fit
    stops the run before any work."""
    kept, dropped = [], []
    for sample in samples:
        ids = encode(engine, render_prompt(sample, 0, [], engine.tokenizer))
        problem = length_problem(engine, methods, len(ids), max_new_tokens)
        if problem is None:
            kept.append(sample)
        elif too_long == "drop":
            dropped.append(dropped_entry(engine, sample, 0, len(ids), problem))
        else:
            check_length(engine, methods, sample, 0, len(ids), max_new_tokens)
    return kept, dropped


def length_problem(engine: Engine, methods: dict[str, Method], prompt_tokens: int, max_new_tokens: int) -> Optional[str]:
    """Why a prompt of ``prompt_tokens`` cannot run, or None: its tokens, max_new_tokens and the
    positions a method's steps use past the output (``Method.headroom``: a Medusa tree's depth,
    a SPACE chunk's masks) must fit the model's context, so no method ever feeds a position beyond it."""
    name, headroom = max(((n, m.headroom()) for n, m in methods.items()), key=lambda x: x[1])
    if prompt_tokens + max_new_tokens + headroom <= engine.max_length:
        return None
    room = f" + {headroom} positions for {name}'s steps" if headroom else ""
    return (f"prompt of {prompt_tokens} tokens + max_new_tokens {max_new_tokens}{room} exceeds the model's "
            f"context of {engine.max_length}")


def check_length(
    engine: Engine, methods: dict[str, Method], sample: Sample, turn: int, prompt_tokens: int, max_new_tokens: int
) -> None:
    """Refuse a prompt that does not fit the context (``length_problem``) in one line."""
    problem = length_problem(engine, methods, prompt_tokens, max_new_tokens)
    if problem is not None:
        raise HarnessError(f"sample {sample.id} turn {turn}: {problem}; lower --max-new-tokens, --limit/filter the "
                           "task, or task.too_long=drop to leave such prompts out")  # fmt: skip


def dropped_entry(engine: Engine, sample: Sample, turn: int, prompt_tokens: int, problem: str) -> dict:
    return {"sample_id": sample.id, "turn": turn, "prompt_tokens": prompt_tokens, "context": engine.max_length,
            "reason": problem}


def warm_up(engine: Engine, methods: dict[str, Method], sample: Sample, settings: RunSettings, log=print) -> None:
    """Generate a few tokens per method, untimed and discarded (allocator, caches, lazy init).

    model.compile=true: at least one round (a method's own compiled parts, e.g. Medusa heads,
    compile there), then every bucket of each compiled engine that ran a forward, so no
    compilation happens inside a timer (engines only transformers' generate drives are skipped).
    """
    prompt_ids = encode(engine, render_prompt(sample, 0, [], engine.tokenizer))
    reference_ids = encode_reference(engine, sample)
    stop = StopRule(settings.warmup_tokens, frozenset(engine.eos_ids))
    compiled = compiled_engines(engine, methods)
    start, graphs = time.perf_counter(), compile_count() if compiled else 0
    for _ in range(max(settings.warmup, 1 if compiled else 0)):
        for method in methods.values():
            generate(method, prompt_ids, stop, settings.seed, reference_ids)
    for e in compiled:
        if e.forwards:
            e.compiled.warm_up()
    for method in methods.values():
        method.reset()  # nothing learnt from the warm-up's output reaches a timed sample
    if compiled:
        log(f"compiled mode: {compile_count() - graphs} graphs compiled in {time.perf_counter() - start:.0f} s "
            "(warm-up, untimed)")  # fmt: skip


def compiled_engines(engine: Engine, methods: dict[str, Method]) -> list[Engine]:
    """The target and the methods' draft engines that run compiled (model.compile=true)."""
    engines = [engine] + [d for m in methods.values() for d in m.draft_engines()]
    return [e for e in engines if e.compiled is not None]


def fit_static_caches(engine: Engine, methods: dict[str, Method], samples: list[Sample], new_tokens: int) -> None:
    """model.compile=true with model.compile_cache_len=0: size each compiled engine's static KV
    cache for the longest first-turn prompt + ``new_tokens`` (the larger of max_new_tokens and
    the warm-up's) + padding (harness/compiled.py). A longer later-turn prompt grows it, with a
    warning (and recompiles)."""
    engines = [e for e in compiled_engines(engine, methods) if not e.cfg.compile_cache_len]
    if not engines:
        return
    longest = max(len(encode(engine, render_prompt(s, 0, [], engine.tokenizer))) for s in samples)
    for e in engines:
        e.compiled.reserve(longest + new_tokens)


def sample_text(engine: Engine, sample_id: str, turn: int, prompt_ids: list[int], tokens: list[int]) -> dict:
    """What a report's sample viewer shows for one turn: the prompt as the model saw it and the
    reference's output one token per piece (a method's accepted steps are drawn over them)."""
    decode = engine.tokenizer.decode
    return {"sample_id": sample_id, "turn": turn, "prompt": decode(prompt_ids, skip_special_tokens=True),
            "pieces": [decode([t], skip_special_tokens=False) for t in tokens]}  # fmt: skip


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
    position: int,
    reference_ids: Optional[list[int]] = None,
) -> Record:
    """One timed generation, as a record not yet compared with the reference (see ``check``).

    The device is synchronised only before and after the generation; per-forward times come
    from the engines' timers (CUDA events on a GPU, read after the generation).
    """
    timers = [engine] + method.draft_timers()  # the target, then draft engines and draft heads
    engine.reset_peak_memory()
    for t in timers:
        t.start_timing()
    try:
        start = engine.clock()
        gen = generate(method, prompt_ids, stop, seed, reference_ids)
        wall = engine.clock() - start
    finally:
        target_log, *draft_logs = [t.stop_timing() for t in timers]
    peak = engine.peak_memory_bytes()
    ends = engine.last_timer.end_offsets() if target_log else []  # from the same timer, no extra sync
    draft_log = [entry for log in draft_logs for entry in log]
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
        first_token_s=ends[0] if ends else None,
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
        stop_reason=gen.stop_reason,
        repetition=repetition_share(prompt_ids, gen.tokens),
        run_order=position,
        extra=gen.extra,
        status=NOT_CHECKED,  # until check()
    )


def check(exp: Experiment, engine: Engine, record: Record, prompt_ids: list[int], reference: Record) -> Record:
    """``record`` with its losslessness fields: greedy, non-lossy outputs against the reference's
    tokens (one extra forward at a first difference, outside any timer); others not-checked."""
    if exp.sampling.do_sample or record.lossy:
        return replace(record, status=NOT_CHECKED)
    if record.method == REFERENCE:
        return replace(record, status=EXACT)
    verdict = compare(engine, prompt_ids, reference.tokens, record.tokens, exp.run.tie_margin)
    return replace(record, **asdict(verdict))
