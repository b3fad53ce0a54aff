"""Medusa: tree buffers, equality with greedy AR, oracle / wrong heads, stop rules, the
heads' file formats (ours and upstream's), the sampling modes' labels, and head training (the
sampling law every method keeps: tests/test_conformance.py; the walk: tests/test_tree.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from harness.config import SamplingConfig
from harness.drafters.medusa import MedusaHeads, MedusaHeadsConfig, MedusaHeadsError, load_heads, save_heads
from harness.engine import Engine
from harness.stops import StopRule
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.medusa import Medusa, MedusaConfig, TreeError, build_tree
from tests.test_tree import check_cache

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5, 23], [0, 200, 11, 11, 64, 150, 7, 9, 250, 33]]


def random_heads(engine: Engine, k: int = 3, layers: int = 1, seed: int = 1) -> MedusaHeads:
    lm_head = engine.model.get_output_embeddings().weight
    heads = MedusaHeads(MedusaHeadsConfig(k, layers, lm_head.shape[1], lm_head.shape[0]))
    heads.init_from_lm_head(lm_head)
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():  # away from "every head = the LM head"
            p.add_(0.05 * torch.randn_like(p))
    return heads.eval()


class LookupHeads(torch.nn.Module):
    """Heads that know the reference continuation ``ref``: the hidden state is matched to the
    nearest reference position p, and head i ranks the right token ref[p+i+2] at
    ``rank(p, i)`` (0 = its best guess; None = last) among fixed arbitrary scores."""

    def __init__(self, engine: Engine, ref: list[int], k: int = 3, rank=lambda p, i: 0):
        super().__init__()
        self.num_heads, self.ref, self.rank = k, ref, rank
        self.states = engine.forward(ref, engine.new_cache(), hidden=True).hidden  # [len, H]
        vocab = engine.model.get_output_embeddings().weight.shape[0]
        self.scores = torch.randn(k, vocab, generator=torch.Generator().manual_seed(5))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        pos = torch.cdist(hidden.float(), self.states.float()).argmin(dim=-1).tolist()
        out = self.scores[:, None, :].repeat(1, len(pos), 1)
        for row, p in enumerate(pos):
            for i in range(self.num_heads):
                if p + i + 2 < len(self.ref):
                    t, r = self.ref[p + i + 2], self.rank(p, i)
                    others = torch.cat((self.scores[i, :t], self.scores[i, t + 1 :])).sort(descending=True).values
                    out[i, row, t] = others[-1] - 1 if r is None else others[0] + 1 if r == 0 else others[r - 1 : r + 1].mean()
        return out


RANKS = [[0, 0, 0], [1, 0, 2], [0, None, 0], [2, 1, 0], [0, 0, 1], [None, 0, 0], [0, 2, 0]]


def sometimes_right(p: int, i: int):
    """Right at rank 0, 1 or 2, or not at all, varying with position and head."""
    return RANKS[p % len(RANKS)][i]


def ar(engine: Engine, prompt: list[int], stop: StopRule) -> list[int]:
    return Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop).tokens


def medusa(engine, heads, tree="chain", sampling=GREEDY, **kw) -> Medusa:
    return Medusa(MedusaConfig(tree=tree, **kw), engine, sampling, heads=heads)


# ---- tree buffers -----------------------------------------------------------------------
def test_tree_buffers_hand_checked():
    tree = build_tree(((1, 0), (0,), (0, 0, 0), (1,), (0, 1), (0, 0)))
    # nodes: 0 root, 1 (0,), 2 (1,), 3 (0,0), 4 (0,1), 5 (1,0), 6 (0,0,0)
    assert tree.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0))
    shape = tree.shape
    assert shape.parents == (-1, 0, 0, 1, 1, 2, 3)
    assert shape.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert shape.mask.int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 0, 1, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0, 0],
        [1, 1, 0, 0, 1, 0, 0],
        [1, 0, 1, 0, 0, 1, 0],
        [1, 1, 0, 1, 0, 0, 1],
    ]
    assert shape.paths == ((0, 1, 3, 6), (0, 1, 4), (0, 2, 5))
    assert tree.top_k == 2 and tree.max_depth == 3
    assert tree.gather.tolist() == [0, 1, 2, 3, 2, 4]  # (depth-1) * top_k + rank
    assert shape.children == ((1, 2), (3, 4), (5,), (6,), (), (), ())
    assert build_tree(((0,), (0, 0))) is build_tree(((0,), (0, 0)))  # built once


def test_bad_trees_are_refused(engine):
    with pytest.raises(TreeError, match="no parent"):
        build_tree(((0,), (1, 0)))
    with pytest.raises(TreeError, match="twice"):
        build_tree(((0,), (0,)))
    with pytest.raises(TreeError, match="only 2 Medusa heads"):
        medusa(engine, random_heads(engine, k=2), tree="chain")
    with pytest.raises(TreeError, match="unknown Medusa tree"):
        medusa(engine, random_heads(engine), tree="huge")


# ---- equality with greedy AR -------------------------------------------------------------
@pytest.mark.parametrize("tree", ["chain", "large"])
@pytest.mark.parametrize("kind", ["random", "sometimes-right"])
def test_equals_greedy_autoregressive(engine, tree, kind):
    stop = StopRule(max_new_tokens=40)
    for prompt in PROMPTS:
        ref = ar(engine, prompt, stop)
        heads = random_heads(engine) if kind == "random" else LookupHeads(engine, prompt + ref, rank=sometimes_right)
        end = medusa(engine, heads, tree=tree).loop(prompt, stop)
        gen, cache = end.generation, end.cache
        assert gen.tokens == ref
        assert sum(gen.accepted_per_step) == len(gen.tokens) == 40
        assert gen.target_forwards == len(gen.accepted_per_step)
        if kind != "random":
            assert max(gen.accepted_per_step) == 4 and len(gen.accepted_per_step) < 30
        assert gen.extra["tree"] == tree and not gen.lossy
        check_cache(engine, cache, prompt + gen.tokens[:-1])


def test_explicit_choices(engine):
    m = Medusa(MedusaConfig(choices=[[0], [1], [0, 0]]), engine, GREEDY, heads=random_heads(engine))
    gen = m.generate(PROMPTS[0], StopRule(max_new_tokens=12))
    assert gen.tokens == ar(engine, PROMPTS[0], StopRule(max_new_tokens=12))
    assert gen.extra["tree"] == "custom" and gen.extra["tree_size"] == 4


@pytest.mark.parametrize("tree", ["chain", "small"])
def test_oracle_heads_accept_full_depth(engine, tree):
    prompt, n = PROMPTS[1], 30
    ref = prompt + ar(engine, prompt, StopRule(max_new_tokens=n))
    m = medusa(engine, LookupHeads(engine, ref), tree=tree)
    end = m.loop(prompt, StopRule(max_new_tokens=n))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref[len(prompt) :]
    steps = (n - 1 + 3) // 4  # 1 from the prefill, then 4 per step
    assert gen.accepted_per_step == [1] + [4] * (steps - 1) + [n - 1 - 4 * (steps - 1)]
    assert gen.accepted_per_position[0] == steps and gen.proposed_per_position == [steps] * 3
    check_cache(engine, cache, ref[:-1])


def test_wrong_heads_accept_nothing(engine):
    prompt, n = PROMPTS[0], 15
    ref = prompt + ar(engine, prompt, StopRule(max_new_tokens=n))
    gen = medusa(engine, LookupHeads(engine, ref, rank=lambda p, i: None), tree="large").generate(prompt, StopRule(max_new_tokens=n))
    assert gen.tokens == ref[len(prompt) :]
    assert gen.accepted_per_step == [1] * n and gen.accepted_per_position == [0, 0, 0]


def test_stops_inside_an_accepted_path(engine):
    prompt = PROMPTS[1]
    ref = prompt + ar(engine, prompt, StopRule(max_new_tokens=30))
    out = ref[len(prompt) :]
    m = medusa(engine, LookupHeads(engine, ref), tree="chain")
    # max_new_tokens = 6: the prefill gives 1, the first step 4, the second is cut after 1
    end = m.loop(prompt, StopRule(max_new_tokens=6))
    gen, cache = end.generation, end.cache
    assert gen.tokens == out[:6] and gen.accepted_per_step == [1, 4, 1]
    check_cache(engine, cache, ref[: len(prompt) + 5])
    # EOS in the middle of the second step's path: nothing after it
    at = next(i for i in range(6, 9) if out[i] not in out[:i])
    stop = StopRule(max_new_tokens=30, eos_ids=frozenset({out[at]}))
    gen = m.generate(prompt, stop)
    assert gen.tokens == out[: at + 1] == ar(engine, prompt, stop)
    assert gen.accepted_per_step == [1, 4, at + 1 - 5]


def test_heads_are_timed_as_draft_forwards(engine):
    """The runner times Method.draft_timers(): one timed draft call per decode step (the heads run
    once per step), none on the target's timer beyond the prefill and the verifies."""
    m = medusa(engine, random_heads(engine), tree="small")
    (clock,) = m.draft_timers()
    engine.start_timing()
    clock.start_timing()
    gen = m.generate(PROMPTS[1], StopRule(max_new_tokens=12))
    drafts, targets = clock.stop_timing(), engine.stop_timing()
    assert len(targets) == gen.target_forwards and len(drafts) == gen.target_forwards - 1 > 0


