"""``harness run --engine vllm``: the run's methods as vLLM implements them, checked two ways.

    OUT/harness/       a plain harness run of the same methods and prompts (transformers, float32):
                       its `autoregressive` is the reference every vLLM output is compared with, and its
                       other methods are the harness's side of the side-by-side table
                       (vllm.side_by_side=false: the reference only)
    OUT/vllm-c<N>/     one run directory per concurrency N (run.concurrency): vLLM's records, its
                       `autoregressive` being vLLM without speculation, the baseline of its speedups
    OUT/vllm-worker.log   vLLM's own log
    OUT/leaderboard.md    the load and side-by-side tables (harness/serving/vllm_report.py)

Each record of a vLLM run directory is an ordinary record (``harness leaderboard OUT/vllm-c1``
works as for any run) with ``engine: vllm``; its ``status`` compares it with the transformers
reference (first index, margin, the tie rule), and ``extra["vs_vllm_greedy"]`` with vLLM's own
greedy output at the same concurrency. Stop rules: vLLM stops at the EOS ids, max_new_tokens
and the task's stop strings; its tokens then go through the harness's own commit path
(``Committer``), so every engine cuts at the same token.

Timing: the worker times every token's arrival in vLLM's process (``vllm_worker.py``); a
record's ``wall_time_s`` is its request's latency (submitted to last token), and each
concurrency's makespan goes to ``load.jsonl`` (throughput = tokens / makespan).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional

from harness.engine import Engine
from harness.lossless import EXACT, MISMATCH, compare, first_difference
from harness.paths import REPO_ROOT
from harness.registry import TASKS
from harness.repetition import repetition_share
from harness.report import load_runs, metrics
from harness.results import Record, RunDir, resume_key
from harness.serving.vllm_methods import VllmMethod, model_path, vllm_method
from harness.serving.vllm_process import VllmError, VllmWorker, WorkerSettings, stop_on_sigterm, vllm_python
from harness.stops import Committer, StopRule
from tasks.base import Sample, render_prompt

LOAD = "load.jsonl"  # per (method, concurrency): makespan, requests, vLLM's spec-decode counter changes
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
    from harness.runner import REFERENCE, RunResult, encode, make_manifest, run, stop_strings

    settings = exp.run
    out = Path(settings.out or REPO_ROOT / "results" / "runs" / "vllm")
    if exp.sampling.do_sample:
        raise VllmError("run.engine=vllm compares greedy outputs only; drop sampling.do_sample=true")
    if exp.model.random_init:
        raise VllmError("vLLM loads weights from disk and model.random_init has none; save the model "
                        "(save_pretrained) and pass its directory as --model")  # fmt: skip
    if sorted(set(settings.concurrency)) != sorted(settings.concurrency) or min(settings.concurrency) < 1:
        raise VllmError(f"run.concurrency must be distinct positive numbers, got {settings.concurrency}")
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

    # 4. per method: one vLLM engine (a fresh one per concurrency for methods that learn across requests)
    worker_settings = WorkerSettings(python, out / "vllm-worker.log", exp.vllm.threads, exp.vllm.kv_cache_gib,
                                     exp.vllm.timeout_s)  # fmt: skip
    with stop_on_sigterm():
        for name, method in mapped.items():
            todo = [c for c in settings.concurrency if missing(rundirs[c], name, prompts)]
            groups = [[c] for c in todo] if method.fresh_engine_per_concurrency else ([todo] if todo else [])
            for group in groups:
                with VllmWorker(worker_settings) as worker:
                    load_engine(worker, exp, method, log)
                    for c in group:
                        log(f"vLLM {name}: {len(prompts)} prompts, concurrency {c}")
                        generate_all(worker, exp, engine, method, prompts, c, rundirs[c])
    for rundir in rundirs.values():
        rundir.write_summary(metrics(load_runs([rundir.path], one_shard=True)))

    # 5. the load and side-by-side tables
    from harness.serving.vllm_report import write_report

    table = write_report(out)
    return RunResult(out, table, False, 0, [])


def default_config(name: str):
    from harness.registry import METHODS

    return METHODS.get(name).config_class(name=name)


def vllm_manifest(manifest: dict, exp, concurrency: int, python: Path) -> dict:
    """The harness's manifest, naming vLLM as the engine (its version comes with the first load)."""
    return {**manifest, "engine": {"name": "vllm", "python": str(python), "concurrency": concurrency,
                                   "threads": exp.vllm.threads, "enforce_eager": exp.vllm.enforce_eager,
                                   "num_speculative_tokens": exp.vllm.num_speculative_tokens}}  # fmt: skip


