"""Drafters on the target's self-distilled data: the padded-record losses
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


def test_length_grouped_batches_visit_every_record_once_with_less_padding():
    rng = np.random.default_rng(3)
    records = [[k] + list(range(3, 3 + int(n))) for k, n in enumerate(rng.integers(3, 200, 203))]  # 12 x 16 + 11
    plain = RecordBatches(records, 16, 512, seed=1)
    grouped = RecordBatches(records, 16, 512, seed=1, group_by_length=True)
    for epoch in range(2):
        perm = grouped._permutation(epoch)
        assert sorted(perm.tolist()) == list(range(len(records)))  # a permutation: each record once an epoch
    padding = {}
    for name, b in (("plain", plain), ("grouped", grouped)):
        seen, pads = [], 0
        for _ in range(12):  # the full batches of epoch 0
            batch = next(b)
            seen += batch.ids[:, 0].tolist()
            pads += int((~batch.valid).sum())
        assert b.epoch == 0 and len(set(seen)) == 12 * 16
        padding[name] = pads
    assert padding["grouped"] < padding["plain"] / 3
    next(grouped)  # the short batch does not fit: the next epoch starts, resumable as before
    assert (grouped.epoch, grouped.cursor) == (1, 16)
    again = RecordBatches(records, 16, 512, seed=1, group_by_length=True)
    again.load_state_dict(grouped.state_dict())
    assert torch.equal(next(again).ids, next(grouped).ids)


def test_kl_distill_loss_is_the_forward_kl_to_the_teacher():
    """KL loss: 0 when the teacher is the model; else sum_v p_t log(p_t / p_d) averaged over the
    counted positions, as computed by hand for one unpadded row."""
    model, teacher = tiny_model(VOCAB), tiny_model(VOCAB, seed=1)
    batch = _alone(2)
    with torch.no_grad():
        same, n = distill_loss_fn(1.0, tiny_model(VOCAB), "kl")(model, batch)
        kl, n_kl = distill_loss_fn(1.0, teacher, "kl")(model, batch)
        ids = batch.ids[:, :-1]
        p_t = torch.softmax(teacher(input_ids=ids).logits.float(), -1)
        p_d = torch.softmax(model(input_ids=ids).logits.float(), -1)
        by_hand = (p_t * (p_t.log() - p_d.log())).sum(-1).mean()
        cont_only, n_cont = distill_loss_fn(0.0, teacher, "kl")(model, batch)
        by_hand_cont = (p_t * (p_t.log() - p_d.log())).sum(-1)[0, STARTS[2] - 1 :].mean()
        top1, _ = distill_loss_fn(1.0, teacher, "top1")(model, batch)
        by_hand_top1 = -p_d.log()[0].gather(-1, p_t[0].argmax(-1, keepdim=True)).mean()
    assert float(same) == pytest.approx(0.0, abs=1e-6) and n == n_kl == len(RECORDS[2]) - 1
    assert float(kl) == pytest.approx(float(by_hand), rel=1e-5) and float(kl) > 0.01
    assert n_cont == len(RECORDS[2]) - STARTS[2] and float(cont_only) == pytest.approx(float(by_hand_cont), rel=1e-5)
    assert float(top1) == pytest.approx(float(by_hand_top1), rel=1e-5)
    with pytest.raises(ValueError, match="loss='kl' needs teacher"):
        distill_loss_fn(1.0, None, "kl")
    with pytest.raises(ValueError, match="choose ce, kl or top1"):
        distill_loss_fn(1.0, teacher, "js")


@pytest.mark.parametrize("kind", ["ce", "kl", "top1"])
@pytest.mark.parametrize("prompt_weight", [0.0, 1.0])
def test_distill_loss_of_a_padded_batch_is_the_rows_alone(prompt_weight, kind):
    model = tiny_model(VOCAB)
    loss_fn = distill_loss_fn(prompt_weight, tiny_model(VOCAB, seed=1) if kind != "ce" else None, kind)
    with torch.no_grad():
        padded, n = loss_fn(model, _padded(pad_id=0))
        other_pad, _ = loss_fn(model, _padded(pad_id=77))  # what fills the padding does not matter
        rows = [loss_fn(model, _alone(r)) for r in range(len(RECORDS))]
    expect = sum(float(loss) * k for loss, k in rows) / sum(k for _, k in rows)
    assert n == sum(k for _, k in rows)
    assert n == (sum(len(r) - s for r, s in zip(RECORDS, STARTS)) if prompt_weight == 0 else sum(len(r) - 1 for r in RECORDS))
    assert float(padded) == pytest.approx(expect, rel=1e-5)
    assert float(other_pad) == pytest.approx(float(padded), rel=1e-6)


@pytest.mark.parametrize("kind", ["ce", "kl", "top1"])
@pytest.mark.parametrize("continuation_only", [False, True])
def test_medusa_loss_of_a_padded_batch_is_the_rows_alone(kind, continuation_only):
    """Head i alone (one-hot weights): the padded batch's loss is the label-weighted mean of the
    rows' losses, each row computed unpadded; no label past a row's end is counted, and with
    ``continuation_only`` none whose tokens from t+1 on are not all the continuation's."""
    base = tiny_model(VOCAB)
    heads = new_heads(base, num_heads=3, num_layers=1)
    batch = _padded(pad_id=0)
    for i in range(3):
        loss_fn = medusa_loss_fn(base, [1.0 if j == i else 0.0 for j in range(3)], kind, continuation_only)
        with torch.no_grad():
            padded, n = loss_fn(heads, batch)
            alone = [float(loss_fn(heads, _alone(r))[0]) for r in range(len(RECORDS))]
        if continuation_only:  # t >= start - 1 (token t+1 generated) and t+i+2 inside the row
            labels = [max(0, len(r) - s - i - 1) for r, s in zip(RECORDS, STARTS)]
        else:  # head i at t predicts t+i+2
            labels = [max(0, len(r) - i - 2) for r in RECORDS]
        assert n == sum(len(r) - 1 for r in RECORDS)
        got = [a * m for a, m in zip(alone, labels) if m]  # a row without a label adds nothing (its loss is 0)
        assert float(padded) == pytest.approx(sum(got) / sum(labels), rel=1e-5)
        if continuation_only and i == 2:  # row 1 (2 continuation tokens) has no label for head 2
            assert labels[1] == 0 and alone[1] == 0.0


