"""COrAL: the chunk layout, greedy equality with autoregressive decoding (strict mode), oracle
drafts through the KV truncation, stop rules inside an accepted block, the paper mode's
self-consistency rule and its lossy label, exact sampling with a failing control, and the
fine-tune (packed blocks, loss going down, resume, export with held-out acceptance)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_space import (GREEDY, PROMPTS, OracleProposals, UpstreamRule, check_oracle_blocks, check_sampling_law,
                        grid)

from harness.config import ModelConfig, SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from harness.train.coral import CoralTrainConfig, export, pack_coral_batch, run_coral_training
from harness.train.data import PaddedBatch
from harness.train.loop import load_checkpoint
from harness.train.space import space_losses
from harness.heldout import coral_heldout_acceptance
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.coral import Coral, CoralConfig, block_layout
from methods.space import SpaceSetupError


def greedy_tokens(eng: Engine, prompt: list[int], stop: StopRule) -> list[int]:
    return Autoregressive(AutoregressiveConfig(), eng, GREEDY).generate(prompt, stop).tokens


# ---- the chunk layout -----------------------------------------------------------------
def test_block_layout_k2():
    #   rows: x c0 c1 | s0 s1 s2 s3 s4      (x = x_{n-1}; causal rows, then the order-agnostic block)
    expected = grid("""
        x . . . . . . .
        x x . . . . . .
        x x x . . . . .
        x . . x x x x x
        x . . x x x x x
        x . . x x x x x
        x . . x x x x x
        x . . x x x x x
    """)
    lay = block_layout(2)
    assert lay.length == 8 and lay.slots == 3 and torch.equal(lay.visible, expected)
    assert lay.rel_pos.tolist() == [0, 1, 2, 1, 2, 3, 4, 5]


# ---- greedy losslessness (strict) -----------------------------------------------------------
@pytest.fixture(scope="module")
def engines(engine, tokenizer):
    # the session's random model, and a second one with larger weights (peakier, loops more)
    return [engine, Engine.from_model(tiny_model(len(tokenizer), seed=1, initializer_range=0.2), tokenizer)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_strict_equals_greedy_autoregressive_on_random_models(engines, k):
    for eng in engines:
        method = Coral(CoralConfig(k=k), eng, GREEDY)
        for prompt in PROMPTS:
            stop = StopRule(30, frozenset())
            got = method.generate(prompt, stop)
            assert got.tokens == greedy_tokens(eng, prompt, stop) and not got.lossy
            assert got.target_forwards == len(got.accepted_per_step) and sum(got.accepted_per_step) == 30
            assert got.proposed_per_position == [got.target_forwards - 1] * k and got.extra["chunk_tokens"] == 3 * k + 2


class Oracle(OracleProposals, Coral):
    """Drafts the reference continuation, right for the first `right` drafts, then wrong."""


@pytest.mark.parametrize("k,right", [(3, 3), (3, 1), (3, 0), (4, 4), (4, 2)])
def test_oracle_drafts_commit_the_expected_blocks(engines, k, right):
    """Accepted drafts keep their causal rows' KV (a truncate): any error there changes later tokens."""
    eng, n = engines[1], 25
    for prompt in PROMPTS[:2]:
        ref = greedy_tokens(eng, prompt, StopRule(n, frozenset()))
        oracle = Oracle(CoralConfig(k=k), eng, GREEDY, reference=ref, prompt_len=len(prompt), right=right)
        check_oracle_blocks(oracle.generate(prompt, StopRule(n, frozenset())), ref, k, right)


def test_stop_rules_inside_an_accepted_block(engines):
    eng, k, prompt = engines[1], 3, PROMPTS[0]
    ref = greedy_tokens(eng, prompt, StopRule(20, frozenset()))
    oracle = dict(reference=ref, prompt_len=len(prompt), right=k)
    got = Oracle(CoralConfig(k=k), eng, GREEDY, **oracle).generate(prompt, StopRule(7, frozenset()))
    assert got.tokens == ref[:7] and got.accepted_per_step == [1, 4, 2] and got.stop_reason == "max_new_tokens"
    i = next(i for i in range(6, 9) if ref[i] not in ref[:i])  # a token first emitted mid-block
    stop = StopRule(20, frozenset({ref[i]}))
    got = Oracle(CoralConfig(k=k), eng, GREEDY, **oracle).generate(prompt, stop)
    assert got.tokens == greedy_tokens(eng, prompt, stop) == ref[: i + 1]
    assert got.accepted_per_step[-1] == i - 4 and got.stop_reason == "eos"


