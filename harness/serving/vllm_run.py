"""``harness run --engine vllm``: the run's methods as vLLM implements them, checked two ways.

    OUT/harness/       a plain harness run of the same methods and prompts (transformers, float32):
                       its `autoregressive` is the reference every vLLM output is compared with, and its
                       other methods are the harness's side of the side-by-side table
                       (vllm.side_by_side=false: the reference only)
    OUT/vllm-c<N>/     one run directory per concurrency N (run.concurrency): vLLM's records, its
                       `autoregressive` being vLLM without speculation, the baseline of its speedups
    OUT/vllm-<side>.log   vLLM's own logs: vllm-baseline.log (plain vLLM), vllm-<method>.log
    OUT/leaderboard.md    the load and side-by-side tables (harness/serving/vllm_report.py)

Each record of a vLLM run directory is an ordinary record (``harness leaderboard OUT/vllm-c1``
works as for any run) with ``engine: vllm``; its ``status`` compares it with the transformers
reference (first index, margin, the tie rule), and ``extra["vs_vllm_greedy"]`` with vLLM's own
greedy output at the same concurrency. Stop rules: vLLM stops at the EOS ids, max_new_tokens
and the task's stop strings; its tokens then go through the harness's own commit path
(``Committer``), so every engine cuts at the same token.

Timing: plain vLLM and the method's engine stay alive together (two workers) and are timed
in ``vllm.rounds`` paired rounds per concurrency, the order alternating (``vllm_rounds.py``):
every round's two makespans go to ``load.jsonl``, and the speedups come from those pairs.
The worker times every token's arrival in vLLM's process (``vllm_worker.py``); a record is
its request in the first round (``wall_time_s``: submitted to last token), with the
verdicts of every round (``extra["rounds_exact"]``).
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from harness.engine import Engine
from harness.lossless import EXACT, MISMATCH, compare, first_difference
from harness.paths import REPO_ROOT
from harness.registry import TASKS
from harness.repetition import repetition_share
from harness.report import REFERENCE, load_runs, metrics
from harness.results import Record, RunDir, resume_key
from harness.serving.vllm_methods import VllmMethod, model_path, vllm_method
from harness.serving.vllm_process import VllmError, VllmWorker, WorkerSettings, stop_on_sigterm, vllm_python
from harness.serving.vllm_rounds import Round, load_row, paired_rounds
from harness.stops import Committer, StopRule
from tasks.base import Sample, render_prompt

LOAD = "load.jsonl"  # per (method, concurrency, round): both makespans and token counts, exactness, spec counters
WARMUP_PROMPT = list(range(3, 35))  # untimed warm-up prompt: no measured prompt, so no cache learns from one


@dataclass
class Prompt:
    sample: Sample
    ids: list[int]  # the prompt's token ids, as the harness's runner encodes them
    stop: StopRule  # the harness's stop rule for it
    stop_strings: list[str]  # the task's stop strings (vLLM stops at them too)
    reference: Record  # the transformers float32 greedy record (OUT/harness)


def run_vllm(exp, log: Callable[[str], None] = print):
    """The vLLM side of a run (see the module docstring); returns the runner's ``RunResult``."""
    from harness.runner import RunResult, encode, make_manifest, run, stop_strings

    settings = exp.run
    out = Path(settings.out or REPO_ROOT / "results" / "runs" / "vllm")
    if exp.sampling.do_sample:
        raise VllmError("run.engine=vllm compares greedy outputs only; drop sampling.do_sample=true")
    if exp.model.random_init:
        raise VllmError("vLLM loads weights from disk and model.random_init has none; save the model "
                        "(save_pretrained) and pass its directory as --model")  # fmt: skip
    if sorted(set(settings.concurrency)) != sorted(settings.concurrency) or min(settings.concurrency) < 1:
        raise VllmError(f"run.concurrency must be distinct positive numbers, got {settings.concurrency}")
    if not [n for n in exp.methods if n != REFERENCE]:
        raise VllmError("run.engine=vllm times methods against plain vLLM; name at least one besides "
                        f"{REFERENCE} (--methods {REFERENCE},prompt-lookup)")  # fmt: skip
    python = vllm_python(exp.vllm.python)  # before any work: a missing vLLM names `make vllm`
    engine = Engine.load(exp.model)
    methods = {REFERENCE: None, **{n: c for n, c in exp.methods.items() if n != REFERENCE}}
    mapped = {n: vllm_method(n, c or default_config(n), exp.model, exp.vllm.num_speculative_tokens,
                             out / "eagle-vllm") for n, c in methods.items()}  # fmt: skip

    # 1. the harness's own run: the transformers reference (and each method as the harness implements it)
    harness_config = {**exp.config, "run": {**exp.config.get("run", {}), "engine": "harness", "concurrency": [1]}}
    harness_methods = exp.methods if exp.vllm.side_by_side else {}
    harness_exp = replace(exp, run=replace(settings, engine="harness", out=str(out / "harness")),
                          methods=harness_methods, config=harness_config)  # fmt: skip
    log(f"harness engine (transformers) -> {out / 'harness'}")
    run(harness_exp, log)

    # 2. the prompts and stop rules exactly as that run had them
    task = TASKS.get(exp.task.name)(exp.task)
    references = {r.sample_id: r for r in RunDir(out / "harness").records()[0] if r.method == REFERENCE and r.turn == 0}
    prompts = []
    for sample in task.samples():
        if sample.id not in references:
            continue  # dropped as too long by the harness run
        if len(sample.turns) > 1:
            raise VllmError(f"sample {sample.id} has {len(sample.turns)} turns; run.engine=vllm runs single-turn "
                            "tasks (humaneval, spec-bench, jsonl)")  # fmt: skip
        strings = stop_strings(engine, task, sample)
        prompts.append(Prompt(sample, encode(engine, render_prompt(sample, 0, [], engine.tokenizer)),
                              StopRule(settings.max_new_tokens, frozenset(engine.eos_ids), strings),
                              list(strings.strings) if strings else [], references[sample.id]))  # fmt: skip

    # 3. one run directory per concurrency
    rundirs: dict[int, RunDir] = {}
    for c in settings.concurrency:
        config = {**exp.config, "run": {**exp.config.get("run", {}), "concurrency": [c]}}
        rundir = RunDir(out / f"vllm-c{c}")
        key = resume_key(config)
        if not rundir.check(key, settings.force):
            rundir.create(vllm_manifest(make_manifest(replace(exp, config=config), engine), exp, c, python), key)
        rundirs[c] = rundir

    # 4. per method: its engine and plain vLLM's alive together, timed in alternating paired rounds
    with stop_on_sigterm(), ExitStack() as live:
        baseline = None
        for name, method in mapped.items():
            todo = [c for c in settings.concurrency if missing(rundirs[c], name, prompts)
                    or missing(rundirs[c], REFERENCE, prompts)]  # fmt: skip
            if name == REFERENCE or not todo:
                continue  # plain vLLM is timed beside every method
            if baseline is None:
                baseline = open_engine(live, exp, mapped[REFERENCE], python, out, log)
            measure(baseline, exp, engine, method, prompts, todo, rundirs, python, out, log)
    for rundir in rundirs.values():
        rundir.write_summary(metrics(load_runs([rundir.path], one_shard=True)))

    # 5. the load and side-by-side tables
    from harness.serving.vllm_report import closing_table, write_report

    return RunResult(out, closing_table(write_report(out)), False, 0, [])


