"""Hidden Transfer and FIRP: the engine's injected rows, token-exact greedy decoding, stop rules,
sampling, bad input and training."""

from __future__ import annotations

import pytest
import torch

from harness.config import SamplingConfig
from harness.drafters.transfer import (TransferConfig, TransferError, TransferLayers, load_transfer, pseudo_rows,
                                       save_transfer)  # fmt: skip
from harness.engine import Engine, Injection
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from harness.stops import StopRule
from methods.hidden_transfer import Firp, FirpConfig, HiddenTransfer, HiddenTransferConfig
from methods.tree import TreeError
from tests.conftest import tiny_model
from tests.sampling_law import CONTROL_RUNS, PVALUE_FLOOR, RUNS, SAMPLING, sampled_pvalue
from tests.test_tree import ResampleFromP as WrongResidualVerifier
from tests.test_train_eagle import Repeat
from tests.test_tree import check_cache

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5, 23], [0, 200, 11, 11, 64, 150, 7, 9, 250, 33]]
LAYER = 1  # the tiny models have 2 decoder layers: rows join at the second


def ar(engine: Engine, prompt: list[int], stop: StopRule) -> list[int]:
    return Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop).tokens


def random_transfer(engine: Engine, attend_rows: bool, k: int = 3, seed: int = 1) -> TransferLayers:
    hidden = engine.config.hidden_size
    layers = TransferLayers(TransferConfig(layer=LAYER, k=k, attend_rows=attend_rows, hidden_size=hidden))
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layers.eval()


class OracleTransfer(torch.nn.Module):
    """Transfer layers that know the reference sequence ``ref``: an anchor's hidden state is matched
    to the nearest reference position p, and its row j is the true hidden state of ``ref[p + j]``
    entering the layer (``shift`` > 0: of ``ref[p + j + shift]``, i.e. wrong). With
    ``attend_rows`` the rows then replay the real forward exactly: row j's argmax is ref[p + j + 1]."""

    def __init__(self, engine: Engine, ref: list[int], attend_rows: bool = True, k: int = 3, shift: int = 0):
        super().__init__()
        self.config = TransferConfig(layer=LAYER, k=k, attend_rows=attend_rows, hidden_size=engine.config.hidden_size)
        self.states = engine.forward(ref, engine.new_cache(), hidden=(LAYER,)).hidden  # [len, H]
        self.shift = shift

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        pos = torch.cdist(h.float(), self.states.float()).argmin(dim=-1)
        steps = torch.arange(1, self.config.k + 1) + self.shift
        index = (pos.view(-1, 1) + steps).clamp(max=len(self.states) - 1).flatten()
        return self.states[index].to(h.dtype)


def method(engine, transfer, sampling=GREEDY, **kw):
    cls, cfg = (Firp, FirpConfig) if transfer.config.attend_rows else (HiddenTransfer, HiddenTransferConfig)
    return cls(cfg(**kw), engine, sampling, transfer=transfer)


# ---- the engine's injected rows ----------------------------------------------------------------
def test_injected_true_states_replay_the_plain_forward(engine):
    """Rows that are the real next tokens' states entering the layer, each seeing the context and
    the rows before it, give the plain forward's logits; the cache, cut back, is the plain one."""
    seq = PROMPTS[1] + [5, 6, 7, 8]
    plain = engine.forward(seq, engine.new_cache())
    states = engine.forward(seq, engine.new_cache(), hidden=(LAYER,)).hidden
    cache = engine.new_cache()
    engine.forward(seq[:4], cache)
    new, k = 3, 3  # tokens 4..6 in this forward; rows for the tokens 7..9 after token 6
    causal = torch.ones(new + k, 4 + new + k, dtype=torch.bool).tril(4)
    inject = Injection(layer=LAYER, make=lambda h: states[7:10], positions=torch.arange(7, 10),
                       mask=causal[new:])  # fmt: skip
    out = engine.forward(seq[4:7], cache, inject=inject)
    torch.testing.assert_close(out.logits, plain.logits[4:7], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.injected, plain.logits[7:10], atol=1e-5, rtol=1e-5)
    lengths = [layer.get_seq_length() for layer in cache.inner.layers]
    assert lengths == [7, 10]  # the rows joined the second layer only
    cache.truncate(7)
    check_cache(engine, cache, seq[:7])
    # the training forward (no cache, autograd on) gives the same rows
    sees = torch.ones(1, 7, dtype=torch.bool)
    layers = OracleTransfer(engine, seq)
    with torch.no_grad():  # the oracle's states are inference tensors
        rows = engine.injected_forward(seq[:7], pseudo_rows(layers, sees, torch.tensor([6]), slice(6, 7)))
    torch.testing.assert_close(rows.injected, plain.logits[7:10], atol=1e-5, rtol=1e-5)