# ---- sampling modes -----------------------------------------------------------------------
def test_sampling_modes_run_and_are_labelled(engine):
    sampling = SamplingConfig(do_sample=True, temperature=0.8)
    heads = random_heads(engine)
    for mode, lossy in (("rejection", False), ("typical", True)):
        m = medusa(engine, heads, tree="small", acceptance=mode, sampling=sampling)
        gen = m.generate(PROMPTS[0], StopRule(max_new_tokens=20), seed=3)
        assert len(gen.tokens) == 20 and gen.lossy is lossy and gen.extra["acceptance"] == mode
        assert gen.tokens == m.generate(PROMPTS[0], StopRule(max_new_tokens=20), seed=3).tokens  # seeded
    with pytest.raises(ValueError, match="cannot sample"):
        medusa(engine, heads, acceptance="greedy", sampling=sampling)


# ---- heads on disk -----------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@pytest.mark.parametrize("layers", [1, 2])
def test_released_format_loads(engine, tmp_path, fmt, layers):
    heads = random_heads(engine, k=3, layers=layers)
    state = {k: v.clone() for k, v in heads.state_dict().items()}
    assert {"0.0.linear.weight", "0.0.linear.bias", f"2.{layers}.weight"} <= set(state)
    if fmt == "pt":
        torch.save(state, tmp_path / "medusa_lm_head.pt")
    else:
        from safetensors.torch import save_file

        save_file(state, str(tmp_path / "medusa_lm_head.safetensors"))
    config = {"medusa_num_heads": 3, "medusa_num_layers": layers, "base_model_name_or_path": "tiny"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_heads(tmp_path, hidden_size=64, vocab_size=heads.config.vocab_size)
    assert (loaded.num_heads, loaded.config.num_layers, loaded.config.base_model_name_or_path) == (3, layers, "tiny")
    h = torch.randn(5, 64)
    torch.testing.assert_close(loaded(h), heads(h), atol=0, rtol=0)
    # a config that disagrees with the file is refused, not silently truncated
    (tmp_path / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 5}))
    with pytest.raises(MedusaHeadsError, match="medusa_num_heads=5 but .* holds 3"):
        load_heads(tmp_path)


