"""EAGLE head training on tiny random targets: the losses fall, the unrolled
training-time test is the chain the head drafts at decode time, v3's vocabulary maps, exact
resuming on self-distilled records, the zoo stages write loadable heads with a card."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from transformers import AutoConfig

from harness.drafters.eagle import HeadCache, load_head
from harness.train.eagle import (EagleTrainConfig, chain_counts, eagle_loss_fn, greedy_eval_sequences, new_head,
                                 target_pass, unroll)  # fmt: skip
from harness.train.loop import TrainLoopConfig, load_checkpoint, train

VOCAB = 300


def peaked_target(layers: int = 4):
    """A tiny random Llama whose next-token distributions are far from uniform (so a head has
    something to learn in a few steps)."""
    return tiny_model(VOCAB, num_hidden_layers=layers, initializer_range=0.2)


class Repeat:
    """One batch forever (the loop's batch protocol)."""

    def __init__(self, batch):
        self.batch = batch

    def __next__(self):
        return self.batch

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def _counts(seed: int = 0) -> np.ndarray:
    return np.bincount(np.random.default_rng(seed).integers(3, VOCAB, 5000), minlength=VOCAB)


@pytest.mark.parametrize("version", [1, 3])
def test_a_few_steps_lower_the_loss(version, tmp_path):
    target = peaked_target()
    cfg = EagleTrainConfig(version=version, draft_vocab_size=120 if version == 3 else 0, ttt_steps=3)
    torch.manual_seed(0)
    head = new_head(target, cfg, _counts())
    loss_fn = eagle_loss_fn(target, cfg)
    batch = torch.randint(3, VOCAB, (2, 33), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the v1 input noise
    with torch.no_grad():
        before = float(loss_fn(head, batch)[0])
    loop = TrainLoopConfig(lr=1e-2, warmup_steps=0, max_steps=12, progress=False)
    train(head, loss_fn, Repeat(batch), loop, tmp_path, log=lambda s: None)
    torch.manual_seed(2)
    with torch.no_grad():
        after = float(loss_fn(head, batch)[0])
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("version", [1, 3])
def test_unrolled_steps_are_the_chain_drafted_on_the_head_cache(version):
    """Step k of the training-time unroll at root j = drafting k tokens after j one at a time on
    the head's own cache (prefilled with the real features of positions <= j), as decoding does."""
    target = peaked_target()
    cfg = EagleTrainConfig(version=version, draft_vocab_size=120 if version == 3 else 0)
    torch.manual_seed(0)
    head = new_head(target, cfg, _counts()).eval()
    ids = torch.randint(3, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    embed = target.get_input_embeddings()
    with torch.no_grad():
        tp = target_pass(target, ids, head.config)
        outs = unroll(head, target, tp, ids, 4)
        for root in (0, 5, 9):
            cache = HeadCache()
            out = head(tp.features[:, : root + 1], ids[:, 1 : root + 2], embed, torch.arange(root + 1), cache=cache)[:, -1:]
            for k in range(1, 4):
                assert torch.allclose(out[0, 0], outs[k - 1][0, root], atol=1e-5), (root, k)
                out = head(out, ids[:, root + 1 + k : root + 2 + k], embed, torch.tensor([root + k]), cache=cache)
            assert torch.allclose(out[0, 0], outs[3][0, root], atol=1e-5)


def test_draft_vocabulary_maps_are_consistent():
    target = peaked_target()
    counts = _counts()
    head = new_head(target, EagleTrainConfig(version=3, draft_vocab_size=120), counts)
    d2t, t2d = head.d2t, head.t2d
    assert int(t2d.sum()) == 120 == d2t.numel()
    ids = torch.arange(120) + d2t
    assert bool(t2d[ids].all()) and bool((ids[1:] > ids[:-1]).all())
    order = sorted(range(VOCAB), key=lambda i: (-counts[i], i))
    assert set(ids.tolist()) == set(order[:120])  # the most frequent tokens of the data
    # the head's LM head starts as the target's rows of those tokens
    assert torch.equal(head.lm_head.weight, target.get_output_embeddings().weight[ids])
    assert torch.equal(head.to_target(torch.arange(120)), ids)


def test_chain_acceptance_counts_agreement_with_the_target(tmp_path):
    """An untrained head agrees by chance only; the target's own argmax chain (an oracle) is
    what the counting compares against, so a depth-d hit implies the hits before it."""
    target = peaked_target()
    head = new_head(target, EagleTrainConfig(version=1))
    seqs, lengths = greedy_eval_sequences(target, np.random.default_rng(1).integers(3, VOCAB, 400), 3, 16, 20)
    assert seqs.shape == (3, 36) and all(16 < n <= 36 for n in lengths)
    logits = target(seqs).logits
    for r, n in enumerate(lengths):  # the continuation is the target's greedy one
        assert torch.equal(seqs[r, 17:n], logits[r, 16 : n - 1].argmax(-1))
    counts = chain_counts(target, head, seqs, lengths, 16, 4)
    assert counts[4] == sum(max(0, n - 4 - 15) for n in lengths)
    assert list(counts[:4]) == sorted(counts[:4], reverse=True)


def _write_selfdistill(path, model_dir, n: int = 12) -> None:
    rng = np.random.default_rng(0)
    path.mkdir()
    with open(path / "shard_00000.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"index": i, "prompt_ids": [0] + rng.integers(3, 250, 6).tolist(),
                                "ids": rng.integers(3, 250, int(rng.integers(4, 14))).tolist()}) + "\n")
    sha = hashlib.sha256((model_dir / "model.safetensors").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps({"weights_sha256": sha, "shards": {"shard_00000.jsonl": {}}}))


def test_resume_continues_exactly_on_self_distilled_records(model_dir, tmp_path):
    from harness.train.eagle import run_eagle_training

    data = tmp_path / "tokens"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(3, 250, 3000).astype(np.uint16))
    np.save(data / "heldout_python.npy", rng.integers(3, 250, 300).astype(np.uint16))
    _write_selfdistill(tmp_path / "sd", model_dir)

    def cfg(out: str, steps: int, export: bool) -> EagleTrainConfig:
        return EagleTrainConfig(version=3, base=str(model_dir), data_dir=str(data), selfdistill_dir=str(tmp_path / "sd"),
                                out_dir=str(tmp_path / out), export_dir=str(tmp_path / "export"), draft_vocab_size=64,
                                batch_size=3, seq_len=32, ttt_steps=2, max_steps=steps, max_minutes=0, warmup_steps=0,
                                min_lr_ratio=1.0, progress=False, export_at_end=export, eval_prompts=2,
                                eval_prompt_len=8, eval_new_tokens=8)  # fmt: skip

    first, _ = run_eagle_training(cfg("a", 3, False), log=lambda s: None)
    second, summary = run_eagle_training(cfg("a", 5, True), log=lambda s: None)
    straight, _ = run_eagle_training(cfg("b", 5, False), log=lambda s: None)
    assert (first.step, second.resumed_from, second.step, straight.step) == (3, 3, 5, 5)
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    assert a["data"] == b["data"] == {"epoch": 1, "cursor": 3, "seed": 0, "n_records": 12}
    assert a["extra"]["data"]["source"] == "selfdistill"
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    head, _ = load_head(tmp_path / "export", AutoConfig.from_pretrained(model_dir))
    assert head.config.draft_vocab_size == 64 and int(head.t2d.sum()) == 64
    assert summary["export"]["acceptance"]["roots"] > 0