# ---- the paper mode ----------------------------------------------------------------------
def test_paper_rule_keeps_drafts_while_the_block_agrees(engine):
    method = Coral(CoralConfig(k=3, mode="paper"), engine, GREEDY)
    drafts, refined = torch.tensor([5, 6, 7]), torch.tensor([9, 6, 8, 4, 0, 0, 0])
    first = torch.zeros(300)
    first[5] = 1.0  # the target's row agrees with c_0
    assert method.consistent(drafts, refined, first) == [5, 6, 8]  # c_0, c_1 (r_1 agrees), then r_2
    assert method.consistent(drafts, torch.tensor([0, 6, 7, 4, 0, 0, 0]), first) == [5, 6, 7, 4]  # all kept, then r_3
    first[5], first[4] = 0.0, 1.0  # the target rejects c_0: its own token only
    assert method.consistent(drafts, refined, first) == [4]


def test_paper_mode_is_marked_lossy_and_keeps_stop_rules(engines):
    eng = engines[1]
    method = Coral(CoralConfig(k=2, mode="paper"), eng, GREEDY)
    for prompt in PROMPTS:
        got = method.generate(prompt, StopRule(17, frozenset()))
        assert got.lossy and len(got.tokens) == 17 and got.stop_reason == "max_new_tokens"
        assert got.tokens[0] == greedy_tokens(eng, prompt, StopRule(1, frozenset()))[0]  # the prompt row's own
        eos = got.tokens[5]
        cut = method.generate(prompt, StopRule(17, frozenset({eos})))
        assert cut.tokens == got.tokens[: got.tokens.index(eos) + 1] and cut.stop_reason == "eos"
    with pytest.raises(ValueError, match="mode=paper decodes greedily"):
        Coral(CoralConfig(k=2, mode="paper"), eng, SamplingConfig(do_sample=True))
    with pytest.raises(ValueError, match="use strict"):
        Coral(CoralConfig(k=2, mode="fast"), eng, GREEDY)


def test_k_and_mask_id_come_from_config_or_checkpoint(tokenizer):
    model = tiny_model(len(tokenizer))
    eng = Engine.from_model(model, tokenizer)
    with pytest.raises(SpaceSetupError, match="coral_k"):
        Coral(CoralConfig(), eng, GREEDY)
    model.config.coral_k, model.config.coral_mask_token_id = 4, 7
    method = Coral(CoralConfig(), eng, GREEDY)
    assert (method.k, method.mask_id, method.headroom()) == (4, 7, 8)
    with pytest.raises(SpaceSetupError, match="outside the model's vocabulary"):
        Coral(CoralConfig(mask_id=len(tokenizer)), eng, GREEDY)


# ---- sampling (strict): the output distribution is the target's -------------------------------
class UpstreamCoral(Coral):
    verifier_class = UpstreamRule


def test_sampling_matches_the_target_distribution_and_catches_a_wrong_rule():
    """The law of the first four tokens (tests/sampling_law.py) on a 6-token model with k = 2; the
    control verifies with SPACE upstream's rule (accept with p(c), resample from all of p)."""
    check_sampling_law(Coral, UpstreamCoral, CoralConfig(k=2, mask_id=5))