def test_injection_is_refused_where_it_cannot_run(engine):
    bad = Injection(layer=2, make=lambda h: h, positions=torch.arange(1), mask=torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="decoder layer 1..1 of this model, not 2"):
        engine.forward([5], engine.new_cache(), inject=bad)
    wrong = Injection(layer=1, make=lambda h: h, positions=torch.arange(1), mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"need positions \[1\] and a mask \[1, 2\]"):
        engine.forward([5], engine.new_cache(), inject=wrong)


# ---- equality with greedy AR -----------------------------------------------------------------
@pytest.mark.parametrize("attend_rows", [False, True])
@pytest.mark.parametrize("tree", ["chain", "small"])
def test_random_transfer_equals_greedy_autoregressive(engine, attend_rows, tree):
    stop = StopRule(max_new_tokens=30)
    m = method(engine, random_transfer(engine, attend_rows), tree=tree)
    for prompt in PROMPTS:
        gen = m.generate(prompt, stop)
        assert gen.tokens == ar(engine, prompt, stop)
        assert sum(gen.accepted_per_step) == len(gen.tokens) == 30 == sum(gen.accepted_per_step)
        assert gen.target_forwards == len(gen.accepted_per_step) and gen.draft_forwards == 0
        assert gen.extra["attend_rows"] is attend_rows and not gen.lossy


def test_oracle_rows_accept_the_whole_chain(engine):
    """FIRP with rows that replay the real forward: every step accepts the 3-deep chain."""
    prompt, n = PROMPTS[1], 30
    ref = prompt + ar(engine, prompt, StopRule(max_new_tokens=n))
    m = method(engine, OracleTransfer(engine, ref), tree="chain")
    gen = m.generate(prompt, StopRule(max_new_tokens=n))
    assert gen.tokens == ref[len(prompt) :]
    steps = (n - 1 + 3) // 4  # 1 from the prefill, then 4 per step
    assert gen.accepted_per_step == [1] + [4] * (steps - 1) + [n - 1 - 4 * (steps - 1)]
    assert gen.proposed_per_position == [steps] * 3 and gen.accepted_per_position[0] == steps


def test_wrong_rows_accept_nothing_and_the_cache_stays_exact(engine):
    prompt, n = PROMPTS[0], 12
    ref = prompt + ar(engine, prompt, StopRule(max_new_tokens=40))
    m = method(engine, OracleTransfer(engine, ref, shift=7), tree="chain")
    gen = m.generate(prompt, StopRule(max_new_tokens=n))
    assert gen.tokens == ref[len(prompt) : len(prompt) + n]
    assert gen.accepted_per_step == [1] * n and gen.accepted_per_position == [0, 0, 0]


def test_cache_after_each_step_is_the_committed_prefix(engine):
    """The verifier's cache never keeps a pseudo row: after the loop it is a plain prefill."""
    prompt = PROMPTS[1]
    ref = prompt + ar(engine, prompt, StopRule(max_new_tokens=20))
    seen = []

    class Spy(HiddenTransfer.verifier_class):
        def verify(self, tree, accept=None, inject=None):
            step = super().verify(tree, accept, inject)
            seen.append((list(self.cache.inner.layers), list(self.seq)))
            check_cache(self.engine, self.cache, self.seq[:-1])
            return step

    m = method(engine, OracleTransfer(engine, ref), tree="small")
    m.verifier_class = Spy
    assert m.generate(prompt, StopRule(max_new_tokens=20)).tokens == ref[len(prompt) :]
    assert len(seen) >= 4


def test_stops_inside_an_accepted_path(engine):
    prompt = PROMPTS[1]
    ref = prompt + ar(engine, prompt, StopRule(max_new_tokens=30))
    out = ref[len(prompt) :]
    m = method(engine, OracleTransfer(engine, ref), tree="chain")
    # max_new_tokens = 6: the prefill gives 1, the first step 4, the second is cut after 1
    gen = m.generate(prompt, StopRule(max_new_tokens=6))
    assert gen.tokens == out[:6] and gen.accepted_per_step == [1, 4, 1]
    # EOS in the middle of the second step's path: nothing after it
    at = next(i for i in range(6, 9) if out[i] not in out[:i])
    stop = StopRule(max_new_tokens=30, eos_ids=frozenset({out[at]}))
    gen = m.generate(prompt, stop)
    assert gen.tokens == out[: at + 1] == ar(engine, prompt, stop)
    assert gen.accepted_per_step == [1, 4, at + 1 - 5] and gen.stop_reason == "eos"