def test_zoo_stages_write_loadable_heads(model_dir, tmp_path):
    """``harness zoo build stages=[eagle,eagle3]`` on a zoo whose target is a tiny model: both
    heads exported beside it, loadable, with their cards (corpus windows: no self-distilled data)."""
    import shutil

    from harness import cli_zoo

    cache = tmp_path / "cache" / "zoo-data"
    marks = (("corpus", "corpus_manifest.json"), ("tokens", "data_meta.json"), ("tokens", "functions_meta.json"))
    for sub, name in marks:
        (cache / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub / name).write_text("{}")  # prepare_data sees the data as there
    shutil.copytree(model_dir, cache / "tokenizer")  # the token data is in the target's tokens
    rng = np.random.default_rng(0)
    np.save(cache / "tokens" / "train.npy", rng.integers(3, 250, 2000).astype(np.uint16))
    np.save(cache / "tokens" / "heldout_go.npy", rng.integers(3, 250, 200).astype(np.uint16))
    shutil.copytree(model_dir, tmp_path / "zoo" / "target")
    small = ["max_steps=2", "batch_size=2", "seq_len=16", "eval_prompts=2", "eval_prompt_len=8", "eval_new_tokens=6",
             "progress=false"]
    args = ["build", "stages=[eagle,eagle3]", f"data.cache_dir={tmp_path / 'cache'}", f"export.zoo_dir={tmp_path / 'zoo'}",
            "eagle3.draft_vocab_size=100", "eagle3.ttt_steps=2"]
    args += [f"{job}.{kv}" for job in ("eagle", "eagle3") for kv in small]
    assert cli_zoo.main(args) == 0
    target_cfg = AutoConfig.from_pretrained(tmp_path / "zoo" / "target")
    for name, version in (("target-eagle", 1), ("target-eagle3", 3)):
        head, cfg = load_head(tmp_path / "zoo" / name, target_cfg)
        assert cfg.version == version
        info = json.loads((tmp_path / "zoo" / name / "training.json").read_text())
        assert info["step"] == 2 and info["data"]["source"] == "corpus"
        card = (tmp_path / "zoo" / name / "README.md").read_text()
        assert f"# EAGLE-{version} head" in card and "| go |" in card and "depth 4" in card
    assert (tmp_path / "cache" / "train" / "eagle3" / "base.sha256").exists()
