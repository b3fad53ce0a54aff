"""Sequence-level unlikelihood fine-tuning of the zoo target (a target that stops looping).

Welleck et al. 2019, *Neural Text Generation with Unlikelihood Training*, sec. 5.2: a model
trained by maximum likelihood repeats itself under greedy decoding, and next-token training
alone does not see those loops, because they only appear in the model's own continuations.
Sequence-level unlikelihood fine-tuning shows them to it. Every optimiser step:

1. **rollouts**: the current weights continue ``rollout_prompts`` corpus prompts greedily
   (``rollout_new_tokens`` at most, or to ``</s>``), in one left-padded batch
   (:func:`harness.zoo.selfdistill.generate_batch`). Prompts come from the training split only
   (function heads and file stretches, :func:`harness.zoo.selfdistill.collect_prompts`), walked
   in a seeded order;
2. **candidates**: a generated token is marked when it completes an ``ngram``-gram (4) that
   already occurred earlier in prompt + continuation (:func:`repeat_mask`);
3. **loss** ``= CE + ul_weight * UL``: ``UL`` is the sum of ``-log(1 - p(token))`` over the
   marked tokens divided by the number of generated tokens (the per-token unit of the CE; it
   shrinks as the loops disappear), computed teacher-forced on the rollout with the same weights;
   ``CE`` is the ordinary next-token loss on a corpus batch, sampled exactly as the LM trainer
   samples it (``function_share`` of the rows whole functions ending in ``</s>``, the rest the
   file-level stream), so that fine-tuning does not forget the data.

The paper alternates MLE and UL updates with probability 0.5; adding both terms to every step
with a weight is the same objective in expectation, without a random switch to checkpoint.
Rollouts are greedy because greedy decoding is what loops and what the benchmarks run.

The job runs through the generic resumable loop (:mod:`harness.train.loop`): the checkpoint
holds the weights, the optimiser, both data positions (corpus windows and prompt cursor) and
the per-step share of marked rollout tokens (the on-policy repetition, logged as it falls).
Its layout is the LM trainer's (``extra.llama_config`` etc.), so ``harness zoo export`` ships
it like any other checkpoint (``export.sources={target:target-unlikelihood}``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from harness.train.lm import LMTrainConfig, MixedBatches, TokenBlockBatches, continue_model, corpus_batches, heldout_report, lm_loss
from harness.train.loop import TrainLoopConfig, TrainResult, train


@dataclass
class UnlikelihoodTrainConfig(LMTrainConfig):
    """Loop settings, the corpus batch of the CE term (``batch_size`` x ``seq_len`` rows,
    ``function_share`` of them function samples), and the unlikelihood term. ``init_from`` is
    required (a checkpoint dir or an exported model); "" in ``harness zoo build`` = the
    ``target_functions`` stage's checkpoint."""

    # probe from the v2 target (one loaded thread): lr 1e-3 cut the loops but broke the text
    # (held-out ppl 6.4 -> 10.5 in 34 steps); 3e-4 with 4 CE rows kept it usable (-> 8.3 in 48 steps)
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 5  # linear warm-up steps
    # optimiser steps (~4 s of CPU each on one thread). Measured from the target_functions checkpoint (zoo v3):
    # over 150 steps the rollouts' repeated-4-gram share fell 0.56 -> 0.20, but the rollouts ending with </s>
    # rose from 23 to ~40 of 80 per 10 steps until step ~50 and then collapsed to 1-4 (the model stopped
    # ending functions: 0 of 20 HumanEval completions ended before 128 tokens); a 50-step cosine kept both
    # (the shipped target's figures: zoo/target/README.md)
    max_steps: int = 50
    batch_size: int = 4  # corpus rows per step for the CE term
    function_share: float = 0.5  # share of the CE rows that are function samples ending in </s>
    ul_weight: float = 1.0  # weight of the unlikelihood term against the CE term (Welleck et al.: 1)
    ngram: int = 4  # a token is penalised when it completes a repeat of an n-gram of this length
    rollout_prompts: int = 8  # prompts continued greedily per step
    rollout_new_tokens: int = 80  # longest greedy continuation of a rollout
    prompt_pool: int = 2048  # distinct training prompts drawn once (seeded), walked in a seeded order per pass
    function_prompt_share: float = 0.5  # share of the pool that are function heads (the rest: file stretches)
    prompt_min_tokens: int = 16  # shortest file-stretch prompt (tokens)
    prompt_max_tokens: int = 160  # longest prompt (tokens)


