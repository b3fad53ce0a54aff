"""Re-check a run's stop sequences independently of the harness's own commit path.

    .venv/bin/python scripts/recheck_stops.py results/runs/<run>

For every record of the run directory (greedy runs), against the same prompt and the
task's stop strings (``task.stop`` or the task's default):

* plain transformers ``generate(..., stop_strings=..., tokenizer=...)`` of the run's model
  (max_new_tokens and EOS as in the run) gives the same tokens: ``equal``; or stops earlier
  on a stop string that starts in the prompt and ends in the output, which the harness's rule
  does not count (see harness/stops.py ``StopStrings``): ``seam``; anything else: ``DIFFERENT``;
* no output runs past its first stop string (full decode of the output, special tokens
  skipped as in ``Record.text``): ``past_stop`` counts the records that do (must be 0);
* ``stop_reason`` counts per method.

Exit status 1 when a record is DIFFERENT or runs past a stop.
"""

from __future__ import annotations

import argparse
import collections
import sys

import torch
from transformers import GenerationConfig

from harness.config import ModelConfig
from harness.engine import Engine
from harness.registry import TASKS
from harness.results import RunDir
from tasks.base import render_prompt


def first_stop(decode, tokens: list[int], strings) -> int | None:
    """Index of the first token whose decode (of tokens[:i+1]) contains a stop string."""
    for n in range(1, len(tokens) + 1):
        if any(s in decode(tokens[:n]) for s in strings):
            return n - 1
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run directory (manifest.json + samples.jsonl)")
    args = parser.parse_args(argv)
    rundir = RunDir(args.run)
    config = rundir.manifest()["config"]
    task_cfg = dict(config["task"])
    task = TASKS.get(task_cfg["name"])
    task = task(task.config_class(**task_cfg))
    samples = {s.id: s for s in task.samples()}
    engine = Engine.load(ModelConfig(**config["model"]))
    tok = engine.tokenizer
    decode = lambda ids: tok.decode(ids, skip_special_tokens=True)  # noqa: E731
    max_new = config["run"]["max_new_tokens"]
    eos = sorted(engine.eos_ids)

    records, _ = rundir.records()
    by_turn = collections.defaultdict(list)
    for r in records:
        by_turn[(r.sample_id, r.turn)].append(r)
    outcome, past, reasons = collections.Counter(), 0, collections.Counter()
    replies: dict[str, list[str]] = collections.defaultdict(list)
    for (sample_id, turn), group in sorted(by_turn.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        sample = samples[sample_id]
        prompt = tok(render_prompt(sample, turn, replies[sample_id], tok)).input_ids
        reference = next((r for r in group if r.method == "autoregressive"), group[0])
        replies[sample_id].append(reference.text)
        strings = list(task.stop_strings(sample))
        gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new, eos_token_id=eos or None,
                                   pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else (eos or [0])[0],
                                   stop_strings=strings or None)  # fmt: skip
        ids = torch.tensor([prompt], device=engine.device)
        with torch.inference_mode():
            plain = engine.model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gen_cfg,
                                          tokenizer=tok)[0, len(prompt) :].tolist()  # fmt: skip
        for r in group:
            reasons[(r.method, r.stop_reason)] += 1
            at = first_stop(decode, r.tokens, strings) if strings else None
            if at is not None and at != len(r.tokens) - 1:
                past += 1
                print(f"PAST STOP: {r.method} {sample_id} turn {turn}: stop at token {at} of {len(r.tokens)}")
            if r.tokens == plain:
                outcome["equal"] += 1
            elif r.tokens[: len(plain)] == plain and first_stop(decode, plain, strings) is None:
                outcome["seam"] += 1  # transformers matched across the prompt/output seam
            else:
                outcome["DIFFERENT"] += 1
                print(f"DIFFERENT: {r.method} {sample_id} turn {turn}: {len(r.tokens)} tokens vs plain {len(plain)}")
    print(f"records: {len(records)} | vs plain generate(stop_strings): {dict(outcome)} | past a stop: {past}")
    for method in dict.fromkeys(r.method for r in records):
        counts = {reason: n for (m, reason), n in sorted(reasons.items(), key=str) if m == method}
        print(f"  {method}: {counts}")
    return 1 if outcome["DIFFERENT"] or past else 0


if __name__ == "__main__":
    sys.exit(main())
