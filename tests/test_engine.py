"""The engine (harness/engine.py): custom masks, positions, truncate() and keep()."""

from __future__ import annotations

import time

import pytest
import torch

from harness.config import ModelConfig, SamplingConfig
from harness.engine import Engine, ForwardTimer, ModelLoadError, PhaseClock
from harness.stops import StopRule
from methods.autoregressive import Autoregressive, AutoregressiveConfig

PROMPT = [0, 17, 42, 99, 5, 63, 120, 7]


def test_causal_mask_chunk_equals_plain_forward(engine):
    cache_a, cache_b = engine.new_cache(), engine.new_cache()
    engine.forward(PROMPT, cache_a)
    engine.forward(PROMPT, cache_b)
    chunk = [11, 12, 13, 14, 15]
    plain = engine.forward(chunk, cache_a).logits
    n, past = len(chunk), len(PROMPT)
    mask = torch.ones(n, past + n, dtype=torch.bool)
    mask[:, past:] = torch.tril(torch.ones(n, n, dtype=torch.bool))
    custom = engine.forward(chunk, cache_b, positions=list(range(past, past + n)), mask=mask).logits
    assert torch.allclose(plain, custom, atol=1e-5)


def test_block_diagonal_mask_equals_separate_branches(engine):
    a, b = [21, 22, 23], [31, 32]
    past = len(PROMPT)
    cache = engine.new_cache()
    engine.forward(PROMPT, cache)
    n = len(a) + len(b)
    mask = torch.zeros(n, past + n, dtype=torch.bool)
    mask[:, :past] = True
    mask[:3, past : past + 3] = torch.tril(torch.ones(3, 3, dtype=torch.bool))
    mask[3:, past + 3 :] = torch.tril(torch.ones(2, 2, dtype=torch.bool))
    positions = [past, past + 1, past + 2, past, past + 1]  # both branches start after the prompt
    both = engine.forward(a + b, cache, positions=positions, mask=mask).logits
    for branch, rows in ((a, slice(0, 3)), (b, slice(3, 5))):
        alone = engine.new_cache()
        engine.forward(PROMPT, alone)
        ref = engine.forward(branch, alone).logits
        assert torch.allclose(both[rows], ref, atol=1e-5)


def test_truncate_rolls_back(engine):
    cache = engine.new_cache()
    engine.forward(PROMPT, cache)
    first = engine.forward([5], cache).logits
    engine.forward([6, 7, 8], cache)
    cache.truncate(len(PROMPT))
    assert len(cache) == len(PROMPT)
    again = engine.forward([5], cache).logits
    assert torch.allclose(first, again, atol=1e-6)
    with pytest.raises(ValueError):
        cache.truncate(100)


def tree_mask(past: int, visible: list[list[int]]) -> torch.Tensor:
    """Row i sees the whole prefix plus the chunk rows listed in visible[i]."""
    mask = torch.zeros(len(visible), past + len(visible), dtype=torch.bool)
    mask[:, :past] = True
    for row, cols in enumerate(visible):
        mask[row, [past + c for c in cols]] = True
    return mask


def test_keep_compacts_chosen_entries(engine):
    """After keep(), the cache equals one that was fed only the kept tokens."""
    past = len(PROMPT)
    chain = engine.new_cache()
    engine.forward(PROMPT + [41, 43], chain)

    # A two-branch chunk: 99 (dropped sibling) | 41 -> 43. The kept entries sit at
    # chunk rows 1 and 2, so keep() has to move both one place to the left.
    tree = engine.new_cache()
    engine.forward(PROMPT, tree)
    engine.forward([99, 41, 43], tree, positions=[past, past, past + 1], mask=tree_mask(past, [[0], [1], [1, 2]]))
    tree.keep(list(range(past)) + [past + 1, past + 2])
    assert len(tree) == past + 2
    for lt, lc in zip(tree.inner.layers, chain.inner.layers):
        assert torch.allclose(lt.keys, lc.keys, atol=1e-5)
        assert torch.allclose(lt.values, lc.values, atol=1e-5)
    assert torch.allclose(engine.forward([7], tree).logits, engine.forward([7], chain).logits, atol=1e-5)

    # Entries already in place are not touched: keep the first branch, drop the second.
    in_place = engine.new_cache()
    engine.forward(PROMPT, in_place)
    engine.forward([41, 43, 99], in_place, positions=[past, past + 1, past], mask=tree_mask(past, [[0], [0, 1], [2]]))
    before = in_place.inner.layers[0].keys[:, :, : past + 2].clone()
    in_place.keep(list(range(past + 2)))
    assert torch.equal(in_place.inner.layers[0].keys, before)