def test_medusa_kl_loss_is_the_bases_distribution_at_the_shifted_place():
    """Head i at t against the base's own distribution at t+i+1 (which predicts token t+i+2): by
    hand for one row; a head that is the base's LM head scores KL 0 as head 0 only where it sees
    the same hidden state, so it must not here (t vs t+1)."""
    from harness.train.medusa import base_hidden

    base = tiny_model(VOCAB)
    heads = new_heads(base, num_heads=2, num_layers=1)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.05 * torch.randn_like(p))
        row = torch.tensor([RECORDS[2]])
        h = base_hidden(base, row[:, :-1])
        logp = torch.log_softmax(base.get_output_embeddings()(h).float(), -1)[0]
        for i in range(2):
            got, _ = medusa_loss_fn(base, [1.0 if j == i else 0.0 for j in range(2)], "kl")(heads, row)
            n = row.shape[1] - 1 - i - 1
            q = torch.log_softmax(heads[i](h[0, :n]).float(), -1)
            by_hand = (logp[i + 1 : i + 1 + n].exp() * (logp[i + 1 : i + 1 + n] - q)).sum(-1).mean()
            wrong_place = (logp[:n].exp() * (logp[:n] - q)).sum(-1).mean()
            assert float(got) == pytest.approx(float(by_hand), rel=1e-5)
            assert abs(float(got) - float(wrong_place)) > 1e-3
            top1, _ = medusa_loss_fn(base, [1.0 if j == i else 0.0 for j in range(2)], "top1")(heads, row)
            greedy = logp[i + 1 : i + 1 + n].argmax(-1, keepdim=True)
            assert float(top1) == pytest.approx(float(-q.gather(-1, greedy).mean()), rel=1e-5)
    with pytest.raises(ValueError, match="medusa loss='mse': choose ce, kl or top1"):
        medusa_loss_fn(base, [1.0, 1.0], "mse")


def _tokens(tmp_path: Path) -> Path:
    data = tmp_path / "tokens"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(3, 250, 2000).astype(np.uint16))
    np.save(data / "heldout_python.npy", rng.integers(3, 250, 200).astype(np.uint16))
    return data


