"""A generic, resumable training loop.

The caller supplies what differs between jobs:

- ``module``: the ``nn.Module`` whose trainable parameters (``requires_grad``) are optimised
  and whose ``state_dict`` is checkpointed (a whole LM, or only Medusa heads over a frozen
  base held elsewhere);
- ``loss_fn(module, batch) -> (loss, n_tokens)``: a scalar loss on one batch and how many
  tokens it covered (for tokens/s);
- ``batches``: an iterator of batches that can report and restore its position
  (``state_dict()`` / ``load_state_dict()``), see :class:`ResumableBatches`.

The loop gives: seeding, AdamW, linear warm-up then cosine decay, gradient clipping, a progress
bar with loss and tokens/s (``harness.progress``), and a checkpoint (module, optimiser, step, RNG states, data
position, elapsed time) written atomically every ``checkpoint_minutes`` and at the end.
Calling :func:`train` again with the same ``out_dir`` continues from that checkpoint; a
``kill -9`` loses at most one checkpoint interval. SIGTERM/SIGINT save and stop cleanly.

Length of training (``schedule``):

- ``steps`` (the default when ``max_steps > 0``): the cosine runs over ``max_steps``
  optimiser steps; bitwise reproducible, also across resumes. With ``max_steps = 0`` and
  ``schedule=steps``, the loop times its first ``plan_calibration_steps`` steps and fixes
  ``planned_steps`` (stored in the checkpoint) so the schedule should end with the budget.
- ``time`` (the default when ``max_steps = 0``): after the step-based warm-up, the cosine
  runs over the wall-clock budget ``max_minutes`` (elapsed time summed over resumed runs),
  so it ends exactly when the budget does even if a shared machine slows down or speeds
  up; ``planned_steps`` is then only a running estimate for the progress bar.

``max_minutes`` is always also a hard stop.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch

from harness.progress import Progress

CHECKPOINT_NAME = "checkpoint.pt"
STATE_NAME = "train_state.json"


@dataclass
class TrainLoopConfig:
    """Optimisation and bookkeeping settings of the generic loop."""

    lr: float = 2e-3  # peak learning rate
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine floor)
    warmup_steps: int = 50  # linear warm-up steps
    weight_decay: float = 0.1  # AdamW weight decay (matrices only; norms/biases get none)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.95  # AdamW beta2
    grad_clip: float = 1.0  # max global grad norm (0 = off)
    max_steps: int = 0  # planned optimiser steps; 0 = train for max_minutes
    schedule: str = "auto"  # steps | time | auto (= steps if max_steps > 0 else time); see module doc
    max_minutes: float = 0.0  # wall-clock budget over all resumed runs (0 = none); also a hard stop
    plan_calibration_steps: int = 10  # schedule=steps without max_steps: steps timed to plan the budget
    plan_safety: float = 0.95  # fraction of the remaining budget the plan may use
    checkpoint_minutes: float = 5.0  # write a checkpoint this often (and at the end)
    seed: int = 0  # seeds python, numpy and torch at the first start
    threads: int = 0  # torch.set_num_threads (0 = leave as is)
    compile: bool = False  # torch.compile the module for the training steps (checkpoints stay plain)
    progress: bool = True  # show a progress bar (harness.progress: never when stderr is not a terminal)


class ResumableBatches(Protocol):
    """What the loop needs from a batch source."""

    def __next__(self) -> Any: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    """Where a call to :func:`train` stopped."""

    step: int
    planned_steps: int
    tokens: int
    elapsed_s: float
    last_loss: float
    finished: bool  # reached planned steps or the time budget (not interrupted)
    resumed_from: int  # step the run started at (0 = fresh)
    history: list = field(default_factory=list)  # (step, loss, elapsed_s, tokens) samples

    def summary(self, epochs: float) -> dict[str, Any]:
        """What a trainer prints when it stops (``epochs``: of its data, from the batches)."""
        return {"step": self.step, "tokens": self.tokens, "epochs": round(epochs, 3),
                "elapsed_min": round(self.elapsed_s / 60, 2), "finished": self.finished, "last_loss": self.last_loss}  # fmt: skip


def lr_multiplier(step: int, warmup: int, planned: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to ``min_ratio`` at ``planned`` steps."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if planned <= 0:  # not planned yet (still calibrating): hold the peak
        return 1.0
    span = max(1, planned - warmup)
    t = min(1.0, max(0.0, (step - warmup) / span))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def time_lr_multiplier(step: int, warmup: int, elapsed_s: float, warmup_end_s: float | None,
                       budget_s: float, min_ratio: float) -> float:
    """Linear warm-up over steps, then cosine over the remaining wall-clock budget."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    start = warmup_end_s or 0.0
    t = min(1.0, max(0.0, (elapsed_s - start) / max(1e-9, budget_s - start)))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainLoopConfig) -> torch.optim.AdamW:
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(out_dir: str | os.PathLike) -> dict | None:
    """The latest checkpoint in ``out_dir`` (or None)."""
    p = Path(out_dir) / CHECKPOINT_NAME
    if not p.exists():
        return None
    return torch.load(p, map_location="cpu", weights_only=False)


