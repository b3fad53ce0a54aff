"""Drafters on the target's self-distilled data (issue 15, part 3): the padded-record losses
(distilled draft, Medusa heads) equal the rows computed alone, Medusa's data choice, the
per-position chain acceptance of a draft, and the ``draft_distill`` zoo stage end to end on a
micro zoo (exports a changed zoo/draft, leaves zoo/target's bytes alone, resumes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

from harness.train.data import PaddedBatch, RecordBatches
from harness.train.distill import distill_loss_fn
from harness.train.medusa import medusa_loss_fn, new_heads

VOCAB = 300
RECORDS = [[5, 9, 13, 40, 41, 42, 43], [7, 8, 50, 51], [11, 12, 13, 14, 60, 61, 62, 63, 64, 65], [20, 21, 22, 70, 71]]
STARTS = [3, 2, 4, 3]  # where each record's continuation begins


def _padded(pad_id: int) -> PaddedBatch:
    return next(RecordBatches(RECORDS, len(RECORDS), 64, seed=0, pad_id=pad_id, starts=STARTS))


def _alone(r: int) -> PaddedBatch:
    ids = torch.tensor([RECORDS[r]])
    gen = torch.zeros_like(ids, dtype=torch.bool)
    gen[0, STARTS[r] :] = True
    return PaddedBatch(ids, torch.ones_like(ids, dtype=torch.bool), gen)


def test_record_batches_mark_padding_and_continuations():
    b = _padded(pad_id=2)
    assert b.ids.shape == (4, 10)
    for k in range(4):  # the permutation's rows are the records, each right-padded
        row = b.ids[k][b.valid[k]].tolist()
        r = RECORDS.index(row)
        assert b.valid[k].sum() == len(row) and bool((b.ids[k][~b.valid[k]] == 2).all())
        assert b.generated[k].tolist() == [STARTS[r] <= j < len(row) for j in range(10)]


@pytest.mark.parametrize("prompt_weight", [0.0, 1.0])
def test_distill_loss_of_a_padded_batch_is_the_rows_alone(prompt_weight):
    model = tiny_model(VOCAB)
    loss_fn = distill_loss_fn(prompt_weight)
    with torch.no_grad():
        padded, n = loss_fn(model, _padded(pad_id=0))
        other_pad, _ = loss_fn(model, _padded(pad_id=77))  # what fills the padding does not matter
        rows = [loss_fn(model, _alone(r)) for r in range(len(RECORDS))]
    expect = sum(float(loss) * k for loss, k in rows) / sum(k for _, k in rows)
    assert n == sum(k for _, k in rows)
    assert n == (sum(len(r) - s for r, s in zip(RECORDS, STARTS)) if prompt_weight == 0 else sum(len(r) - 1 for r in RECORDS))
    assert float(padded) == pytest.approx(expect, rel=1e-5)
    assert float(other_pad) == pytest.approx(float(padded), rel=1e-6)


def test_medusa_loss_of_a_padded_batch_is_the_rows_alone():
    """Head i alone (one-hot weights): the padded batch's loss is the label-weighted mean of the
    rows' losses, each row computed unpadded; no label past a row's end is counted."""
    base = tiny_model(VOCAB)
    heads = new_heads(base, num_heads=3, num_layers=1)
    batch = _padded(pad_id=0)
    for i in range(3):
        loss_fn = medusa_loss_fn(base, [1.0 if j == i else 0.0 for j in range(3)])
        with torch.no_grad():
            padded, n = loss_fn(heads, batch)
            alone = [float(loss_fn(heads, torch.tensor([r]))[0]) for r in RECORDS]
        labels = [max(0, len(r) - i - 2) for r in RECORDS]  # head i at t predicts t+i+2
        assert n == sum(len(r) - 1 for r in RECORDS)
        assert float(padded) == pytest.approx(sum(a * m for a, m in zip(alone, labels)) / sum(labels), rel=1e-5)


def _tokens(tmp_path: Path) -> Path:
    data = tmp_path / "tokens"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(3, 250, 2000).astype(np.uint16))
    np.save(data / "heldout_python.npy", rng.integers(3, 250, 200).astype(np.uint16))
    return data


def test_medusa_data_choice(model_dir, tmp_path):
    from harness.train.loop import load_checkpoint
    from harness.train.medusa import MedusaTrainConfig, run_medusa_training

    tokens = _tokens(tmp_path)

    def cfg(data: str, out: str) -> MedusaTrainConfig:
        return MedusaTrainConfig(base=str(model_dir), data=data, data_dir=str(tokens),
                                 selfdistill_dir=str(tmp_path / "none"), out_dir=str(tmp_path / out / "ckpt"),
                                 batch_size=2, seq_len=16, max_steps=1, max_minutes=0, progress=False, export_at_end=False)

    logged: list[str] = []
    run_medusa_training(cfg("auto", "a"), log=logged.append)
    assert any("no self-distilled data" in s and "corpus windows instead" in s for s in logged)
    assert load_checkpoint(tmp_path / "a" / "ckpt")["extra"]["data"]["source"] == "corpus"
    with pytest.raises(FileNotFoundError, match="no self-distilled data in .*; or set data=corpus"):
        run_medusa_training(cfg("selfdistill", "b"), log=lambda s: None)
    with pytest.raises(ValueError, match="medusa data='bogus': choose auto, selfdistill or corpus"):
        run_medusa_training(cfg("bogus", "b"), log=lambda s: None)


def test_chain_acceptance_of_a_draft(tokenizer):
    from harness.zoo.quality import greedy_agreement

    target, other = tiny_model(len(tokenizer)), tiny_model(len(tokenizer), seed=1)
    prompts = ["def f(x):\n", "import os\n"]
    comps = [[int(t) for t in torch.randint(5, len(tokenizer), (9,), generator=torch.Generator().manual_seed(s))]
             for s in range(2)]
    same = greedy_agreement(target, target, tokenizer, prompts, comps, depth=3)
    assert same["chain_acceptance"] == [1.0, 1.0, 1.0] and same["mean_accepted"] == 4.0
    assert same["chain_roots"] == [18, 16, 14]
    diff = greedy_agreement(target, other, tokenizer, prompts, comps, depth=3)
    acc = diff["chain_acceptance"]
    assert acc[0] == diff["agreement"] and acc == sorted(acc, reverse=True) and acc[0] < 1.0


# ----------------------------------------------------------------------------- the zoo stage


def _sha_tree(d: Path) -> dict:
    return {str(f.relative_to(d)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(d.rglob("*")) if f.is_file()}


MICRO_ZOO = [
    "data.corpus.languages=[python]", "data.corpus.max_files_per_lang=6", "data.tokenizer.vocab_size=320",
    "draft.hidden_size=16", "draft.num_attention_heads=2", "draft.num_hidden_layers=1", "draft.intermediate_size=32",
    "target.hidden_size=32", "target.num_attention_heads=2", "target.num_hidden_layers=1", "target.intermediate_size=64",
    *(f"{job}.{kv}" for job in ("draft_train", "target_train", "target_functions_train")
      for kv in ("max_steps=2", "batch_size=2", "seq_len=32", "progress=false", "compile=false", "eval_at_end=false")),
    "export.humaneval_limit=2", "export.max_new_tokens=4", "export.healed_prompts=false",
    "selfdistill.n_prompts=6", "selfdistill.max_new_tokens=4", "selfdistill.batch_size=3",
    "selfdistill.prompt_max_tokens=24", "selfdistill.speed_prompts=0",
    "draft_distill.batch_size=2", "draft_distill.seq_len=32", "draft_distill.warmup_steps=1", "draft_distill.lr=1e-2",
    "draft_distill.progress=false",
]


def test_draft_distill_stage(tmp_path):
    from harness import cli_zoo
    from harness.train.loop import load_checkpoint

    common = [f"data.cache_dir={tmp_path / 'cache'}", f"export.zoo_dir={tmp_path / 'zoo'}", *MICRO_ZOO]
    assert cli_zoo.main(["build", "stages=[draft,target,target_functions,export,selfdistill]", *common]) == 0
    zoo = tmp_path / "zoo"
    target_before, draft_before = _sha_tree(zoo / "target"), _sha_tree(zoo / "draft")

    assert cli_zoo.main(["build", "stages=[draft_distill]", "draft_distill.max_steps=2", *common]) == 0
    assert _sha_tree(zoo / "target") == target_before  # zoo/target's bytes untouched (the heads check its sha256)
    after = _sha_tree(zoo / "draft")
    assert after["model.safetensors"] != draft_before["model.safetensors"]
    info = json.loads((zoo / "draft" / "training.json").read_text())
    assert info["step"] == 2 and info["distillation"]["data"]["source"] == "selfdistill"
    assert info["distillation"]["data"]["rows"] == 6 and info["initialized_from"]["kind"] == "checkpoint"
    q = json.loads((zoo / "draft" / "quality.json").read_text())
    agr = q["draft_target_agreement"]
    assert q["humaneval"]["problems"] == 2 and len(agr["chain_acceptance"]) == 4 and agr["positions"] > 0
    card = (zoo / "draft" / "README.md").read_text()
    assert "Distilled from the target" in card and "continuation tokens only" in card and "Per-position acceptance" in card

    # more steps: resumes from the checkpoint (not restarted: the draft and the data are the same)
    ckpt_dir = tmp_path / "cache" / "train" / "draft-distill"
    assert cli_zoo.main(["build", "stages=[draft_distill]", "draft_distill.max_steps=3", *common]) == 0
    ck = load_checkpoint(ckpt_dir)
    assert ck["step"] == 3 and [r["step"] for r in ck["runs"]] == [0, 2]
    assert json.loads((zoo / "draft" / "training.json").read_text())["step"] == 3
    assert _sha_tree(zoo / "target") == target_before
    # the draft trained further: the distillation starts again from the new weights
    assert cli_zoo.main(["build", "stages=[draft,draft_distill]", "draft_train.max_steps=3", "draft_distill.max_steps=2",
                         *common[:2], *[a for a in common[2:] if a != "draft_train.max_steps=2"]]) == 0  # fmt: skip
    ck = load_checkpoint(ckpt_dir)
    assert ck["step"] == 2 and [r["step"] for r in ck["runs"]] == [0]