@dataclass
class RolloutBatch:
    """What one optimiser step trains on."""

    ce: torch.Tensor  # [batch_size, seq_len + 1] corpus windows for the next-token loss
    prompts: list[list[int]]  # prompt ids (with <s>) the current weights continue for the UL term


@dataclass
class Rollout:
    """Greedy continuations of a batch of prompts, right-padded, with their UL candidates."""

    ids: torch.Tensor  # [R, W] prompt + continuation, right-padded with pad ids
    generated: torch.Tensor  # [R, W] bool: position holds a generated token (</s> included)
    marked: torch.Tensor  # [R, W] bool: generated token completing a repeated n-gram
    ended: list[bool]  # per row: the continuation ended with </s>


@dataclass
class StepStats:
    """Per-step figures of the UL term (kept in the checkpoint)."""

    step: int  # optimiser step (1-based) this rollout trained
    generated: int  # generated tokens in the rollout
    marked: int  # of them, tokens completing a repeated n-gram
    ended: int  # rollouts that ended with </s>
    ce: float  # next-token loss of the corpus batch
    ul: float  # unlikelihood term (before ul_weight)


def repeat_mask(seq: list[int], start: int, n: int = 4) -> list[bool]:
    """For each position ``t >= start`` of ``seq``: whether ``seq[t-n+1 : t+1]`` (the n-gram
    that ``seq[t]`` completes) also ends at an earlier position ``t' < t`` of ``seq``
    (occurrences may overlap; the prompt ``seq[:start]`` counts as earlier text). Positions
    with fewer than ``n - 1`` tokens before them complete no n-gram and are False."""
    seen: set[tuple[int, ...]] = set()
    out: list[bool] = []
    for t in range(n - 1, len(seq)):
        gram = tuple(seq[t - n + 1 : t + 1])
        if t >= start:
            out.append(gram in seen)
        seen.add(gram)
    return [False] * (len(seq) - start - len(out)) + out


@torch.no_grad()
def make_rollout(model: torch.nn.Module, prompts: list[list[int]], pad_id: int, eos_id: int,
                 max_new_tokens: int, n: int) -> Rollout:
    """Greedy continuations of ``prompts`` by ``model`` (one batched call), laid out
    right-padded (causal attention needs no mask then, and positions start at 0 as in
    generation), with the generated tokens and the repeat candidates marked."""
    from harness.zoo.selfdistill import generate_batch  # noqa: PLC0415

    was_training = model.training
    model.eval()
    conts = generate_batch(model, prompts, pad_id, eos_id, max_new_tokens, temperature=0.0, seed=0)
    if was_training:
        model.train()
    width = max(len(p) + len(c.ids) for p, c in zip(prompts, conts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    generated = torch.zeros((len(prompts), width), dtype=torch.bool)
    marked = torch.zeros((len(prompts), width), dtype=torch.bool)
    for r, (p, c) in enumerate(zip(prompts, conts)):
        seq = p + c.ids
        ids[r, : len(seq)] = torch.tensor(seq)
        generated[r, len(p) : len(seq)] = True
        marked[r, len(p) : len(seq)] = torch.tensor(repeat_mask(seq, len(p), n), dtype=torch.bool)
    return Rollout(ids, generated, marked, [c.ended for c in conts])


def unlikelihood_loss(model: torch.nn.Module, rollout: Rollout) -> torch.Tensor:
    """``sum over marked tokens of -log(1 - p(token | prefix))``, divided by the number of
    generated tokens; teacher-forced on the rollout."""
    logits = model(input_ids=rollout.ids[:, :-1]).logits.float()
    target = rollout.ids[:, 1:]
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    p = logp.exp().clamp(max=1.0 - 1e-6)  # p -> 1 would make -log(1 - p) infinite
    penalty = -torch.log1p(-p)
    mask = rollout.marked[:, 1:]
    return (penalty * mask).sum() / rollout.generated[:, 1:].sum().clamp(min=1)


class RolloutBatches:
    """The corpus batches of the LM trainer plus, per step, the next ``rollout_prompts``
    prompts of a fixed pool, walked in a fresh seeded permutation per pass. Resumable: the
    corpus position and the prompt cursor are its state."""

    def __init__(self, ce: TokenBlockBatches | MixedBatches, pool: list[list[int]], per_step: int, seed: int = 0):
        if len(pool) < per_step:
            raise ValueError(f"only {len(pool)} rollout prompts for {per_step} per step: lower rollout_prompts "
                             "or raise prompt_pool")
        self.ce, self.pool, self.per_step, self.seed = ce, pool, per_step, seed
        self.epoch, self.cursor = 0, 0
        self._perm = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, 7919, epoch]).permutation(len(self.pool))

    def __iter__(self):
        return self

    def __next__(self) -> RolloutBatch:
        if self.cursor + self.per_step > len(self.pool):
            self.epoch += 1
            self.cursor = 0
            self._perm = self._permutation(self.epoch)
        idx = self._perm[self.cursor : self.cursor + self.per_step]
        self.cursor += self.per_step
        return RolloutBatch(next(self.ce), [self.pool[i] for i in idx])

    def state_dict(self) -> dict:
        ce = self.ce.state_dict()
        return {"ce": ce, "prompt_epoch": self.epoch, "prompt_cursor": self.cursor, "pool": len(self.pool),
                "epoch": ce["epoch"], "cursor": ce["cursor"]}  # corpus epoch/cursor: what exporters read

    def load_state_dict(self, state: dict) -> None:
        if state.get("pool") != len(self.pool):
            raise ValueError("the rollout prompt pool changed since the checkpoint (its size differs)")
        self.ce.load_state_dict(state["ce"])
        self.epoch, self.cursor = state["prompt_epoch"], state["prompt_cursor"]
        self._perm = self._permutation(self.epoch)

    @property
    def epochs_done(self) -> float:
        return self.ce.epochs_done