def missing(rundir: RunDir, name: str, prompts: list[Prompt]) -> bool:
    have = {r.sample_id for r in rundir.records()[0] if r.method == name}
    return any(p.sample.id not in have for p in prompts)


def load_engine(worker: VllmWorker, exp, method: VllmMethod, log) -> None:
    """Load the target (and the method's drafter) in the worker; a refusal names the method and vLLM's reason."""
    try:
        reply = worker.request({
            "op": "load", "model": model_path(exp.model.path), "dtype": exp.model.dtype, "seed": exp.run.seed,
            "max_model_len": exp.vllm.max_model_len or None, "enforce_eager": exp.vllm.enforce_eager,
            "speculative_config": method.speculative_config,
        })  # fmt: skip
    except VllmError as exc:
        raise VllmError(f"vLLM refused {method.name} ({json.dumps(method.speculative_config)}): {exc}") from None
    log(f"vLLM {reply['version']} loaded {exp.model.path} for {method.name}")


def generate_all(worker: VllmWorker, exp, engine: Engine, method: VllmMethod, prompts: list[Prompt], c: int,
           rundir: RunDir) -> None:  # fmt: skip
    """An untimed warm-up, then every prompt with ``c`` in flight; records appended as they are checked."""
    settings = exp.run
    request = {"op": "generate", "concurrency": c, "max_tokens": settings.max_new_tokens,
               "stop_token_ids": sorted(engine.eos_ids)}  # fmt: skip
    worker.request({**request, "prompts": [WARMUP_PROMPT] * c, "max_tokens": settings.warmup_tokens, "stop": []})
    stops = {tuple(p.stop_strings) for p in prompts}
    if len(stops) > 1:
        raise VllmError("run.engine=vllm needs one set of stop strings for every prompt of a task")
    reply = worker.request({**request, "prompts": [p.ids for p in prompts], "stop": list(stops.pop())})
    with open(rundir.path / LOAD, "a") as f:
        f.write(json.dumps({"method": method.name, "concurrency": c, "requests": len(prompts),
                            "makespan_s": reply["wall_s"], "spec": reply["spec"]}) + "\n")  # fmt: skip
    have = {r.sample_id for r in rundir.records()[0] if r.method == method.name}
    greedy = {r.sample_id: r for r in rundir.records()[0] if r.method == "autoregressive"}
    for index, (prompt, result) in enumerate(zip(prompts, reply["results"])):
        if prompt.sample.id in have:
            continue
        spec = reply["spec"] if index == 0 else None  # the counters are the engine's: the call's change goes once
        record = to_record(exp, engine, method.name, prompt, result, c, spec)
        verdict = compare(engine, prompt.ids, prompt.reference.tokens, record.tokens, settings.tie_margin)
        own = record if method.name == "autoregressive" else greedy.get(prompt.sample.id)
        diff = first_difference(own.tokens, record.tokens) if own is not None else None
        record.extra["vs_vllm_greedy"] = EXACT if own is not None and diff is None else (
            f"{MISMATCH} at {diff}" if own is not None else "no vLLM greedy record")  # fmt: skip
        rundir.append(replace(record, **asdict(verdict)))


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