def default_config(name: str):
    from harness.registry import METHODS

    return METHODS.get(name).config_class(name=name)


def vllm_manifest(manifest: dict, exp, concurrency: int, python: Path) -> dict:
    """The harness's manifest, naming vLLM as the engine (its version comes with the first load)."""
    return {**manifest, "engine": {"name": "vllm", "python": str(python), "concurrency": concurrency,
                                   "threads": exp.vllm.threads, "enforce_eager": exp.vllm.enforce_eager,
                                   "rounds": exp.vllm.rounds,
                                   "num_speculative_tokens": exp.vllm.num_speculative_tokens}}  # fmt: skip


def missing(rundir: RunDir, name: str, prompts: list[Prompt]) -> bool:
    have = {r.sample_id for r in rundir.records()[0] if r.method == name}
    return any(p.sample.id not in have for p in prompts)


def open_engine(stack: ExitStack, exp, method: VllmMethod, python: Path, out: Path, log) -> VllmWorker:
    """A worker for ``method`` (its log and pid file named after it), closed with ``stack``, its engine loaded."""
    role = "baseline" if method.speculative_config is None else method.name
    settings = WorkerSettings(python, out / f"vllm-{role}.log", exp.vllm.threads, exp.vllm.kv_cache_gib,
                              exp.vllm.timeout_s)  # fmt: skip
    worker = stack.enter_context(VllmWorker(settings))
    load_engine(worker, exp, method, log)
    return worker


