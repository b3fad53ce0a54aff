"""vLLM's side of the process boundary: run with .venv-vllm's python, stdlib + vllm only.

    .venv-vllm/bin/python -P harness/serving/vllm_worker.py

It reads one JSON request per line on stdin and answers one JSON line each on the
descriptor it was handed as stdout (vLLM's own prints go to stderr, the log):

    {"op": "load", "model": ..., "speculative_config": {...} | null, ...}   -> {"ok": true, "version": ...}
    {"op": "generate", "prompts": [[ids]...], "concurrency": c, ...}       -> {"ok": true, "results": [...], ...}
    {"op": "quit"}
    any failure                                                            -> {"error": "<one line>"}

`generate` keeps `concurrency` requests in flight (a new one enters as soon as one ends) and
steps vLLM's engine itself, so every token's arrival is timed here; it also returns the
change of vLLM's spec-decode counters over the call. The harness owns this process: it
starts it in a process group of its own and stops the group; the worker also dies with
the harness (the kernel's parent-death signal) and when its stdin closes.
"""

import ctypes
import json
import os
import signal
import sys
import time
import traceback

PR_SET_PDEATHSIG = 1  # prctl option: the signal this process gets when its parent dies
SPEC_COUNTERS = {  # vLLM metric name -> the key it is returned under
    "vllm:spec_decode_num_drafts": "drafts",
    "vllm:spec_decode_num_draft_tokens": "draft_tokens",
    "vllm:spec_decode_num_accepted_tokens": "accepted_tokens",
}
SPEC_PER_POSITION = "vllm:spec_decode_num_accepted_tokens_per_pos"


def stop_group(signum, frame):
    """Take the whole process group (vLLM's engine core included) down with this process."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.killpg(os.getpgrp(), signal.SIGTERM)


def die_with_parent():
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    signal.signal(signal.SIGTERM, stop_group)


def counters(llm):
    """vLLM's spec-decode counters now: totals, and accepted tokens per draft position."""
    out = {key: 0 for key in SPEC_COUNTERS.values()}
    out["accepted_per_position"] = []
    for metric in llm.get_metrics():
        if metric.name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[metric.name]] += metric.value
        elif metric.name == SPEC_PER_POSITION:
            values = list(metric.values)
            old = out["accepted_per_position"]
            out["accepted_per_position"] = [a + b for a, b in zip(values, old + [0] * len(values))]
    return out


def counter_change(before, after):
    change = {key: after[key] - before[key] for key in SPEC_COUNTERS.values()}
    old = before["accepted_per_position"] + [0] * len(after["accepted_per_position"])
    change["accepted_per_position"] = [a - b for a, b in zip(after["accepted_per_position"], old)]
    return change


def load(request):
    from vllm import LLM

    llm = LLM(
        model=request["model"],
        tokenizer=request["model"],
        dtype=request["dtype"],
        max_model_len=request["max_model_len"],
        enforce_eager=request["enforce_eager"],
        seed=request["seed"],
        gpu_memory_utilization=request["gpu_memory_utilization"],  # two engines share a GPU (CPU: unused)
        speculative_config=request["speculative_config"],
        enable_prefix_caching=False,  # every prompt is prefilled in full, as in the harness's own runs
        disable_log_stats=False,  # the spec-decode counters
    )
    return llm


def generate(llm, request):
    """Every prompt, `concurrency` at a time; the tokens of each and when they arrived."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        temperature=0.0,
        max_tokens=request["max_tokens"],
        stop_token_ids=request["stop_token_ids"],
        stop=request["stop"] or None,
        include_stop_str_in_output=True,
        output_kind=RequestOutputKind.DELTA,  # each step returns the tokens it added
    )
    engine = llm.llm_engine
    waiting = list(enumerate(request["prompts"]))[::-1]
    results = {}
    before = counters(llm)
    start = time.perf_counter()
    while waiting or engine.has_unfinished_requests():
        # 1. fill the free slots with the next prompts
        running = sum(1 for r in results.values() if not r["finished"])
        while waiting and running < request["concurrency"]:
            index, ids = waiting.pop()
            engine.add_request(str(index), {"prompt_token_ids": ids}, params)
            results[str(index)] = {"tokens": [], "submitted": time.perf_counter() - start, "arrivals": [],
                                   "chunks": [], "finished": False, "finish_reason": None}
            running += 1
        # 2. one engine step: every running request gets its next token(s)
        outputs = engine.step()
        now = time.perf_counter() - start
        # 3. note what arrived, and when
        for out in outputs:
            r = results[out.request_id]
            new = list(out.outputs[0].token_ids) if out.outputs else []
            if new:
                r["tokens"] += new
                r["arrivals"].append(now)
                r["chunks"].append(len(new))
            if out.finished:
                r["finished"] = True
                r["finish_reason"] = out.outputs[0].finish_reason if out.outputs else None
    wall = time.perf_counter() - start
    ordered = [results[str(i)] for i in range(len(request["prompts"]))]
    return {"ok": True, "results": ordered, "wall_s": wall, "spec": counter_change(before, counters(llm))}


def reason(exc):
    """The line of an exception that says why (pydantic's validation errors end in a link, not the reason)."""
    lines = [x.strip() for x in str(exc).splitlines() if x.strip() and not x.strip().startswith("For further")]
    return lines[-1] if lines else ""


def main():
    reply_fd = os.dup(1)
    os.dup2(2, 1)  # vLLM's prints join its log on stderr; replies go to the saved descriptor only
    replies = os.fdopen(reply_fd, "w", buffering=1)
    die_with_parent()
    llm = None
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "quit":
                break
            if request["op"] == "load":
                import vllm

                llm = load(request)
                reply = {"ok": True, "version": vllm.__version__}
            elif request["op"] == "generate":
                reply = generate(llm, request)
            else:
                reply = {"error": f"unknown op {request['op']!r}"}
        except Exception as exc:  # noqa: BLE001 - every failure goes back as one line
            traceback.print_exc()  # the whole story stays in the log
            reply = {"error": f"{type(exc).__name__}: {reason(exc)}"}
        replies.write(json.dumps(reply) + "\n")
    # stdin closed (the harness is gone) or quit: the engine core goes with this process
    stop_group(None, None)


if __name__ == "__main__":
    main()
