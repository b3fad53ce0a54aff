"""Training tokens/s of zoo LM shapes on the CPU (is a larger target affordable?).

    .venv/bin/python scripts/measure_train_speed.py --threads 2 --seconds 60 --out results/train-speed.json

For each shape: build it for the zoo's tokenizer, ``torch.compile`` it as the zoo build does,
run a few untimed steps (compilation, allocator warm-up), then time optimiser steps of
16 x 512 tokens from the zoo's training stream for ``--seconds``. Prints one JSON line per
shape, with the tokens/param that the measured rate reaches in ``--budget-min`` minutes;
``--out`` also stores them (with the machine and commit), and the zoo target's card quotes
that file as the reason for its size.
Needs the prepared zoo data (``harness zoo prepare``). Timings depend on the machine's load:
report them with the load average printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from harness.train.lm import TARGET, ModelConfig, TokenBlockBatches, build_model, llama_config, lm_loss
from harness.train.loop import TrainLoopConfig, make_optimizer
from harness.zoo.build import ZooDataConfig, data_paths
from harness.zoo.tokenizer import load_tokenizer

SHAPES = {
    "3.4M (zoo target)": TARGET,
    "9.1M": ModelConfig(name="target-9m", hidden_size=288, num_hidden_layers=8, num_attention_heads=6, intermediate_size=768),
}


def measure(mc: ModelConfig, tok, tokens: np.ndarray, seconds: float, warm_steps: int) -> dict:
    torch.manual_seed(0)
    model = build_model(llama_config(mc, tok))
    n_params = sum(p.numel() for p in model.parameters())
    opt = make_optimizer(list(model.parameters()), TrainLoopConfig())
    step_model = torch.compile(model)
    batches = TokenBlockBatches(tokens, 16, 512, seed=0)
    model.train()
    n_tok, steps, t0 = 0, 0, None
    while True:
        if steps == warm_steps:
            t0, n_tok = time.monotonic(), 0
        if t0 is not None and time.monotonic() - t0 >= seconds:
            break
        loss, n = lm_loss(step_model, next(batches))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps += 1
        n_tok += n
    dt = time.monotonic() - t0
    return {"params": n_params, "timed_steps": steps - warm_steps, "seconds": round(dt, 1),
            "tokens_per_s": round(n_tok / dt), "load_avg_1min": round(os.getloadavg()[0], 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--seconds", type=float, default=60.0, help="timed seconds per shape")
    ap.add_argument("--warm-steps", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--budget-min", type=float, default=120.0, help="training minutes to express the rate in tokens/param")
    ap.add_argument("--out", default="", help="also write the figures here (JSON)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = data_paths(ZooDataConfig())
    tok = load_tokenizer(paths.tokenizer)
    tokens = np.load(paths.tokens / "train.npy", mmap_mode="r")
    rows = []
    for name, mc in SHAPES.items():
        r = measure(mc, tok, tokens, args.seconds, args.warm_steps)
        r["tokens_per_param_in_budget"] = round(r["tokens_per_s"] * args.budget_min * 60 / r["params"], 1)
        rows.append({"shape": name, "threads": args.threads, "budget_min": args.budget_min, **r})
        print(json.dumps(rows[-1]), flush=True)
    if args.out:
        from harness.results import cpu_name, git_commit  # noqa: PLC0415

        record = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name(),
                  "cores": os.cpu_count(), "git": git_commit(), "batch": "16 x 512 tokens", "compiled": True,
                  "shapes": rows}  # fmt: skip
        Path(args.out).write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