def load_engine(worker: VllmWorker, exp, method: VllmMethod, log) -> None:
    """Load the target (and the method's drafter) in the worker; a refusal names the method and vLLM's reason."""
    try:
        reply = worker.request({
            "op": "load", "model": model_path(exp.model.path), "dtype": exp.model.dtype, "seed": exp.run.seed,
            "max_model_len": exp.vllm.max_model_len or None, "enforce_eager": exp.vllm.enforce_eager,
            "gpu_memory_utilization": exp.vllm.gpu_memory_share, "speculative_config": method.speculative_config,
        })  # fmt: skip
    except VllmError as exc:
        raise VllmError(f"vLLM refused {method.name} ({json.dumps(method.speculative_config)}): {exc}") from None
    log(f"vLLM {reply['version']} loaded {exp.model.path} for {method.name}")


def measure(baseline: VllmWorker, exp, engine: Engine, method: VllmMethod, prompts: list[Prompt], todo: list[int],
            rundirs: dict[int, RunDir], python: Path, out: Path, log) -> None:  # fmt: skip
    """Per concurrency in ``todo``: ``vllm.rounds`` paired rounds of the baseline and the method, every request
    of every round checked, records and load rows appended (a stateful method gets a fresh engine per round)."""
    with ExitStack() as live:
        worker = None if method.fresh_engine_per_round else open_engine(live, exp, method, python, out, log)
        for c in todo:
            batch, warmup = generate_requests(exp, engine, prompts, c)
            baseline.request(warmup)  # untimed: the first steps of a concurrency pay for allocations
            if worker is not None:
                worker.request(warmup)

            def method_batch(index: int) -> dict:
                if worker is not None:
                    return worker.request(batch)
                with ExitStack() as fresh:  # a cache of earlier outputs must not learn this round's answers
                    once = open_engine(fresh, exp, method, python, out, log)
                    once.request(warmup)
                    return once.request(batch)

            log(f"vLLM {method.name} and plain vLLM: {len(prompts)} prompts, concurrency {c}, {exp.vllm.rounds} rounds")
            rounds = paired_rounds(lambda index: baseline.request(batch), method_batch, exp.vllm.rounds)
            check_rounds(exp, engine, method.name, prompts, rounds, c, rundirs[c])


def generate_requests(exp, engine: Engine, prompts: list[Prompt], c: int) -> tuple[dict, dict]:
    """The worker requests of one concurrency: every prompt, and the untimed warm-up."""
    stops = {tuple(p.stop_strings) for p in prompts}
    if len(stops) > 1:
        raise VllmError("run.engine=vllm needs one set of stop strings for every prompt of a task")
    request = {"op": "generate", "concurrency": c, "max_tokens": exp.run.max_new_tokens,
               "stop_token_ids": sorted(engine.eos_ids)}  # fmt: skip
    batch = {**request, "prompts": [p.ids for p in prompts], "stop": list(stops.pop())}
    warmup = {**request, "prompts": [WARMUP_PROMPT] * c, "max_tokens": exp.run.warmup_tokens, "stop": []}
    return batch, warmup


def check_rounds(exp, engine: Engine, name: str, prompts: list[Prompt], rounds: list[Round], c: int,
                 rundir: RunDir) -> None:  # fmt: skip
    """Every request of every round against the transformers reference and (the method's) against the paired
    round's plain vLLM output; one load row per round; one record per prompt and side (see ``keep``)."""
    kept: dict[tuple[str, str], Record] = {}
    for round_ in rounds:
        counts = {"tokens": 0, "baseline_tokens": 0, "exact": 0, "baseline_exact": 0, "equal": 0}
        for index, prompt in enumerate(prompts):
            # 1. both sides' outputs against the transformers reference
            base = checked(exp, engine, REFERENCE, prompt, round_.baseline, index, c)
            mine = checked(exp, engine, name, prompt, round_.method, index, c)
            # 2. the method's against plain vLLM's of this round, plain vLLM's against its own first round
            first = kept.get((REFERENCE, prompt.sample.id), base)
            for record, own in ((base, first), (mine, base)):
                diff = first_difference(own.tokens, record.tokens)
                record.extra["vs_vllm_greedy"] = EXACT if diff is None else f"{MISMATCH} at {diff} (round {round_.index})"
                keep(kept, record, len(rounds))
            # 3. the round's counts
            counts["tokens"] += len(mine.tokens)
            counts["baseline_tokens"] += len(base.tokens)
            counts["exact"] += mine.status == EXACT
            counts["baseline_exact"] += base.status == EXACT
            counts["equal"] += mine.extra["vs_vllm_greedy"] == EXACT
        with open(rundir.path / LOAD, "a") as f:  # 4. the round's load row
            f.write(json.dumps(load_row(name, c, round_, counts["tokens"], counts["baseline_tokens"], counts["exact"],
                                        counts["baseline_exact"], counts["equal"], len(prompts))) + "\n")  # fmt: skip
    have = {(r.method, r.sample_id) for r in rundir.records()[0]}  # 5. the records not yet in the run directory
    for (method, sample_id), record in kept.items():
        if (method, sample_id) not in have:
            rundir.append(record)


