"""``harness profile``: where a method's decoding time goes.

Runs one method (no reference, nothing written) on the task's first samples under Python's
``cProfile`` after an untimed warm-up, and reports, for the functions of the harness and
its methods, calls and cumulative time as a share of the total decoding time, beside the
engine's own split (time inside model forwards vs the rest). A method's phases are its
functions (Medusa: ``candidates`` = the heads, ``Engine.forward`` = the tree forward,
``greedy`` = acceptance, ``KVCache.keep`` = compaction), so the table reads as a profile of
one decoding step. cProfile adds overhead to Python-heavy phases: the shares are for
finding where time goes, the run's leaderboard has the real timings.
"""

from __future__ import annotations

import cProfile
import pstats
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.paths import REPO_ROOT

OURS = tuple(str(REPO_ROOT / d) for d in ("harness", "methods", "tasks"))


@dataclass
class ProfileRow:
    function: str  # repository-relative file:line:function
    calls: int
    cumulative_s: float
    share: float  # of the total decoding wall time


@dataclass
class ProfileReport:
    method: str
    samples: int
    tokens: int
    wall_s: float  # decoding time under the profiler (all samples)
    forward_s: float  # of which inside the target's forwards (engine clock)
    forwards: int
    rows: list[ProfileRow]

    def table(self) -> str:
        from tabulate import tabulate

        head = (f"{self.method}: {self.samples} samples, {self.tokens} tokens, {self.wall_s:.3f} s decoding under "
                f"cProfile; {self.forwards} target forwards = {self.forward_s:.3f} s "
                f"({self.forward_s / self.wall_s:.0%}), mean {1e3 * self.forward_s / max(1, self.forwards):.2f} ms")
        body = tabulate([(r.function, r.calls, f"{r.cumulative_s:.3f}", f"{r.share:.1%}") for r in self.rows],
                        headers=["function", "calls", "cumulative s", "share"], tablefmt="github")
        return head + "\n\n" + body


@dataclass
class Workload:
    """What a profile runs: the model, the methods built on it, and the task's prompts with
    their stop rules, as a run would have them."""

    engine: object  # harness.engine.Engine
    methods: dict  # name -> Method
    prompts: list[list[int]]
    stops: list  # StopRule per prompt
    eos: frozenset[int]


def load_workload(exp) -> Workload:
    import torch

    from harness.engine import Engine
    from harness.registry import TASKS
    from harness.runner import build_methods, encode, stop_strings
    from harness.stops import StopRule
    from tasks.base import render_prompt

    if exp.run.threads > 0:
        torch.set_num_threads(exp.run.threads)
    task = TASKS.get(exp.task.name)(exp.task)
    samples = task.samples()
    engine = Engine.load(exp.model)
    prompts = [encode(engine, render_prompt(s, 0, [], engine.tokenizer)) for s in samples]
    eos = frozenset(engine.eos_ids)
    stops = [StopRule(exp.run.max_new_tokens, eos, stop_strings(engine, task, s)) for s in samples]  # as in a run
    return Workload(engine, build_methods(exp, engine), prompts, stops, eos)