def require_checkpoint(out_dir: str | os.PathLike, what: str) -> dict:
    """The checkpoint in ``out_dir`` (an export needs one); FileNotFoundError naming the fix otherwise."""
    ckpt = load_checkpoint(out_dir)
    if ckpt is None:
        raise FileNotFoundError(f"no {what} checkpoint in {out_dir}: run the training first")
    return ckpt


def run_record(ckpt: dict) -> dict[str, Any]:
    """What an exported component's training.json says of the run behind a checkpoint: steps,
    tokens, minutes, the batch shape (from its extra state), the loss at export and the loop settings."""
    extra = ckpt.get("extra", {})
    return {
        "step": ckpt["step"],
        "planned_steps": ckpt["planned_steps"],
        "training_tokens": ckpt["tokens"],
        "wall_time_min": round(ckpt["elapsed_s"] / 60, 1),
        "batch_size": extra.get("batch_size"),
        "seq_len": extra.get("seq_len"),
        "loss_ema_at_export": ckpt.get("loss_ema"),
        "loop_config": ckpt.get("loop_config"),
    }


def train(
    module: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, int]],
    batches: ResumableBatches,
    cfg: TrainLoopConfig,
    out_dir: str | os.PathLike,
    *,
    extra_state: dict | None = None,
    desc: str = "train",
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train ``module`` until the plan or the budget ends; resume from ``out_dir`` if possible.

    ``extra_state`` is stored in every checkpoint (e.g. the model config) for exporters.
    """
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)

    params = [p for p in module.parameters() if p.requires_grad]
    if not params:
        raise ValueError("module has no trainable parameters")
    opt = make_optimizer(params, cfg)

    mode = cfg.schedule if cfg.schedule != "auto" else ("steps" if cfg.max_steps > 0 else "time")
    if mode not in ("steps", "time"):
        raise ValueError(f"train.schedule must be steps, time or auto, not {cfg.schedule!r}")
    budget_s = cfg.max_minutes * 60.0 if cfg.max_minutes > 0 else math.inf
    if mode == "time" and not math.isfinite(budget_s):
        raise ValueError("schedule=time needs train.max_minutes > 0")
    ckpt = load_checkpoint(out)
    step, tokens, elapsed_prev = 0, 0, 0.0
    planned = cfg.max_steps if cfg.max_steps > 0 else 0
    warmup_end_s: float | None = None
    history: list = []
    runs: list = []  # one entry per start/resume: where it started and with which budget
    if ckpt is not None:
        module.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        _set_rng_state(ckpt["rng"])
        batches.load_state_dict(ckpt["data"])
        step, tokens, elapsed_prev = ckpt["step"], ckpt["tokens"], ckpt["elapsed_s"]
        planned = ckpt["planned_steps"] if cfg.max_steps <= 0 else cfg.max_steps
        history = list(ckpt.get("history", []))
        runs = list(ckpt.get("runs", []))
        warmup_end_s = ckpt.get("warmup_end_s")
        if warmup_end_s is None and step >= cfg.warmup_steps > 0:
            # a checkpoint from before this field existed: assume a steady pace
            warmup_end_s = ckpt["elapsed_s"] * cfg.warmup_steps / max(1, step)
        log(f"[{desc}] resumed from {out / CHECKPOINT_NAME} at step {step} "
            f"({tokens:,} tokens, {elapsed_prev / 60:.1f} min so far)")
    else:
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        torch.manual_seed(cfg.seed)
    resumed_from = step
    runs.append({"started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "step": step,
                 "elapsed_s": round(elapsed_prev, 1), "schedule": mode, "max_minutes": cfg.max_minutes,
                 "max_steps": cfg.max_steps, "lr": cfg.lr, "threads": cfg.threads})
    if planned <= 0 and not math.isfinite(budget_s):
        raise ValueError("set train.max_steps or train.max_minutes")

    stop_signal: list[int] = []

    def _on_signal(signum, _frame):
        stop_signal.append(signum)

    old_handlers = {}
    for s in (signal.SIGTERM, signal.SIGINT):
        try:
            old_handlers[s] = signal.signal(s, _on_signal)
        except ValueError:  # not in the main thread
            pass

    t_start = time.monotonic()
    last_ckpt = t_start
    calib_t0: float | None = None
    calib_n = 0
    loss_ema: float | None = ckpt.get("loss_ema") if ckpt is not None else None
    ckpt = None  # free the loaded tensors
    last_loss = float("nan")
    win_tokens, win_t0 = 0, time.monotonic()
    tok_s = 0.0

    def elapsed() -> float:
        return elapsed_prev + (time.monotonic() - t_start)

    def save(reason: str) -> None:
        state = {
            "model": module.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "planned_steps": planned,
            "schedule": mode,
            "budget_s": budget_s if math.isfinite(budget_s) else None,
            "warmup_end_s": warmup_end_s,
            "finished": finished,
            "tokens": tokens,
            "elapsed_s": elapsed(),
            "rng": _rng_state(),
            "data": batches.state_dict(),
            "loss_ema": loss_ema,
            "history": history,
            "runs": runs,
            "loop_config": asdict(cfg),
            "extra": extra_state or {},
        }
        atomic_torch_save(state, out / CHECKPOINT_NAME)
        summary = {k: state[k] for k in ("step", "planned_steps", "tokens", "elapsed_s", "loss_ema")}
        summary["reason"] = reason
        summary["time"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        tmp = out / (STATE_NAME + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, out / STATE_NAME)
        log(f"[{desc}] checkpoint ({reason}) at step {step}, loss~{loss_ema if loss_ema is None else round(loss_ema, 4)}, "
            f"{tokens:,} tokens, {elapsed() / 60:.1f} min")

    finished = False
    module.train()
    step_module = torch.compile(module) if cfg.compile else module  # shares the parameters
    bar = Progress(planned, desc, "step", initial=step, enabled=cfg.progress)
    try:
        while True:
            if mode == "steps" and planned > 0 and step >= planned:
                finished = True
                break
            if elapsed() >= budget_s:
                finished = True
                log(f"[{desc}] time budget of {cfg.max_minutes} min reached at step {step}")
                break
            if stop_signal:
                log(f"[{desc}] signal {stop_signal[0]}: saving and stopping at step {step}")
                break
            if mode == "time":
                mult = time_lr_multiplier(step, cfg.warmup_steps, elapsed(), warmup_end_s, budget_s, cfg.min_lr_ratio)
            else:
                mult = lr_multiplier(step, cfg.warmup_steps, planned, cfg.min_lr_ratio)
            for g in opt.param_groups:
                g["lr"] = cfg.lr * mult
            batch = next(batches)
            loss, n_tok = loss_fn(step_module, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            tokens += int(n_tok)
            if warmup_end_s is None and step >= cfg.warmup_steps:
                warmup_end_s = elapsed()
            last_loss = float(loss.detach())
            loss_ema = last_loss if loss_ema is None else 0.95 * loss_ema + 0.05 * last_loss
            win_tokens += int(n_tok)
            now = time.monotonic()
            if now - win_t0 >= 5.0:
                tok_s = win_tokens / (now - win_t0)
                win_tokens, win_t0 = 0, now
                history.append((step, round(loss_ema, 4), round(elapsed(), 1), tokens))
                if mode == "time" and history and len(history) >= 2:
                    # running estimate of where the budget ends, for the progress bar only
                    (s0, _, e0, _), (s1, _, e1, _) = history[max(0, len(history) - 12)], history[-1]
                    if s1 > s0 and e1 > e0:
                        planned = s1 + int(max(0.0, budget_s - e1) * (s1 - s0) / (e1 - e0))
                        bar.set_total(planned)
            # turn the time budget into a planned number of steps (once, after calibration)
            if planned <= 0 and mode == "steps":
                if calib_t0 is None:
                    calib_t0 = now  # skip the first step (warm-up of allocators etc.)
                else:
                    calib_n += 1
                    if calib_n >= cfg.plan_calibration_steps:
                        sec_per_step = (now - calib_t0) / calib_n
                        remaining = max(0.0, budget_s - elapsed()) * cfg.plan_safety
                        planned = step + max(1, int(remaining / sec_per_step))
                        log(f"[{desc}] {sec_per_step:.2f} s/step: planning {planned} steps "
                            f"for the {cfg.max_minutes} min budget")
                        bar.set_total(planned)
            bar.item(f"loss {loss_ema:.3f}, {tok_s:,.0f} tok/s, lr {cfg.lr * mult:.2e}")
            bar.advance()
            if now - last_ckpt >= cfg.checkpoint_minutes * 60.0:
                save("interval")
                last_ckpt = time.monotonic()
    finally:
        bar.close([f"loss (EMA) {loss_ema if loss_ema is None else round(loss_ema, 4)}, {tokens:,} tokens, "
                   + ("finished" if finished else "stopped before the plan's end: run again to resume")])
        for s, h in old_handlers.items():
            signal.signal(s, h)
    save("end" if finished else "stopped")
    return TrainResult(step, planned, tokens, elapsed(), last_loss, finished, resumed_from, history)