def checked(exp, engine: Engine, name: str, prompt: Prompt, reply: dict, index: int, c: int) -> Record:
    """The record of request ``index`` of a batch, compared with the transformers reference."""
    spec = reply["spec"] if index == 0 else None  # the counters are the engine's: the batch's change goes once
    record = to_record(exp, engine, name, prompt, reply["results"][index], c, spec)
    verdict = compare(engine, prompt.ids, prompt.reference.tokens, record.tokens, exp.run.tie_margin)
    return replace(record, **asdict(verdict))


def keep(kept: dict[tuple[str, str], Record], record: Record, rounds: int) -> None:
    """One record per (method, prompt): the first round's (its timings and tokens), with the verdicts of a later
    round that was not exact (against the reference or vLLM's greedy output); ``rounds_exact`` counts the
    rounds whose output equalled the reference."""
    key = (record.method, record.sample_id)
    first = kept.setdefault(key, record)
    if first is record:
        first.extra.update(rounds=rounds, rounds_exact=0)
    else:
        if first.status == EXACT and record.status != EXACT:
            kept[key] = first = replace(first, status=record.status, first_diff=record.first_diff, margin=record.margin,
                                        reference_token=record.reference_token, method_token=record.method_token)  # fmt: skip
        if first.extra["vs_vllm_greedy"] == EXACT:
            first.extra["vs_vllm_greedy"] = record.extra["vs_vllm_greedy"]
    first.extra["rounds_exact"] += record.status == EXACT


def to_record(exp, engine: Engine, name: str, prompt: Prompt, result: dict, c: int, spec: Optional[dict]) -> Record:
    """A record of one vLLM request: its tokens cut by the harness's stop rule, its timings and steps."""
    committer = Committer(prompt.stop)
    steps, per_step, arrivals = 0, [], []
    at = 0
    for size, arrival in zip(result["chunks"], result["arrivals"]):
        if committer.done:
            break
        taken = committer.add(result["tokens"][at : at + size])
        at += size
        steps += 1
        per_step.append(taken)
        arrivals.append(arrival)
    tokens = committer.tokens
    submitted = result["submitted"]
    wall = (arrivals[-1] - submitted) if arrivals else 0.0
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:])]
    ttft = arrivals[0] - submitted if arrivals else None
    proposed = accepted = []
    if spec is not None and spec["drafts"]:
        positions = len(spec["accepted_per_position"])
        proposed, accepted = [spec["drafts"]] * positions, spec["accepted_per_position"]
    return Record(
        method=name, task=exp.task.name, sample_id=prompt.sample.id, turn=0, model=prompt.reference.model,
        prompt_tokens=len(prompt.ids), tokens=tokens, text=engine.tokenizer.decode(tokens, skip_special_tokens=True),
        wall_time_s=wall, forward_time_s=wall, prefill_time_s=None, draft_forward_time_s=0.0, verify_tokens=0,
        peak_memory_bytes=None, target_forwards=steps, draft_forwards=0, accepted_per_step=per_step,
        proposed_per_position=list(proposed), accepted_per_position=list(accepted), lossy=False, status="not-checked",
        language=prompt.sample.language, category=prompt.sample.category, seed=exp.run.seed,
        stop_reason=committer.reason, repetition=repetition_share(prompt.ids, tokens), run_order=None,
        extra={"concurrency": c, "ttft_s": ttft, "tpot_s": (wall - ttft) / (len(tokens) - 1) if len(tokens) > 1 else None,
               "itl_s": gaps, "vllm_finish_reason": result["finish_reason"], "vllm_tokens": len(result["tokens"])},
        engine="vllm",
    )  # fmt: skip