def profile(exp, method_name: str, top: int = 15) -> ProfileReport:
    from harness.stops import StopRule

    settings = exp.run
    work = load_workload(exp)
    engine, method, prompts, stops, eos = work.engine, work.methods[method_name], work.prompts, work.stops, work.eos
    method.generate(prompts[0], StopRule(settings.warmup_tokens, eos), seed=settings.seed)  # warm-up
    engine.start_timing()
    prof = cProfile.Profile()
    tokens = 0
    start = engine.clock()
    prof.enable()
    for i, ids in enumerate(prompts):
        tokens += len(method.generate(ids, stops[i], seed=settings.seed + i).tokens)
    prof.disable()
    wall = engine.clock() - start
    forwards = engine.stop_timing()
    forward_s = sum(seconds for _, seconds in forwards)
    stats = pstats.Stats(prof)
    rows = []
    for (path, line, name), (_cc, calls, _tt, cum, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        if path.startswith(OURS):
            rel = Path(path).relative_to(REPO_ROOT).as_posix()
            rows.append(ProfileRow(f"{rel}:{line}:{name}", calls, cum, cum / wall))
    rows.sort(key=lambda r: -r.cumulative_s)
    return ProfileReport(method_name, len(prompts), tokens, wall, forward_s, len(forwards), rows[:top])


# ---- the per-phase split (harness profile --phases) ----------------------------------------------
PHASE_COLUMNS = ("draft", "verify", "tree", "accept", "cache", "other")  # ms per decode step, in this order
PHASE_NOTE = ("ms per decode step (a target forward after the prompt's), from wall clocks (no profiler): "
              "draft = draft-model and draft-head forwards; verify = target forwards after the prompt's; "
              "tree = building the tree or draft (top-k, masks, positions, candidate tables); accept = "
              "acceptance walks and commits; cache = cache compaction and rollback; other = the rest of "
              "the wall time (the method's own loop)")  # fmt: skip


@dataclass
class PhaseRow:
    """One method's decoding time split by phase (``PHASE_COLUMNS``), per decode step."""

    method: str
    samples: int
    tokens: int  # new tokens, all samples
    steps: int  # decode steps: target forwards after each prompt's
    tokens_per_step: float
    wall_ms_per_step: float  # the whole generation (prompt forward included) / steps
    prefill_ms_per_step: float  # the prompt forwards / steps (outside the phase columns)
    ms_per_step: dict[str, float]  # phase -> ms per decode step; sums with prefill to wall


@dataclass
class PhaseTable:
    rows: list[PhaseRow]
    provenance: dict  # commit and tree state, machine, threads, packages, load, settings

    def table(self) -> str:
        from tabulate import tabulate

        head = ["method", "tokens/step", *PHASE_COLUMNS, "prefill", "wall"]
        body = [[r.method, f"{r.tokens_per_step:.2f}", *(f"{r.ms_per_step[p]:.2f}" for p in PHASE_COLUMNS),
                 f"{r.prefill_ms_per_step:.2f}", f"{r.wall_ms_per_step:.2f}"] for r in self.rows]  # fmt: skip
        return tabulate(body, headers=head, tablefmt="github")

    def as_json(self) -> dict:
        return {**self.provenance, "note": PHASE_NOTE, "rows": [asdict(r) for r in self.rows]}


def profile_phases(exp, method_names: list[str]) -> PhaseTable:
    """Every method in ``method_names`` on the task's samples (interleaved per sample, after an
    untimed warm-up each), with a ``PhaseClock`` on the target and the draft engines: each
    decode step's wall time split into ``PHASE_COLUMNS`` (the engine's ``phase`` sections;
    forwards are timed inside them exclusively). No record is written, no reference is run."""
    import os
    import platform

    import torch

    from harness.engine import PhaseClock
    from harness.results import cpu_name, git_commit, package_versions
    from harness.runner import model_label
    from harness.stops import StopRule

    settings = exp.run
    work = load_workload(exp)
    engine, methods, prompts, stops, eos = work.engine, work.methods, work.prompts, work.stops, work.eos
    load_before, git = os.getloadavg()[0], git_commit()  # the tree as the run starts
    # 1. one untimed warm-up per method; one phase clock per method, on every engine it runs
    clocks = {}
    for name in method_names:
        method = methods[name]
        method.generate(prompts[0], StopRule(settings.warmup_tokens, eos), seed=settings.seed)
        method.reset()
        clocks[name] = PhaseClock()
    totals = {name: {"wall": 0.0, "prefill": 0.0, "steps": 0, "tokens": 0} for name in method_names}
    # 2. sample by sample, every method in turn: wall clock around the generation, the phase
    #    clock inside it, the target's timer for the prompt's forward (kept apart from verify)
    for i, ids in enumerate(prompts):
        for name in method_names:
            method, clock, total = methods[name], clocks[name], totals[name]
            drafts = [d for d in method.draft_engines() if d is not engine]
            for e in (engine, *drafts):
                e.phases = clock
            for d in drafts:
                d.forward_phase = "draft"
            engine.start_timing()
            try:
                start = engine.clock()
                gen = method.generate(ids, stops[i], seed=settings.seed + i)
                total["wall"] += engine.clock() - start
            finally:
                log = engine.stop_timing()
                for e in (engine, *drafts):
                    e.phases = None
                for d in drafts:
                    d.forward_phase = "verify"
            total["prefill"] += log[0][1] if log else 0.0
            total["steps"] += max(gen.target_forwards - 1, 0)
            total["tokens"] += len(gen.tokens)
    # 3. per decode step; the prompt's forward is taken out of verify, the unclaimed rest is "other"
    rows = []
    for name in method_names:
        total, seconds = totals[name], clocks[name].seconds
        steps = max(total["steps"], 1)
        phase = {p: seconds.get(p, 0.0) for p in PHASE_COLUMNS[:-1]}
        phase["verify"] -= total["prefill"]
        phase["other"] = total["wall"] - total["prefill"] - sum(phase.values())
        rows.append(PhaseRow(name, len(prompts), total["tokens"], total["steps"], total["tokens"] / steps,
                             1e3 * total["wall"] / steps, 1e3 * total["prefill"] / steps,
                             {p: 1e3 * phase[p] / steps for p in PHASE_COLUMNS}))  # fmt: skip
    provenance = {
        "git": git,
        "model": model_label(engine),
        "device": str(engine.device),
        "device_name": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else cpu_name(),
        "threads": torch.get_num_threads(),
        "host": platform.node(),
        "packages": package_versions(),
        "load_average_1min": {"before": load_before, "after": os.getloadavg()[0]},
        "task": exp.task.name,
        "samples": len(prompts),
        "max_new_tokens": settings.max_new_tokens,
        "forward_mode": "compiled" if exp.model.compile else "eager",
    }
    return PhaseTable(rows, provenance)