def test_a_random_qwen2_model(tokenizer):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=0, eos_token_id=1)  # fmt: skip
    engine = Engine.from_model(Qwen2ForCausalLM(cfg).eval(), tokenizer)
    stop = StopRule(max_new_tokens=25)
    for attend_rows in (False, True):
        m = method(engine, random_transfer(engine, attend_rows), tree="small")
        for prompt in PROMPTS:
            assert m.generate(prompt, stop).tokens == ar(engine, prompt, stop)
        ref = PROMPTS[0] + ar(engine, PROMPTS[0], stop)
        gen = method(engine, OracleTransfer(engine, ref, attend_rows), tree="chain").generate(PROMPTS[0], stop)
        assert gen.tokens == ref[len(PROMPTS[0]) :]
        if attend_rows:
            assert max(gen.accepted_per_step) == 4


# ---- sampling ---------------------------------------------------------------------------------
def test_sampling_matches_the_target_distribution():
    """The law of the first five tokens on an 8-token model (tests/sampling_law.py), with the
    executed negative control: the verifier that resamples from p after rejecting every child."""
    model = tiny_model(8, seed=3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1)  # fmt: skip
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # peaked distributions: acceptance matters
    engine, prompt = Engine.from_model(model, None), [0, 3, 5, 7]
    transfer = random_transfer(engine, True, k=2)
    cfg = FirpConfig(choices=[[0], [1], [0, 0]])
    m = Firp(cfg, engine, SAMPLING, transfer=transfer)
    pvalue, multi_step = sampled_pvalue(m, engine, RUNS, length=5, prompt=prompt)
    assert pvalue > PVALUE_FLOOR and multi_step == 1.0
    control = Firp(cfg, engine, SAMPLING, transfer=transfer)
    control.verifier_class = WrongResidualVerifier
    assert sampled_pvalue(control, engine, CONTROL_RUNS, length=5, prompt=prompt)[0] < PVALUE_FLOOR


# ---- bad input, the format on disk ----------------------------------------------------------------
def test_bad_settings_are_refused(engine, tmp_path):
    with pytest.raises(TreeError, match="3 deep but the transfer layers make only 2"):
        method(engine, random_transfer(engine, False, k=2), tree="chain")
    save_transfer(random_transfer(engine, False), tmp_path / "ht")
    with pytest.raises(TransferError, match="firp needs transfer layers trained with attend_rows=True"):
        Firp(FirpConfig(transfer=str(tmp_path / "ht")), engine, GREEDY)
    with pytest.raises(TransferError, match="no transfer layers in"):
        HiddenTransfer(HiddenTransferConfig(transfer=str(tmp_path / "none")), engine, GREEDY)
    with pytest.raises(TransferError, match="map 64-wide states, the model's are 128"):
        load_transfer(tmp_path / "ht", hidden_size=128, num_layers=2)


def test_saved_transfer_loads_in_fp16_and_decodes_exactly(engine, tmp_path):
    layers = random_transfer(engine, False)
    save_transfer(layers, tmp_path)
    loaded = load_transfer(tmp_path, hidden_size=64, num_layers=2)
    assert loaded.config == layers.config
    h = torch.randn(4, 64)
    torch.testing.assert_close(loaded(h), layers(h), atol=2e-2, rtol=1e-2)  # fp16 on disk
    m = HiddenTransfer(HiddenTransferConfig(transfer=str(tmp_path)), engine, GREEDY)
    stop = StopRule(max_new_tokens=10)
    assert m.generate(PROMPTS[0], stop).tokens == ar(engine, PROMPTS[0], stop)