def test_heads_mismatches_are_refused(engine, tmp_path):
    heads = random_heads(engine)
    save_heads(heads, tmp_path)
    with pytest.raises(MedusaHeadsError, match="hidden size 64, the base model has 128"):
        load_heads(tmp_path, hidden_size=128)
    with pytest.raises(MedusaHeadsError, match="the base model has 999"):
        load_heads(tmp_path, vocab_size=999)
    state = heads.state_dict()
    del state["2.1.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(MedusaHeadsError, match="head 2"):
        load_heads(tmp_path / "broken.pt")
    # our own format loads by path through the method, in fp16 on disk
    m = Medusa(MedusaConfig(heads=str(tmp_path), tree="chain"), engine, GREEDY)
    assert m.generate(PROMPTS[0], StopRule(max_new_tokens=8)).tokens == ar(engine, PROMPTS[0], StopRule(max_new_tokens=8))


# ---- training ------------------------------------------------------------------------------
class Repeat:
    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_training_reduces_loss_and_resumes(model_dir, tmp_path):
    from harness.train.loop import TrainLoopConfig, train
    from harness.train.medusa import (MedusaTrainConfig, head_accuracy, load_base, medusa_loss_fn, new_heads,
                                      run_medusa_training)  # fmt: skip

    base = load_base(str(model_dir))
    heads = new_heads(base, 2, 1)
    loss_fn = medusa_loss_fn(base, [1.0, 0.8])
    batch = torch.randint(3, 250, (2, 33))
    with torch.no_grad():
        before = float(loss_fn(heads, batch)[0])
    loop = TrainLoopConfig(lr=1e-2, warmup_steps=0, max_steps=8, progress=False, weight_decay=0.0)
    train(heads, loss_fn, Repeat(batch), loop, tmp_path / "fit", log=lambda s: None)
    assert float(loss_fn(heads, batch)[0].detach()) < 0.8 * before

    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(3, 250, 3000).astype(np.uint16))
    np.save(data / "heldout_python.npy", rng.integers(3, 250, 200).astype(np.uint16))
    cfg = MedusaTrainConfig(base=str(model_dir), data_dir=str(data), out_dir=str(tmp_path / "ckpt"),
                            export_dir=str(tmp_path / "export"), num_heads=2, batch_size=2, seq_len=32,
                            max_steps=3, max_minutes=0, warmup_steps=1, progress=False, eval_tokens=0)  # fmt: skip
    first, _ = run_medusa_training(cfg, log=lambda s: None)
    cfg.max_steps = 5
    second, summary = run_medusa_training(cfg, log=lambda s: None)
    assert (first.step, second.resumed_from, second.step) == (3, 3, 5)
    shipped = load_heads(tmp_path / "export", hidden_size=64)
    assert shipped.num_heads == 2
    card = (tmp_path / "export" / "README.md").read_text()
    assert "head 1 (t+3)" in card and "| python |" in card
    acc = summary["export"]["accuracy"]
    assert len(acc["top1"]) == 2 and acc["tokens"] == 199
    assert head_accuracy(base, shipped, np.arange(3, 40))["tokens"] == 36
