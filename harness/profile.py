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
from dataclasses import dataclass
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


def profile(exp, method_name: str, top: int = 15) -> ProfileReport:
    import torch

    from harness.engine import Engine
    from harness.registry import TASKS
    from harness.runner import build_methods, encode, stop_strings
    from harness.stops import StopRule
    from tasks.base import render_prompt

    settings = exp.run
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    task = TASKS.get(exp.task.name)(exp.task)
    samples = task.samples()
    engine = Engine.load(exp.model)
    method = build_methods(exp, engine)[method_name]
    prompts = [encode(engine, render_prompt(s, 0, [], engine.tokenizer)) for s in samples]
    eos = frozenset(engine.eos_ids)
    stops = [StopRule(settings.max_new_tokens, eos, stop_strings(engine, task, s)) for s in samples]  # as in a run
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