def make_loss_fn(cfg: UnlikelihoodTrainConfig, pad_id: int, eos_id: int, stats: list[dict]
                 ) -> Callable[[torch.nn.Module, RolloutBatch], tuple[torch.Tensor, int]]:
    """The loop's ``loss_fn``: rollout with the current weights, then CE + ul_weight * UL;
    appends one :class:`StepStats` (as a dict) to ``stats`` per call."""

    def loss_fn(model: torch.nn.Module, batch: RolloutBatch) -> tuple[torch.Tensor, int]:
        rollout = make_rollout(model, batch.prompts, pad_id, eos_id, cfg.rollout_new_tokens, cfg.ngram)
        ce, n_ce = lm_loss(model, batch.ce)
        ul = unlikelihood_loss(model, rollout)
        n_gen = int(rollout.generated.sum())
        stats.append(asdict(StepStats(len(stats) + 1, n_gen, int(rollout.marked.sum()), sum(rollout.ended),
                                      round(float(ce.detach()), 4), round(float(ul.detach()), 4))))
        return ce + cfg.ul_weight * ul, n_ce + n_gen

    return loss_fn


def rollout_prompt_pool(cfg: UnlikelihoodTrainConfig, corpus_dir: str | Path, tokenizer) -> list[list[int]]:
    """``prompt_pool`` training-split prompts (function heads and file stretches), seeded."""
    from harness.zoo.corpus import load_corpus  # noqa: PLC0415
    from harness.zoo.selfdistill import SelfDistillConfig, collect_prompts  # noqa: PLC0415

    pcfg = SelfDistillConfig(n_prompts=cfg.prompt_pool, function_prompt_share=cfg.function_prompt_share,
                             prompt_min_tokens=cfg.prompt_min_tokens, prompt_max_tokens=cfg.prompt_max_tokens,
                             seed=cfg.seed)
    return [p.ids for p in collect_prompts(load_corpus(corpus_dir)[0], tokenizer, pcfg)]


def _share(rows: list[dict], key: str, of: str) -> float | None:
    total = sum(r[of] for r in rows)
    return round(sum(r[key] for r in rows) / total, 4) if total else None


def rollout_summary(steps: list[dict], window: int = 10) -> dict:
    """How the on-policy repetition moved: the share of rollout tokens completing a repeated
    n-gram and of rollouts ending with </s>, over the first and the last ``window`` steps."""
    head, tail = steps[:window], steps[-window:]
    return {"steps": len(steps), "window": window,
            "marked_share_first": _share(head, "marked", "generated"),
            "marked_share_last": _share(tail, "marked", "generated"),
            "ended_rollouts_first": sum(r["ended"] for r in head),
            "ended_rollouts_last": sum(r["ended"] for r in tail),
            "ul_first": round(sum(r["ul"] for r in head) / max(1, len(head)), 4),
            "ul_last": round(sum(r["ul"] for r in tail) / max(1, len(tail)), 4),
            "ce_first": round(sum(r["ce"] for r in head) / max(1, len(head)), 4),
            "ce_last": round(sum(r["ce"] for r in tail) / max(1, len(tail)), 4)}