def test_greedy_only_records(tmp_path):
    from harness.train.data import load_records
    from harness.zoo.selfdistill import MANIFEST

    recs = [{"index": k, "prompt_ids": [5, 6, 7], "ids": [8 + k, 9, 10], "temperature": t}
            for k, t in enumerate([0.0, 0.7, 1.0, 0.0, 0.7, 1.0])]
    (tmp_path / "shard-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    (tmp_path / MANIFEST).write_text(json.dumps({"shards": {"shard-0.jsonl": {}}}))
    assert len(load_records(tmp_path, 2, 32, 0).records) == 6
    greedy = load_records(tmp_path, 2, 32, 0, greedy_only=True)
    assert sorted(r[3] for r in greedy.records) == [8, 11] and greedy.starts == [3, 3]


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
    corpus_greedy = cfg("corpus", "c")
    corpus_greedy.greedy_only = True
    with pytest.raises(ValueError, match="greedy_only=true needs self-distilled records of this base"):
        run_medusa_training(corpus_greedy, log=lambda s: None)


def test_medusa_init_from_heads_or_a_checkpoint(model_dir, tmp_path):
    """``init_from``: exported heads or a training checkpoint start the heads; another shape is refused."""
    from harness.drafters.medusa import save_heads
    from harness.train.loop import load_checkpoint
    from harness.train.medusa import MedusaTrainConfig, initial_heads, run_medusa_training

    tokens = _tokens(tmp_path)
    base = tiny_model(VOCAB)
    heads = new_heads(base, num_heads=2, num_layers=1)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(0.1)
    save_heads(heads, tmp_path / "exported", dtype=torch.float32)

    def cfg(num_heads: int = 2, **kw) -> MedusaTrainConfig:
        return MedusaTrainConfig(base=str(model_dir), data="corpus", data_dir=str(tokens), num_heads=num_heads,
                                 batch_size=2, seq_len=16, max_steps=1, max_minutes=0, progress=False,
                                 export_at_end=False, **kw)  # fmt: skip

    state = initial_heads(cfg(init_from=str(tmp_path / "exported")), heads.config)
    assert all(torch.equal(state[k], v) for k, v in heads.state_dict().items())
    run_medusa_training(cfg(init_from=str(tmp_path / "exported"), out_dir=str(tmp_path / "a")), log=lambda s: None)
    from_ckpt = initial_heads(cfg(init_from=str(tmp_path / "a")), heads.config)
    assert all(torch.equal(from_ckpt[k], v) for k, v in load_checkpoint(tmp_path / "a")["model"].items())
    with pytest.raises(ValueError, match="holds 2 heads x 1 layers .* the config asks for 3 x 1"):
        run_medusa_training(cfg(3, init_from=str(tmp_path / "exported"), out_dir=str(tmp_path / "b")), log=lambda s: None)


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
    "export.execute_isolation=weak",  # the sandbox is not what this tests: whatever isolation the machine has
    "selfdistill.n_prompts=6", "selfdistill.max_new_tokens=4", "selfdistill.batch_size=3",
    "selfdistill.prompt_max_tokens=24", "selfdistill.speed_prompts=0",
    "draft_distill.batch_size=2", "draft_distill.seq_len=32", "draft_distill.warmup_steps=1", "draft_distill.lr=1e-2",
    "draft_distill.progress=false", "draft_top1.batch_size=2", "draft_top1.seq_len=32", "draft_top1.warmup_steps=1",
    "draft_top1.progress=false", "draft_top1.max_minutes=0",
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
    assert "(zoo v3, `draft_distill`)" in card

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

    # the second phase: CE against the target's argmax, from the draft_distill checkpoint, exported as zoo/draft
    phase1 = _sha_tree(zoo / "draft")["model.safetensors"]
    assert cli_zoo.main(["build", "stages=[draft_top1]", "draft_top1.max_steps=2", *common]) == 0
    info = json.loads((zoo / "draft" / "training.json").read_text())
    assert info["distillation"]["loss"] == "top1" and info["step"] == 2
    assert info["distillation"]["method"].startswith("token-level KD: CE against the target's argmax")
    assert info["initialized_from"]["source"] == str(ckpt_dir / "checkpoint.pt")
    assert _sha_tree(zoo / "draft")["model.safetensors"] != phase1 and _sha_tree(zoo / "target") == target_before
    card = (zoo / "draft" / "README.md").read_text()
    assert "cross-entropy against the target's argmax" in card and "records of similar length batched together" in card
    assert "(zoo v3, `draft_top1`)" in card
    top1_ck = load_checkpoint(tmp_path / "cache" / "train" / "draft-top1")
    assert top1_ck["step"] == 2


@pytest.mark.parametrize("loss, stage", [("ce", "draft_distill"), ("kl", "draft_distill"), ("top1", "draft_top1")])
def test_distillation_card_names_the_stage_of_its_loss(loss, stage):
    """The card names the stage that trains with that loss (a KL run is draft_distill with loss=kl)."""
    from harness.paths import REPO_ROOT
    from harness.zoo.build import _distillation_lines

    info = json.loads((REPO_ROOT / "zoo" / "draft" / "training.json").read_text())
    info["distillation"]["loss"] = loss
    assert f"(zoo v3, `{stage}`)" in _distillation_lines(info)[0]