# ---- the fine-tune -----------------------------------------------------------------------------
def test_packed_blocks_hold_drafts_corruptions_and_masks():
    ids = torch.arange(100, 130).view(1, 30).repeat(4, 1)
    b = pack_coral_batch(ids, 2, 3, 1.0, 0.5, 3, np.random.default_rng(0))
    L, W = b["n_real"], 5
    assert L == 29 and b["input_ids"].shape == (4, L + 3 * W)
    slots, pos, labels = b["input_ids"][:, L:], b["position_ids"][:, L:], b["labels"][:, L:]
    assert torch.equal(labels, ids.gather(1, pos))  # every slot: the token at its position
    for row in range(4):
        for g in range(3):
            p, f = int(b["splits"][row, g]), int(b["filled"][row, g])
            assert pos[row, g * W : (g + 1) * W].tolist() == list(range(p, p + W))
            group = slots[row, g * W : (g + 1) * W]
            assert (group[f:] == 3).all() and (group[:f] != 3).all()  # drafts (right or corrupted), then masks
            rows = L + g * W
            assert b["visible"][row, rows : rows + W, :L].sum(1).tolist() == [p] * W  # the context before p
            assert b["visible"][row, rows : rows + W, L:].sum(1).tolist() == [W] * W  # its whole group, no other
    assert not b["visible"][:, :L, L:].any()  # no real token sees a slot
    filled = torch.arange(W).view(1, 1, W) < b["filled"][:, :, None]
    drafts, truth = slots.view(4, 3, W)[filled], labels.view(4, 3, W)[filled]
    assert 0 < int((drafts != truth).sum()) < drafts.numel()  # some drafts corrupted, not all


def test_packed_records_label_only_the_continuation():
    ids = torch.tensor([[0, 10, 11, 12, 13, 14, 15, 16, 17, 2, 2], [0, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29]])
    valid = ids != 2
    generated = torch.zeros_like(valid)
    generated[:, 4:] = True
    b = pack_coral_batch(PaddedBatch(ids, valid, generated & valid), 1, 4, 1.0, 0.0, 3, np.random.default_rng(0))
    assert (b["splits"] >= 4).all() and (b["splits"][0] <= 6).all()  # p + 2 <= the last real index 8
    labels = b["labels"][:, b["n_real"] :]
    assert (labels != 2).all() and (labels >= 13).all()  # generated tokens only, never padding


def test_training_lowers_the_loss_resumes_and_exports(tmp_path, model_dir, tokenizer):
    data = tmp_path / "tokens"
    data.mkdir()
    cycle = np.random.default_rng(0).integers(4, 300, size=23)  # a learnable repeating stream
    np.save(data / "train.npy", np.tile(cycle, 200).astype(np.uint16))
    cfg = CoralTrainConfig(
        base=str(model_dir), data_dir=str(data), out_dir=str(tmp_path / "ckpt"), export_dir=str(tmp_path / "export"),
        k=2, mask_groups=3, batch_size=4, seq_len=24, max_steps=30, max_minutes=0.0, lr=3e-3, warmup_steps=3,
        progress=False, eval_problems=1, eval_new_tokens=6,
    )  # fmt: skip
    first, _ = run_coral_training(cfg, log=lambda _s: None)
    assert first.step == 30 and first.resumed_from == 0

    block = torch.from_numpy(np.tile(cycle, 3)[:25].astype(np.int64))[None]
    batch = pack_coral_batch(block, 2, 3, 1.0, 0.25, 3, np.random.default_rng(1))
    base, tuned = tiny_model(len(tokenizer)), tiny_model(len(tokenizer))
    tuned.load_state_dict(load_checkpoint(cfg.out_dir)["model"])
    with torch.no_grad():
        before, after = space_losses(base, batch), space_losses(tuned, batch)
    assert after[0] < before[0] - 1 and after[1] < before[1] - 1  # AR and block losses both fall

    cfg.max_steps = 40
    again, _ = run_coral_training(cfg, log=lambda _s: None)
    assert again.resumed_from == 30 and again.step == 40

    out = export(cfg, log=lambda _s: None, evaluate=coral_heldout_acceptance)
    config = json.loads((out / "config.json").read_text())
    assert config["coral_k"] == 2 and config["coral_mask_token_id"] == 3 and config["dtype"] == "float16"
    quality = json.loads((out / "quality.json").read_text())
    assert quality["problems"] == 1 and len(quality["acceptance"]) == 2 and (out / "README.md").exists()
    # the exported checkpoint decodes with the k and mask id it carries, losslessly and several tokens a forward
    eng = Engine.load(ModelConfig(path=str(out), device="cpu"))
    method = Coral(CoralConfig(), eng, GREEDY)
    assert (method.k, method.mask_id) == (2, 3)
    prompt, stop = [0, *cycle[:6].tolist()], StopRule(24, frozenset())
    got = method.generate(prompt, stop)
    assert got.tokens == greedy_tokens(eng, prompt, stop) and got.target_forwards < 24
