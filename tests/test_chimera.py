"""Chimera: the drafter's decode-time state equals its training-time (parallel) computation,
greedy output equal to autoregressive with a random drafter / a drafter trained on the answer
(the loss function teaches it: most of its chain accepted), stops inside an accepted path, a
random-init Qwen2, save/load and refusals, training resumes exactly and exports a card, and the
sampling law (with a negative control)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sampling_law import PVALUE_FLOOR, SAMPLING, CONTROL_RUNS, METHOD_RUNS, sampled_pvalue, small_engine
from test_model_families import PROMPT, build
from test_speculative import autoregressive
from test_tree import ResampleFromP as WrongResidualVerifier
from test_train_eagle import Repeat
from test_tree import check_cache

from harness.config import SamplingConfig
from harness.drafters.chimera import ChimeraConfig, ChimeraDrafter, ChimeraError, load_drafter, ngram_ids, save_drafter
from harness.engine import Engine
from harness.registry import METHODS
from harness.train.chimera import ChimeraTrainConfig, acceptance, chimera_loss_fn, run_chimera_training
from harness.train.loop import TrainLoopConfig, load_checkpoint, train
from harness.stops import StopRule
from methods.chimera import Chimera, ChimeraMethodConfig, ContextState
from methods.eagle import EagleVerifier

PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
N = 40
GREEDY = SamplingConfig()


def random_drafter(engine: Engine, seed: int = 0, heads: int = 4) -> ChimeraDrafter:
    torch.manual_seed(seed)
    w = engine.model.get_output_embeddings().weight
    drafter = ChimeraDrafter(ChimeraConfig(hidden_size=w.shape[1], vocab_size=w.shape[0], num_heads=heads,
                                           attention_heads=2))  # fmt: skip
    for p in drafter.parameters():  # away from the identity start, so the heads disagree with the target
        torch.nn.init.normal_(p, std=0.3)
    return drafter.eval()


def chimera(engine, drafter, sampling=GREEDY, **cfg) -> Chimera:
    return Chimera(ChimeraMethodConfig(**cfg), engine, sampling, drafter=drafter)


def test_decode_state_equals_the_parallel_training_computation(engine):
    """ContextState (keys/values extended step by step, one query) = the causal block over the whole
    sequence, at every position."""
    drafter = random_drafter(engine)
    ids = torch.tensor([[0, 17, 42, 99, 5, 8, 9, 10, 11]])
    hidden = engine.forward(ids[0].tolist(), engine.new_cache(), hidden=True).hidden  # [T, H]
    embed = engine.model.get_input_embeddings()
    with torch.no_grad():
        parallel = drafter(embed(ngram_ids(ids, 3)[:, 1:]), hidden[None, :-1])  # position t: root x_{t+1}
        state = ContextState(drafter, hidden[:3])
        for t in range(2, ids.shape[1] - 1):
            if t > 2:
                state.extend(hidden[t : t + 1])
            grams = ids[0, max(0, t + 2 - 3) : t + 2].tolist()
            grams = [grams[0]] * (3 - len(grams)) + grams
            torch.testing.assert_close(state.head_states(embed(torch.tensor(grams))), parallel[:, 0, t], atol=1e-5, rtol=1e-5)
    assert ngram_ids(torch.tensor([[4, 5, 6]]), 3).tolist() == [[[4, 4, 4], [4, 4, 5], [4, 5, 6]]]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("tree", ["chain", "small", "large"])
def test_random_drafter_equals_autoregressive(engine, prompt, tree):
    ref = autoregressive(engine, prompt, n=N)
    end = chimera(engine, random_drafter(engine), tree=tree).loop(prompt, StopRule(N))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref
    assert sum(gen.accepted_per_step) == N and len(gen.accepted_per_step) == gen.target_forwards
    check_cache(engine, cache, prompt + ref[:-1])


def taught(engine: Engine, prompt: list[int], ref: list[int], steps: int = 150) -> ChimeraDrafter:
    """A drafter trained on this one sequence until it has learned it (a drafter that is right)."""
    torch.manual_seed(0)
    w = engine.model.get_output_embeddings().weight
    drafter = ChimeraDrafter(ChimeraConfig(hidden_size=w.shape[1], vocab_size=w.shape[0], num_heads=3, attention_heads=2))
    loop = TrainLoopConfig(lr=1e-2, max_steps=steps, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0, progress=False,
                           checkpoint_minutes=1e9)  # fmt: skip
    train(drafter, chimera_loss_fn(engine.model, 0.8), Repeat(torch.tensor([prompt + ref])), loop, _tmp(), log=lambda s: None)
    return drafter.eval()


def _tmp():
    import tempfile

    return tempfile.mkdtemp(prefix="chimera-test-")


@pytest.fixture(scope="module")
def taught_drafter(engine):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt, n=N)
    return prompt, ref, taught(engine, prompt, ref)


def test_a_drafter_that_learned_the_answer_is_accepted_and_exact(engine, taught_drafter):
    prompt, ref, drafter = taught_drafter
    gen = chimera(engine, drafter, tree="chain").generate(prompt, StopRule(N))
    assert gen.tokens == ref
    assert gen.target_forwards <= 16 and max(gen.accepted_per_step) == 4  # chain of 3 + the bonus, mostly accepted
    assert gen.accepted_per_position[0] >= 10


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 9])
def test_max_new_tokens_inside_an_accepted_path(engine, taught_drafter, limit):
    prompt, ref, drafter = taught_drafter
    end = chimera(engine, drafter, tree="chain").loop(prompt, StopRule(limit))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref[:limit] and gen.stop_reason == "max_new_tokens"
    check_cache(engine, cache, prompt + ref[: limit - 1])


def test_eos_inside_an_accepted_path(engine, taught_drafter):
    prompt, ref, drafter = taught_drafter
    method = chimera(engine, drafter, tree="chain")
    steps = method.generate(prompt, StopRule(N)).accepted_per_step
    ends = [sum(steps[: i + 1]) for i in range(len(steps))]
    start, end = next((s, e) for s, e in zip(ends, ends[1:]) if e - s >= 3 and ref[s + 1] not in ref[: s + 1])
    eos = frozenset({ref[start + 1]})
    gen = method.generate(prompt, StopRule(N, eos))
    assert gen.tokens == ref[: start + 2] == autoregressive(engine, prompt, n=N, eos=eos) and gen.stop_reason == "eos"


def test_random_init_qwen2():
    engine = build("qwen2", 0)
    ref = autoregressive(engine, PROMPT, n=N)
    assert len(set(ref)) > 5
    for seed in (0, 1):
        assert chimera(engine, random_drafter(engine, seed), tree="large").generate(PROMPT, StopRule(N)).tokens == ref


def test_save_load_and_refusals(engine, tmp_path):
    drafter = random_drafter(engine)
    save_drafter(drafter, tmp_path / "d")
    loaded = load_drafter(tmp_path / "d", hidden_size=64, vocab_size=engine.config.vocab_size)
    for (k, a), b in zip(drafter.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a.half().float(), b, msg=k)
    with pytest.raises(ChimeraError, match="hidden_size 64, the target 32"):
        load_drafter(tmp_path / "d", hidden_size=32)
    with pytest.raises(ChimeraError, match="harness train chimera"):
        Chimera(ChimeraMethodConfig(drafter=str(tmp_path / "none")), engine, GREEDY)
    with pytest.raises(ValueError, match="2 heads"):
        chimera(engine, random_drafter(engine, heads=2), tree="chain")
    assert METHODS.get("chimera") is Chimera


def test_training_lowers_the_loss_resumes_and_exports(model_dir, tmp_path):
    data = tmp_path / "tokens"
    data.mkdir()
    rng = np.random.default_rng(0)
    np.save(data / "train.npy", rng.integers(3, 250, 3000).astype(np.uint16))
    np.save(data / "heldout_python.npy", rng.integers(3, 250, 300).astype(np.uint16))

    def cfg(out: str, steps: int, export: bool) -> ChimeraTrainConfig:
        return ChimeraTrainConfig(base=str(model_dir), data="corpus", data_dir=str(data), out_dir=str(tmp_path / out),
                                  export_dir=str(tmp_path / "export"), batch_size=2, seq_len=32, max_steps=steps,
                                  max_minutes=0, warmup_steps=0, min_lr_ratio=1.0, progress=False, export_at_end=export,
                                  attention_heads=2, lr=3e-3)  # fmt: skip

    first, _ = run_chimera_training(cfg("a", 3, False), log=lambda s: None)
    second, summary = run_chimera_training(cfg("a", 6, True), log=lambda s: None)
    straight, _ = run_chimera_training(cfg("b", 6, False), log=lambda s: None)
    assert (first.step, second.resumed_from, second.step, straight.step) == (3, 3, 6, 6)
    a, b = load_checkpoint(tmp_path / "a"), load_checkpoint(tmp_path / "b")
    for key, value in b["model"].items():
        assert torch.equal(a["model"][key], value), key
    info = json.loads((tmp_path / "export" / "training.json").read_text())
    acc = summary["export"]["acceptance"]
    assert info["step"] == 6 and acc["positions"] > 0 and len(acc["chain_acceptance"]) == 4
    assert all(x >= y for x, y in zip(acc["top1"], acc["chain_acceptance"]))
    assert "chain acceptance" in (tmp_path / "export" / "README.md").read_text()
    load_drafter(tmp_path / "export")


def test_acceptance_counts_a_drafter_that_knows_the_sequence(engine, taught_drafter):
    prompt, ref, drafter = taught_drafter
    acc = acceptance(engine.model, drafter, [np.array(prompt + ref)])
    assert acc["positions"] == len(prompt + ref) - 1 - 3 and acc["chain_acceptance"][0] > 0.8


# ---- sampling ------------------------------------------------------------------------------------
class WrongResidualChimera(Chimera):
    verifier_class = type("WrongEagleVerifier", (WrongResidualVerifier, EagleVerifier), {})


def test_sampling_keeps_the_target_distribution():
    target = small_engine(0)
    drafter = random_drafter(target, heads=3)
    cfg = ChimeraMethodConfig(choices=[[0], [1]])  # one level: the first tokens take several steps
    method = Chimera(cfg, target, SAMPLING, drafter=drafter)
    pvalue, multi_step = sampled_pvalue(method, target, METHOD_RUNS)
    assert pvalue > PVALUE_FLOOR and multi_step == 1.0
    control = WrongResidualChimera(cfg, target, SAMPLING, drafter=drafter)
    assert sampled_pvalue(control, target, CONTROL_RUNS)[0] < PVALUE_FLOOR
