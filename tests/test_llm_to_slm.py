"""LLM-to-SLM: an untrained (zero) projector leaves the small model's greedy output as it was,
a trained one changes it; every output is marked lossy and forwards are counted (one target
forward); stop rules; added embeddings in the engine; the projector's save/load and refusals;
training resumes exactly and exports a card; a run marks the records lossy and not checked."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import tiny_model
from test_speculative import autoregressive

from harness.cli import main
from harness.config import SamplingConfig
from harness.drafters.projector import Projector, ProjectorConfig, ProjectorError, load_projector, save_projector
from harness.engine import Engine
from harness.registry import METHODS
from harness.train.llm_to_slm import LlmToSlmTrainConfig, run_llm_to_slm_training
from harness.train.loop import load_checkpoint
from harness.stops import StopRule
from methods.llm_to_slm import LlmToSlm, LlmToSlmConfig

PROMPT = [0, 17, 42, 99, 5]
N = 30
GREEDY = SamplingConfig()


@pytest.fixture(scope="module")
def small(tokenizer) -> Engine:
    return Engine.from_model(tiny_model(len(tokenizer), seed=1, hidden_size=32, num_attention_heads=2,
                                        num_key_value_heads=1), tokenizer)  # fmt: skip


def projector(engine: Engine, small: Engine, scale: float = 0.0) -> Projector:
    torch.manual_seed(0)
    p = Projector(ProjectorConfig(large_hidden=64, small_hidden=32, inner=16))
    if scale:
        for w in p.parameters():
            torch.nn.init.normal_(w, std=scale)
    return p.eval()


def test_a_zero_projector_leaves_the_small_model_as_it_was(engine, small):
    method = LlmToSlm(LlmToSlmConfig(), engine, GREEDY, draft=small, projector=projector(engine, small))
    gen = method.generate(PROMPT, StopRule(N))
    assert gen.tokens == autoregressive(small, PROMPT, n=N)
    assert gen.lossy and gen.target_forwards == 1 and gen.draft_forwards == N and gen.accepted_per_step == [N]
    assert METHODS.get("llm-to-slm") is LlmToSlm


def test_a_trained_projector_conditions_the_small_model(engine, small):
    method = LlmToSlm(LlmToSlmConfig(), engine, GREEDY, draft=small, projector=projector(engine, small, scale=0.5))
    gen = method.generate(PROMPT, StopRule(N))
    assert gen.lossy and gen.tokens != autoregressive(small, PROMPT, n=N)
    # the same as the engine's own forward with the projection added by hand
    hidden = engine.forward(PROMPT, engine.new_cache(), hidden=True, hidden_all=True).hidden
    with torch.inference_mode():
        embeds = small.model.get_input_embeddings()(torch.tensor([PROMPT])) + method.projector(hidden)
        first = int(small.model(inputs_embeds=embeds).logits[0, -1].argmax())
    assert gen.tokens[0] == first


def test_stop_rules(engine, small):
    method = LlmToSlm(LlmToSlmConfig(), engine, GREEDY, draft=small, projector=projector(engine, small, scale=0.5))
    full = method.generate(PROMPT, StopRule(N)).tokens
    k = next(i for i in range(2, N) if full[i] not in full[:i])
    gen = method.generate(PROMPT, StopRule(N, frozenset({full[k]})))
    assert gen.tokens == full[: k + 1] and gen.stop_reason == "eos"
    assert method.generate(PROMPT, StopRule(4)).tokens == full[:4]


def test_added_embeddings_are_refused_on_compiled_and_skipping_forwards(engine):
    with pytest.raises(ValueError, match="eager forwards only"):
        from harness.engine import LayerSkip

        engine.forward([0, 5], engine.new_cache(), skip=LayerSkip(attn=frozenset({0})), add_embeds=torch.zeros(2, 64))


def test_save_load_and_refusals(engine, small, tmp_path):
    p = projector(engine, small, scale=0.5)
    save_projector(p, tmp_path / "p")
    loaded = load_projector(tmp_path / "p", 64, 32)
    for a, b in zip(p.state_dict().values(), loaded.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b)
    with pytest.raises(ProjectorError, match="64 -> 32, these models need 64 -> 48"):
        load_projector(tmp_path / "p", 64, 48)
    with pytest.raises(ProjectorError, match="harness train llm-to-slm"):
        LlmToSlm(LlmToSlmConfig(projector=str(tmp_path / "none")), engine, GREEDY, draft=small)


def test_training_resumes_exactly_and_exports(model_dir, tmp_path, tokenizer):
    small_dir = tmp_path / "small"
    tiny_model(len(tokenizer), seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1).save_pretrained(small_dir)
    tokenizer.save_pretrained(small_dir)
    data = tmp_path / "tokens"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(3, 250, 3000).astype(np.uint16))
    np.save(data / "heldout_python.npy", rng.integers(3, 250, 200).astype(np.uint16))

    def cfg(out: str, steps: int, export: bool) -> LlmToSlmTrainConfig:
        return LlmToSlmTrainConfig(base=str(model_dir), small=str(small_dir), data="corpus", data_dir=str(data),
                                   out_dir=str(tmp_path / out), export_dir=str(tmp_path / "export"), batch_size=2,
                                   seq_len=32, max_steps=steps, max_minutes=0, warmup_steps=0, min_lr_ratio=1.0,
                                   progress=False, export_at_end=export, inner=16, lr=1e-2)  # fmt: skip

    first, _ = run_llm_to_slm_training(cfg("a", 3, False), log=lambda s: None)
    second, summary = run_llm_to_slm_training(cfg("a", 6, True), log=lambda s: None)
    straight, _ = run_llm_to_slm_training(cfg("b", 6, False), log=lambda s: None)
    assert (first.step, second.resumed_from, second.step, straight.step) == (3, 3, 6, 6)
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    agree = summary["export"]["agreement"]
    assert agree["positions"] > 0 and 0 <= agree["projected"] <= 1 and 0 <= agree["plain"] <= 1
    assert "Lossy by design" in (tmp_path / "export" / "README.md").read_text()
    load_projector(tmp_path / "export", 64, 32)
    # a run: the records are lossy, not checked, and the report says so
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "0", "prompt": "def add(a, b):"}) + "\n")
    run = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "8",
           "run.progress=false", "--methods", "llm-to-slm", f"method.llm-to-slm.draft={small_dir}",
           f"method.llm-to-slm.projector={tmp_path / 'export'}", "--out", str(tmp_path / "run")]  # fmt: skip
    assert main(run) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    ours = next(r for r in records if r["method"] == "llm-to-slm")
    assert ours["lossy"] and ours["status"] == "not-checked"
    # the leaderboard: its own section, labelled, with its closeness to greedy autoregressive
    board = tmp_path / "board.md"
    assert main(["leaderboard", str(tmp_path / "run"), "--out", str(board)]) == 0
    main_table, lossy = board.read_text().split("## Lossy methods")
    assert "llm-to-slm" not in main_table and "| llm-to-slm (lossy)" in lossy and "equal_share" in lossy
    ref = next(r for r in records if r["method"] == "autoregressive")["tokens"]
    same = sum(a == b for a, b in zip(ours["tokens"], ref)) / max(len(ours["tokens"]), len(ref))
    assert f"{same:.3f}" in lossy.splitlines()[-1]