def run_unlikelihood_training(cfg: UnlikelihoodTrainConfig, paths, out_dir: str | Path, name: str = "target-unlikelihood",
                              log: Callable[[str], None] | None = None) -> tuple[TrainResult, dict]:
    """Fine-tune ``cfg.init_from`` with sequence-level unlikelihood into ``out_dir`` (or resume
    the checkpoint there); ``paths`` are the zoo's data paths (corpus, tokenizer, tokens).
    Returns the loop result and a summary (marked share of the first and last rollouts)."""
    from harness.zoo.tokenizer import load_tokenizer  # noqa: PLC0415

    log = log or (lambda s: print(s, flush=True))
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    if not cfg.ul_weight >= 0 or cfg.ngram < 1 or cfg.rollout_new_tokens < 1:
        raise ValueError(f"ul_weight={cfg.ul_weight}, ngram={cfg.ngram}, rollout_new_tokens={cfg.rollout_new_tokens}: "
                         "give ul_weight >= 0, ngram >= 1 and rollout_new_tokens >= 1")
    tok = load_tokenizer(paths.tokenizer)
    cont = continue_model(name, out_dir, cfg.init_from, len(tok), cfg.seed, log=log, missing_init=(
        "unlikelihood fine-tuning needs init_from: a checkpoint dir or an exported model dir (in `harness zoo build`: "
        "run the target_functions stage first, or set target_unlikelihood.init_from)"))  # fmt: skip
    model, config, init_info, shape = cont.model, cont.config, cont.init_info, cont.shape
    stats: list[dict] = list(cont.extra.get("unlikelihood_steps", []))
    n_params = sum(p.numel() for p in model.parameters())
    corpus = corpus_batches(paths.tokens, cfg.batch_size, cfg.seq_len, cfg.function_share, cfg.seed)
    ce = corpus.batches
    batches = RolloutBatches(ce, rollout_prompt_pool(cfg, paths.corpus, tok), cfg.rollout_prompts, seed=cfg.seed)
    ul_settings = {k: getattr(cfg, k) for k in ("ul_weight", "ngram", "rollout_prompts", "rollout_new_tokens",
                                                "prompt_pool", "function_prompt_share", "prompt_min_tokens",
                                                "prompt_max_tokens")}
    extra: dict[str, Any] = {
        "llama_config": config.to_dict(), "model": asdict(shape), "n_params": n_params,
        "data_dir": str(paths.tokens), "tokenizer_dir": str(paths.tokenizer), "batch_size": cfg.batch_size,
        "seq_len": cfg.seq_len, "train_stream_tokens": corpus.stream_tokens, "function_share": cfg.function_share,
        "function_stream_tokens": corpus.function_tokens, "init": init_info,
        "unlikelihood": ul_settings, "unlikelihood_steps": stats,  # the list grows as training runs
    }
    loop = TrainLoopConfig(**{k: getattr(cfg, k) for k in TrainLoopConfig.__dataclass_fields__})
    log(f"[train {name}] {n_params / 1e6:.2f}M parameters, CE {cfg.batch_size}x{cfg.seq_len} + UL on "
        f"{cfg.rollout_prompts} greedy rollouts of {cfg.rollout_new_tokens} tokens per step, out_dir {out_dir}")
    loss_fn = make_loss_fn(cfg, tok.pad_token_id, tok.eos_token_id, stats)
    result = train(model, loss_fn, batches, loop, out_dir, extra_state=extra, desc=f"train {name}", log=log)
    summary: dict[str, Any] = {"step": result.step, "tokens": result.tokens, "elapsed_min": round(result.elapsed_s / 60, 2),
                               "finished": result.finished, "rollouts": rollout_summary(stats)}
    if cfg.eval_at_end and result.finished:
        rep = heldout_report(model, paths.tokens, seq_len=cfg.seq_len)
        summary["heldout"] = rep
        (Path(out_dir) / "heldout.json").write_text(json.dumps({"step": result.step, **rep}, indent=1))
        log(f"[train {name}] held-out loss {rep.get('loss')} (ppl {rep.get('ppl')})")
    return result, summary
