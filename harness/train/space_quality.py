"""Quality of a SPACE fine-tune beside its base model (what ``export`` writes to quality.json).

- held-out loss / perplexity (``harness.train.lm.heldout_report``),
- mask-position figures on held-out tokens, per offset j: *accuracy* (mask j's argmax ==
  the true token) and *agreement* (== the model's own next-token argmax at that position,
  teacher-forced: what greedy verification accepts), plus the mean leading run of
  agreeing masks and the ordinary next-token top-1 accuracy,
- the share of greedy HumanEval completions that parse (``harness.zoo.quality``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from harness.train.space_batch import pack_space_batch, packed_logits


@torch.no_grad()
def mask_report(model, tokens: np.ndarray, k: int, mask_id: int, seq_len: int = 256, groups: int = 8,
                batch_size: int = 8, max_tokens: int = 0, seed: int = 0) -> dict[str, Any]:
    """Mask accuracy / agreement per offset over non-overlapping windows of ``tokens``."""
    was_training = model.training
    model.eval()
    n = len(tokens) if not max_tokens else min(len(tokens), max_tokens + 1)
    seq_len = min(seq_len, n - 1)
    if seq_len < k + 1:
        return {"groups": 0}
    starts = list(range(0, n - seq_len, seq_len))
    rng = np.random.default_rng(seed)
    correct, agree = torch.zeros(k), torch.zeros(k)
    leading, n_groups, ar_hits, ar_count = 0.0, 0, 0, 0
    for i in range(0, len(starts), batch_size):
        rows = [tokens[s : s + seq_len + 1] for s in starts[i : i + batch_size]]
        block = torch.from_numpy(np.stack(rows).astype(np.int64))
        batch = pack_space_batch(block, k, groups, 1.0, mask_id, rng)
        logits = packed_logits(model, batch)
        L, B = batch["n_real"], block.shape[0]
        ar_pred = logits[:, :L].argmax(-1)
        mask_pred = logits[:, L:].argmax(-1).view(B, groups, k)
        truth = batch["labels"][:, L:].view(B, groups, k)
        own = ar_pred.gather(1, (batch["splits"][:, :, None] + torch.arange(k)).view(B, -1)).view(B, groups, k)
        hit, same = mask_pred == truth, mask_pred == own
        correct += hit.sum((0, 1))
        agree += same.sum((0, 1))
        leading += float(same.int().cumprod(-1).sum())
        n_groups += B * groups
        ar_hits += int((ar_pred == batch["labels"][:, :L]).sum())
        ar_count += ar_pred.numel()
    if was_training:
        model.train()
    return {
        "groups": n_groups,
        "accuracy": [round(float(c) / n_groups, 4) for c in correct],
        "agreement": [round(float(a) / n_groups, 4) for a in agree],
        "mean_leading_agreement": round(leading / n_groups, 3),
        "ar_accuracy": round(ar_hits / ar_count, 4),
    }


def merge_mask_reports(parts: list[dict]) -> dict[str, Any]:
    """Group-weighted mean of per-language mask reports."""
    parts = [p for p in parts if p.get("groups")]
    total = sum(p["groups"] for p in parts)
    if not total:
        return {"groups": 0}

    def mean(key):
        return round(sum(p[key] * p["groups"] for p in parts) / total, 4)
    k = len(parts[0]["accuracy"])
    return {
        "groups": total,
        "accuracy": [round(sum(p["accuracy"][j] * p["groups"] for p in parts) / total, 4) for j in range(k)],
        "agreement": [round(sum(p["agreement"][j] * p["groups"] for p in parts) / total, 4) for j in range(k)],
        "mean_leading_agreement": mean("mean_leading_agreement"),
        "ar_accuracy": mean("ar_accuracy"),
    }


def space_quality(model, base, tokenizer, data_dir: Path, k: int, mask_id: int, cfg,
                  log: Optional[Callable[[str], None]] = None) -> dict[str, Any]:
    """Figures for the fine-tuned ``model`` and its ``base`` (``cfg``: a SpaceTrainConfig for
    seq_len, eval_tokens_per_lang, mask_groups, humaneval_limit (-1 = skip), max_new_tokens)."""
    from harness.train.lm import heldout_report  # noqa: PLC0415
    from harness.zoo import quality as Q  # noqa: PLC0415

    log = log or print
    files = sorted(Path(data_dir).glob("heldout_*.npy"))
    problems = []
    if cfg.humaneval_limit >= 0:
        problems = Q.load_humaneval()
        if cfg.humaneval_limit > 0:
            problems = problems[: cfg.humaneval_limit]
    result: dict[str, Any] = {"k": k, "mask_id": mask_id, "eval_tokens_per_lang": cfg.eval_tokens_per_lang}
    for label, m in (("base", base), ("space", model)):
        m.eval()
        r: dict[str, Any] = {"heldout": heldout_report(m, data_dir, seq_len=cfg.seq_len,
                                                       max_tokens_per_lang=cfg.eval_tokens_per_lang)}
        if mask_id < m.get_input_embeddings().weight.shape[0]:
            r["mask"] = merge_mask_reports([
                mask_report(m, np.load(f), k, mask_id, seq_len=cfg.seq_len, groups=cfg.mask_groups,
                            max_tokens=cfg.eval_tokens_per_lang) for f in files
            ])
        else:
            r["mask"] = {"groups": 0, "note": "the base model has no embedding for the mask token"}
        if problems:
            comps = Q.greedy_completions(m, tokenizer, [p["prompt"] for p in problems], cfg.max_new_tokens)
            rep = Q.completion_report(tokenizer, problems, comps)
            r["humaneval"] = {key: v for key, v in rep.items() if key not in ("texts", "parsed")}
            r["humaneval"]["max_new_tokens"] = cfg.max_new_tokens
        log(f"[space] {label}: held-out loss {r['heldout'].get('loss')}, mask agreement "
            f"{r['mask'].get('agreement')}, HumanEval parse rate {r.get('humaneval', {}).get('parse_rate')}")
        result[label] = r
    return result