# ---- training -----------------------------------------------------------------------------------
def test_training_reduces_loss_resumes_and_exports(model_dir, tmp_path):
    import numpy as np

    from harness.train.hidden_transfer import (TransferTrainConfig, load_target, new_layers, run_transfer_training,
                                               transfer_loss_fn)  # fmt: skip
    from harness.train.loop import TrainLoopConfig, train

    cfg = TransferTrainConfig(preset="firp", base=str(model_dir), layer=1, k=2)
    engine = load_target(cfg.base)
    layers = new_layers(engine, cfg)
    assert layers.config.attend_rows
    loss_fn = transfer_loss_fn(engine, [1.0, 0.8], count=8)
    torch.manual_seed(0)
    batch = torch.randint(3, 250, (2, 24))
    torch.manual_seed(0)
    with torch.no_grad():
        before, labels = loss_fn(layers, batch)
    assert labels == 2 * 8 * 2  # rows x anchors x k
    loop = TrainLoopConfig(lr=2e-2, warmup_steps=0, max_steps=30, progress=False, weight_decay=0.0)
    train(layers, loss_fn, Repeat(batch), loop, tmp_path / "fit", log=lambda s: None)
    torch.manual_seed(0)
    assert float(loss_fn(layers, batch)[0].detach()) < 0.9 * float(before)
    assert all(not p.requires_grad for p in engine.model.parameters())  # the target stays frozen

    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "train.npy", np.random.default_rng(0).integers(3, 250, 3000).astype(np.uint16))
    cfg = TransferTrainConfig(preset="hidden-transfer", base=str(model_dir), data="corpus", data_dir=str(data),
                              out_dir=str(tmp_path / "ckpt"), export_dir=str(tmp_path / "export"), layer=1, k=2,
                              batch_size=2, seq_len=32, anchors=4, max_steps=3, max_minutes=0, warmup_steps=1,
                              progress=False, eval_problems=2, eval_tokens=6)  # fmt: skip
    first, _ = run_transfer_training(cfg, log=lambda s: None)
    cfg.max_steps = 5
    second, summary = run_transfer_training(cfg, log=lambda s: None)
    assert (first.step, second.resumed_from, second.step) == (3, 3, 5)
    acc = summary["export"]["acceptance"]
    assert acc["problems"] == 2 and len(acc["chain_acceptance"]) == 2 and acc["anchors"] > 0
    assert acc["chain_acceptance"][1] <= acc["chain_acceptance"][0] and acc["chain_acceptance"][1] <= acc["top1"][1]
    shipped = load_transfer(tmp_path / "export", hidden_size=64, num_layers=2)
    assert (shipped.config.layer, shipped.config.k, shipped.config.attend_rows) == (1, 2, False)
    assert "row 2 (t+3)" in (tmp_path / "export" / "README.md").read_text()
    # a checkpoint of other maps is refused, naming the fix
    cfg.k = 3
    with pytest.raises(ValueError, match="use another out_dir"):
        run_transfer_training(cfg, log=lambda s: None)
    with pytest.raises(ValueError, match="labels='x': choose argmax"):
        transfer_loss_fn(engine, [1.0], 2, labels="x")
    cfg.preset = "medusa"
    with pytest.raises(ValueError, match="unknown preset 'medusa'"):
        run_transfer_training(cfg, log=lambda s: None)


def test_steps_stay_inside_the_context(tokenizer):
    """With prompt + max_new_tokens + headroom equal to the context, the last step's deepest pseudo
    row sits at its last position (a 3-deep chain, k = 3: headroom 5)."""

    class PositionLog(Engine):
        highest = -1

        def forward(self, ids, cache, positions=None, mask=None, inject=None, **kw):
            pos = [len(cache) + torch.as_tensor(ids).numel() - 1] if positions is None else torch.as_tensor(positions).tolist()
            rows = inject.positions.tolist() if inject is not None else []
            self.highest = max(self.highest, *pos, *rows)
            return super().forward(ids, cache, positions=positions, mask=mask, inject=inject, **kw)

    prompt, n = PROMPTS[0], 20
    context = len(prompt) + n + 5
    model = tiny_model(len(tokenizer), max_position_embeddings=context)
    engine = PositionLog(model, tokenizer, Engine.from_model(model, tokenizer).cfg, torch.device("cpu"))
    m = method(engine, random_transfer(engine, False), tree="chain")
    assert m.headroom() == 5
    gen = m.generate(prompt, StopRule(n))
    assert len(gen.tokens) == n and gen.accepted_per_step[-1] == 1  # the last step started one token short
    assert engine.highest == context - 1
    with pytest.raises(ValueError, match="5 positions for hidden-transfer's steps exceed the model's context"):
        m.generate(prompt, StopRule(n + 1))