def test_keep_rejects_bad_indices(engine):
    cache = engine.new_cache()
    engine.forward(PROMPT, cache)
    with pytest.raises(ValueError):
        cache.keep([0, 2, 1])
    with pytest.raises(ValueError):
        cache.keep([0, 100])


def test_hidden_states_match_logits(engine):
    cache_a, cache_b = engine.new_cache(), engine.new_cache()
    plain = engine.forward(PROMPT, cache_a).logits
    out = engine.forward(PROMPT, cache_b, hidden=True)
    assert out.hidden.shape[0] == len(PROMPT)
    assert torch.allclose(plain, out.logits, atol=1e-5)


class FakeEvent:
    """Stands in for ``torch.cuda.Event`` (no GPU here): a time stamp taken at ``record()``."""

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, end: "FakeEvent") -> float:
        return (end.t - self.t) * 1000  # milliseconds, as CUDA's


def test_forward_timer(engine, monkeypatch):
    # CPU: the monotonic clock around every forward, and around hooked calls of the model
    cache = engine.new_cache()
    engine.start_timing()
    engine.forward(PROMPT, cache)
    engine.forward([7], cache)
    with engine.timing_calls():  # how the hf-* wrappers time transformers' own forwards
        engine.model(input_ids=torch.tensor([[0, 5]]))
    log = engine.stop_timing()
    assert [n for n, _ in log] == [len(PROMPT), 1, 2] and all(s > 0 for _, s in log)
    assert engine.timer is None and engine.stop_timing() == []
    with engine.timing_calls():  # timing off: no hooks, nothing recorded
        engine.model(input_ids=torch.tensor([[0, 5]]))
    assert not engine.model._forward_hooks and not engine.model._forward_pre_hooks
    # under a phase clock alone (harness profile --phases), a hooked call is a forward of the
    # engine's phase, as Engine.forward is
    engine.phases, engine.forward_phase = PhaseClock(), "draft"
    try:
        with engine.timing_calls():
            engine.model(input_ids=torch.tensor([[0, 5]]))
        clock = engine.phases
    finally:
        engine.phases, engine.forward_phase = None, "verify"
    assert set(clock.seconds) == {"draft"} and clock.seconds["draft"] > 0 and not clock.stack
    assert not engine.model._forward_hooks and not engine.model._forward_pre_hooks
    # the CUDA rule, with stand-in events: no synchronisation inside a generation; read()
    # synchronises once, after it, and converts every forward's pair of events
    syncs = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: syncs.append(device))
    engine.timer = ForwardTimer(torch.device("cuda"))
    gen = Autoregressive(AutoregressiveConfig(), engine, SamplingConfig()).generate(PROMPT, StopRule(6))
    assert syncs == [] and len(engine.timer.marks) == gen.target_forwards
    log = engine.stop_timing()
    assert len(syncs) == 1 and [n for n, _ in log] == [len(PROMPT)] + [1] * 5 and all(s > 0 for _, s in log)


def test_load_by_path_and_dtypes(model_dir):
    eng = Engine.load(ModelConfig(path=str(model_dir)))
    assert eng.device.type in ("cpu", "cuda") and eng.model.dtype == torch.float32
    bf = Engine.load(ModelConfig(path=str(model_dir), dtype="bfloat16"))
    assert bf.model.dtype == torch.bfloat16
    assert eng.eos_ids == {1}


def test_load_errors_are_clear(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist; give an existing directory"):
        Engine.load(ModelConfig(path=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        Engine.load(ModelConfig(path=str(tmp_path), dtype="float8"))
