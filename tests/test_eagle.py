"""EAGLE, EAGLE-2, EAGLE-3: the heads' released formats loaded strictly, the head's cache and tree
masks against a from-scratch forward, equality with greedy autoregressive decoding (random and
oracle heads; HumanEval-X-like prompts), EOS / max_new_tokens inside an accepted block, stats,
and EAGLE-3's sampling mode seeded and labelled lossless (the sampling law every method keeps:
tests/test_conformance.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from harness.config import SamplingConfig
from harness.drafters.eagle import (DecodingHeadCache, EagleHead, EagleHeadConfig, EagleHeadError, HeadCache,
                                    default_fused_layers, load_head, save_head, vocab_map)  # fmt: skip
from harness.engine import Engine
from harness.stops import StopRule
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.eagle import TREES, Eagle, EagleConfig, HeadDrafter
from methods.eagle2 import Eagle2, Eagle2Config
from methods.eagle3 import Eagle3, Eagle3Config
from methods.tree import TreeError

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5, 23], [0, 200, 11, 11, 64, 150, 7, 9, 250, 33], [0, 3]]
HUMANEVAL_X = [
    'def has_close_elements(numbers, threshold):\n    """Check if any two numbers are closer than threshold."""\n',
    "#include <vector>\nusing namespace std;\nbool has_close_elements(vector<float> numbers, float threshold){\n",
    "package main\n\nimport \"math\"\n\nfunc HasCloseElements(numbers []float64, threshold float64) bool {\n",
]


def random_head(engine: Engine, version: int, seed: int = 1, **overrides) -> EagleHead:
    torch.manual_seed(seed)
    head = EagleHead(EagleHeadConfig.from_target(engine.config, version, **overrides))
    if head.config.maps_vocab:
        head.set_vocab_map(torch.arange(0, 2 * head.config.draft_vocab_size, 2))
    return head.eval()


class OracleHead(EagleHead):
    """A head that knows the reference sequence ``ref`` (prompt + continuation): the pair at
    position p ranks ref[p + 2] at ``rank(p)`` (0 = its best guess, None = not in its top)
    among fixed arbitrary scores. It runs the real head underneath so the cache grows as usual;
    its output carries the position."""

    def __init__(self, engine: Engine, ref: list[int], version: int = 1, rank=lambda p: 0):
        cfg = EagleHeadConfig.from_target(engine.config, version, draft_vocab_size=engine.config.vocab_size)
        super().__init__(cfg)
        self.ref, self.rank = ref, rank
        self.scores = torch.randn(cfg.vocab_size, generator=torch.Generator().manual_seed(5))
        self.eval()

    def forward(self, features, input_ids, embed, positions, cache=None, mask=None):
        out = super().forward(features, input_ids, embed, positions, cache, mask)
        pos = torch.as_tensor(positions).reshape(-1, input_ids.shape[1]).expand_as(input_ids)
        return torch.zeros_like(out) + pos[..., None].to(out.dtype)

    def logits(self, hidden, target_lm_head):
        out = self.scores.expand(*hidden.shape[:-1], -1).clone()
        flat, pos = out.view(-1, out.shape[-1]), hidden[..., 0].round().long().flatten().tolist()
        for row, p in enumerate(pos):
            if p + 2 < len(self.ref) and self.rank(p) is not None:
                t, r = self.ref[p + 2], self.rank(p)
                others = torch.cat((self.scores[:t], self.scores[t + 1 :])).sort(descending=True).values
                flat[row, t] = others[0] + 5 if r == 0 else others[r - 1 : r + 1].mean()
            elif p + 2 < len(self.ref):
                flat[row, self.ref[p + 2]] = self.scores.min() - 1
        return out


def ar(engine: Engine, prompt: list[int], stop: StopRule):
    return Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop)


def methods(engine: Engine, v1: EagleHead, v3: EagleHead, sampling=GREEDY) -> list:
    made = [Eagle(EagleConfig(tree=t), engine, sampling, head=v1) for t in TREES]
    made.append(Eagle2(Eagle2Config(), engine, sampling, head=v1))
    made.append(Eagle2(Eagle2Config(top_k=2, depth=3, total_tokens=5, stop_below=0.0), engine, sampling, head=v1))  # as published
    made.append(Eagle2(Eagle2Config(top_k=2, depth=5, total_tokens=12, stop_below=0.3), engine, sampling, head=v1))
    made.append(Eagle3(Eagle3Config(), engine, sampling, head=v3))
    return made


def check_stats(gen) -> None:
    assert sum(gen.accepted_per_step) == len(gen.tokens)
    assert len(gen.accepted_per_step) == gen.target_forwards
    assert all(n >= 1 for n in gen.accepted_per_step)
    steps = gen.target_forwards - 1
    assert gen.draft_forwards >= steps  # every verify step is drafted by at least one head forward


# ---- the head ------------------------------------------------------------------------------------
def test_fused_layer_defaults():
    assert default_fused_layers(32) == (2, 16, 29)  # upstream's 2, N//2, N-3
    assert default_fused_layers(7) == (2, 3, 4)
    assert default_fused_layers(6) == (1, 3, 4)  # 2, 3, 3 would repeat a layer
    assert default_fused_layers(2) == (0, 1, 2)
    with pytest.raises(EagleHeadError, match="at least 2 layers"):
        default_fused_layers(1)


def test_vocab_map_takes_the_most_frequent_ids_in_order():
    counts = torch.tensor([5, 0, 9, 9, 1, 7])
    assert vocab_map(counts, 3).tolist() == [2, 3, 5]


@pytest.mark.parametrize("version", [1, 3])
def test_head_drafter_cache_and_masks_equal_a_full_forward(engine, version):
    """The drafter's incremental, tree-masked, rolled-back forwards give the same outputs as one
    causal forward over the committed pairs followed by a node's drafted ancestors."""
    head = random_head(engine, version, draft_vocab_size=engine.config.vocab_size)
    embed = engine.model.get_input_embeddings()
    width = head.config.feature_size
    feats = torch.randn(9, width, generator=torch.Generator().manual_seed(2))
    ids = [5, 9, 13, 40, 41, 77, 3, 8, 21]

    def fresh(rows: torch.Tensor, tokens: list[int]) -> torch.Tensor:
        """Outputs of a causal forward with no cache; row i is (rows[i], tokens[i])."""
        return head(rows[None], torch.tensor([tokens]), embed, torch.arange(len(tokens)))[0]

    d = HeadDrafter(head, engine)
    d.add(feats[:5], ids[:5])
    d.start(ids[4])
    a, b = d.node(0, 60), d.node(0, 61)
    d.expand([a, b])
    c = d.node(a, 62)
    d.expand([c])
    out_c = d.out[c]
    tree = d.finish()
    assert len(d.cache) == 5 and tree.parents == (-1, 0, 0, 1)
    # c = pair (output of a, 62) after a = pair (output at the root, 60); EAGLE-3 reads target
    # features through fc and its own outputs as they are, so its rows are given h wide here
    rows = head.fc(feats[:5]) if version == 3 else feats[:5]
    base = fresh(feats[:5], ids[:5])
    with_a = fresh(torch.cat((rows, base[-1:])), ids[:5] + [60])
    full = fresh(torch.cat((rows, base[-1:], with_a[-1:])), ids[:5] + [60, 62])
    torch.testing.assert_close(out_c, full[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d.out[b], fresh(torch.cat((rows, base[-1:])), ids[:5] + [61])[-1], atol=1e-5, rtol=1e-5)
    # the next step: the pending pairs run after the committed ones, the draft entries gone
    d.add(feats[5:], ids[5:])
    d.start(ids[-1])
    torch.testing.assert_close(d.out[0], fresh(feats, ids)[-1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("version", [1, 3])
def test_lean_decoding_forward_equals_the_plain_one(engine, version):
    """for_decoding (fused q|k|v and gate|up, RoPE from a table, the LM head's weight transposed,
    EAGLE-3's vocabulary map tabulated) gives the plain forward's outputs and logits (float noise
    at most) through a prompt, a tree-masked forward and a longer run; the RoPE table is built
    once and reused while it covers the positions, grown when it does not."""
    sizes = {"draft_vocab_size": 100} if version == 3 else {}  # EAGLE-3: a draft vocabulary mapped to the target's
    lm_head = engine.model.get_output_embeddings()
    plain = random_head(engine, version, attention_bias=True, **sizes)
    lean = random_head(engine, version, attention_bias=True, **sizes).for_decoding(lm_head)
    embed = engine.model.get_input_embeddings()
    gen = torch.Generator().manual_seed(3)
    caches = (DecodingHeadCache(), DecodingHeadCache())

    def both(rows: int, positions: torch.Tensor, mask=None) -> None:
        feats = torch.randn(1, rows, plain.config.feature_size, generator=gen)
        ids = torch.randint(0, engine.config.vocab_size, (1, rows), generator=gen)
        a, b = (h(feats, ids, embed, positions, c, mask) for h, c in zip((plain, lean), caches))
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(plain.target_logits(a, lm_head), lean.target_logits(a, lm_head), atol=1e-5, rtol=1e-5)

    both(7, torch.arange(7))
    table = lean.rope_table
    tree = torch.ones(3, 10, dtype=torch.bool).tril(7)  # nodes a, b (siblings) and c (a's child)
    tree[1, 7] = tree[2, 8] = False  # b does not see a; c does not see b
    both(3, torch.tensor([7, 7, 8]), tree)
    assert lean.rope_table is table and table[0].shape[0] == 256
    both(300, torch.arange(10, 310))
    assert lean.rope_table is not table and lean.rope_table[0].shape[0] == 512
    assert plain.rope_table is None  # the plain forward computes RoPE per call
    # RoPE rotates: attention sees relative positions only, so shifted positions give the same outputs
    feats = torch.randn(1, 6, plain.config.feature_size, generator=gen)
    ids = torch.randint(0, engine.config.vocab_size, (1, 6), generator=gen)
    for head in (plain, lean):
        near, far = (head(feats, ids, embed, torch.arange(6) + shift, DecodingHeadCache()) for shift in (0, 40))
        torch.testing.assert_close(near, far, atol=1e-4, rtol=1e-4)
    assert lean.lm_transposed[1].shape == (lean.lm_transposed[0].weight.shape[1], lean.lm_transposed[0].weight.shape[0])


def test_head_cache_keep_and_truncate():
    cache = HeadCache()
    keys = torch.arange(6.0).view(1, 1, 6, 1)
    cache.append(0, keys, keys + 10)
    cache.keep([0, 2, 5])
    assert cache.keys[0].flatten().tolist() == [0, 2, 5] and cache.values[0].flatten().tolist() == [10, 12, 15]
    cache.truncate(1)
    assert len(cache) == 1
    with pytest.raises(ValueError):
        cache.truncate(3)


def test_decoding_head_cache_rolls_back_by_length_and_grows():
    """The decoding cache agrees with HeadCache through appends past its capacity, keep and
    truncate; a truncate moves the length only (the buffer is the same object, not rebuilt)."""
    plain, fast = HeadCache(), DecodingHeadCache()
    for step in range(5):  # 5 x 20 entries: past the first buffer's 64
        keys = torch.arange(20.0).view(1, 1, 20, 1) + 100 * step
        for cache in (plain, fast):
            k, v = cache.append(0, keys, keys + 0.5)
        assert torch.equal(k, plain.keys[0]) and torch.equal(v, plain.values[0])
    assert len(fast) == 100 and fast.keys[0].shape[2] >= 100
    buffer = fast.keys[0]
    for cache in (plain, fast):
        cache.truncate(90)
    assert fast.keys[0] is buffer and len(fast) == 90
    for cache in (plain, fast):
        cache.keep([0, 5, 89])
    assert fast.layer(0)[0].flatten().tolist() == plain.keys[0].flatten().tolist() == [0, 5, 409]
    assert fast.layer(0)[1].flatten().tolist() == [0.5, 5.5, 409.5]
    with pytest.raises(ValueError):
        fast.truncate(4)


@pytest.mark.parametrize("make", [lambda e, v1, v3: Eagle(EagleConfig(), e, GREEDY, head=v1),
                                  lambda e, v1, v3: Eagle2(Eagle2Config(), e, GREEDY, head=v1),
                                  lambda e, v1, v3: Eagle3(Eagle3Config(), e, GREEDY, head=v3)])  # fmt: skip
def test_head_forwards_are_timed_as_draft_forwards(engine, make):
    """The runner times Method.draft_timers(): every head forward is one timed draft call (so the
    step cost counts it), and none lands on the target's timer, which times prefill + verifies."""
    method = make(engine, random_head(engine, 1), random_head(engine, 3, seed=2))
    (clock,) = method.draft_timers()
    engine.start_timing()
    clock.start_timing()
    gen = method.generate(PROMPTS[1], StopRule(12, frozenset()))
    drafts, targets = clock.stop_timing(), engine.stop_timing()
    assert len(drafts) == gen.draft_forwards > 0
    assert len(targets) == gen.target_forwards
    assert all(seconds >= 0 for _, seconds in drafts)


def test_phase_clock_splits_a_step_exclusively(engine):
    """With a PhaseClock attached, every phase a tree step names is entered, nested phases pause
    the outer one (a head forward inside tree building is draft only), and the phases never add
    up to more than the wall time; detached, nothing is recorded."""
    from harness.engine import PHASES, PhaseClock

    method = Eagle2(Eagle2Config(), engine, GREEDY, head=random_head(engine, 1))
    clock = PhaseClock()
    engine.phases = clock
    try:
        start = engine.clock()
        method.generate(PROMPTS[1], StopRule(12, frozenset()))
        wall = engine.clock() - start
    finally:
        engine.phases = None
    assert set(clock.seconds) == set(PHASES) and not clock.stack
    assert sum(clock.seconds.values()) <= wall
    method.generate(PROMPTS[1], StopRule(12, frozenset()))
    assert sum(clock.seconds.values()) <= wall  # detached: unchanged


# ---- released formats, strictly -------------------------------------------------------------------
V1_LAYER = ["self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
            "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "post_attention_layernorm.weight"]  # fmt: skip
V3_LAYER = V1_LAYER + ["hidden_norm.weight", "input_layernorm.weight"]


def released_v1(engine: Engine, bias: bool) -> tuple[dict, dict]:
    """An EAGLE-1/2 checkpoint as SafeAILab releases them (EAGLE-Vicuna: fc with bias, no "bias"
    field; EAGLE-LLaMA3: "bias": false), with the embedding copy upstream's dumps carry."""
    c = engine.config
    h, inter = c.hidden_size, c.intermediate_size
    kv = c.num_key_value_heads * h // c.num_attention_heads
    g = torch.Generator().manual_seed(11)
    shapes = {"self_attn.q_proj.weight": (h, h), "self_attn.k_proj.weight": (kv, h), "self_attn.v_proj.weight": (kv, h),
              "self_attn.o_proj.weight": (h, h), "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h),
              "mlp.down_proj.weight": (h, inter), "post_attention_layernorm.weight": (h,)}  # fmt: skip
    state = {f"layers.0.{k}": (0.05 * torch.randn(s, generator=g)).half() for k, s in shapes.items()}
    state["fc.weight"] = (0.05 * torch.randn(h, 2 * h, generator=g)).half()
    if bias:
        state["fc.bias"] = torch.zeros(h).half()
    state["embed_tokens.weight"] = engine.model.get_input_embeddings().weight.detach().half().clone()
    config = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
              "hidden_size": h, "initializer_range": 0.02, "intermediate_size": inter, "max_position_embeddings": 512,
              "model_type": "llama", "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "pad_token_id": 0,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "torch_dtype": "float16",
              "transformers_version": "4.28.1", "use_cache": True, "vocab_size": c.vocab_size}  # fmt: skip
    if not bias:
        config.update(bias=False, rope_theta=10000.0)
    return state, config


def released_v3(engine: Engine, draft_vocab: int) -> tuple[dict, dict]:
    """An EAGLE-3 checkpoint as released (LlamaForCausalLMEagle3; d2t int64, t2d bool)."""
    c = engine.config
    h, inter = c.hidden_size, c.intermediate_size
    hd = c.hidden_size // c.num_attention_heads
    q, kv = c.num_attention_heads * hd, c.num_key_value_heads * hd
    g = torch.Generator().manual_seed(12)
    shapes = {"self_attn.q_proj.weight": (q, 2 * h), "self_attn.k_proj.weight": (kv, 2 * h),
              "self_attn.v_proj.weight": (kv, 2 * h), "self_attn.o_proj.weight": (h, q),
              "mlp.gate_proj.weight": (inter, h), "mlp.up_proj.weight": (inter, h), "mlp.down_proj.weight": (h, inter),
              "post_attention_layernorm.weight": (h,), "hidden_norm.weight": (h,), "input_layernorm.weight": (h,)}  # fmt: skip
    state = {f"midlayer.{k}": (0.05 * torch.randn(s, generator=g)).half() for k, s in shapes.items()}
    state["fc.weight"] = (0.05 * torch.randn(h, 3 * h, generator=g)).half()
    state["norm.weight"] = torch.ones(h).half()
    state["lm_head.weight"] = (0.05 * torch.randn(draft_vocab, h, generator=g)).half()
    ids = torch.arange(0, 2 * draft_vocab, 2)
    state["d2t"] = ids - torch.arange(draft_vocab)
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    state["t2d"] = t2d
    config = {"architectures": ["LlamaForCausalLMEagle3"], "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
              "hidden_size": h, "initializer_range": 0.02, "intermediate_size": inter, "max_position_embeddings": 512,
              "model_type": "llama", "num_attention_heads": c.num_attention_heads,
              "num_key_value_heads": c.num_key_value_heads, "num_hidden_layers": 1, "pad_token_id": 0,
              "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float16",
              "transformers_version": "4.28.1", "use_cache": True, "vocab_size": c.vocab_size,
              "draft_vocab_size": draft_vocab}  # fmt: skip
    return state, config


def write(path, state: dict, config: dict, fmt: str = "bin"):
    path.mkdir(parents=True, exist_ok=True)
    if fmt == "bin":
        torch.save(state, path / "pytorch_model.bin")
    else:
        from safetensors.torch import save_file

        save_file(state, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.mark.parametrize("bias", [True, False])
def test_released_eagle1_loads(engine, tmp_path, bias):
    state, config = released_v1(engine, bias)
    head, cfg = load_head(write(tmp_path, state, config), engine.config)
    assert cfg.version == 1 and cfg.fc_bias is bias and cfg.num_layers == 1
    loaded = head.state_dict()
    assert set(loaded) == set(state) - {"embed_tokens.weight"}
    for k, v in loaded.items():
        assert torch.equal(v, state[k].float()), k
    assert Eagle(EagleConfig(tree="chain"), engine, GREEDY, head=head).generate(PROMPTS[0], StopRule(12)).tokens == \
        ar(engine, PROMPTS[0], StopRule(12)).tokens  # fmt: skip


@pytest.mark.parametrize("fmt", ["bin", "sglang"])
def test_released_eagle3_loads(engine, tmp_path, fmt):
    state, config = released_v3(engine, draft_vocab=100)
    if fmt == "sglang":  # as SGLang / vLLM also take it: safetensors, "model." prefix, no t2d
        state = {("model." + k if k not in ("lm_head.weight", "d2t") else k): v for k, v in state.items() if k != "t2d"}
    head, cfg = load_head(write(tmp_path, state, config, "bin" if fmt == "bin" else "st"), engine.config)
    assert cfg.version == 3 and cfg.draft_vocab_size == 100 and cfg.fused_layers == default_fused_layers(2)
    assert head.to_target(torch.tensor([0, 1, 99])).tolist() == [0, 2, 198]
    assert bool(head.t2d[198]) and not bool(head.t2d[199])
    gen = Eagle3(Eagle3Config(), engine, GREEDY, head=head).generate(PROMPTS[1], StopRule(12))
    assert gen.tokens == ar(engine, PROMPTS[1], StopRule(12)).tokens


def corrupt(state: dict, how: str) -> str:
    """Damage ``state`` one way; returns the key the error must name."""
    if how == "missing":
        del state["layers.0.mlp.up_proj.weight"]
        return "layers.0.mlp.up_proj.weight"
    if how == "unexpected":
        state["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
        return "layers.0.self_attn.rotary_emb.inv_freq"
    if how == "shape":
        state["layers.0.self_attn.k_proj.weight"] = state["layers.0.self_attn.k_proj.weight"][:-1]
        return "layers.0.self_attn.k_proj.weight"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing", "unexpected", "shape"])
def test_corrupted_eagle1_is_refused_naming_the_key(engine, tmp_path, how):
    state, config = released_v1(engine, bias=True)
    key = corrupt(state, how)
    with pytest.raises(EagleHeadError, match=f"'{key}'"):
        load_head(write(tmp_path, state, config), engine.config)


@pytest.mark.parametrize("key", ["midlayer.hidden_norm.weight", "lm_head.weight", "d2t", "t2d"])
def test_corrupted_eagle3_is_refused_naming_the_key(engine, tmp_path, key):
    state, config = released_v3(engine, draft_vocab=100)
    if key == "t2d":  # present but disagreeing with d2t
        state["t2d"][1] = True
    elif key == "lm_head.weight":  # rows for another draft vocabulary size
        state[key] = state[key][:50]
    else:
        del state[key]
    with pytest.raises(EagleHeadError, match=f"'{key}'"):
        load_head(write(tmp_path, state, config), engine.config)


def test_head_that_does_not_fit_the_target_is_refused(engine, tmp_path):
    state, config = released_v1(engine, bias=True)
    with pytest.raises(EagleHeadError, match="vocabulary of 999"):
        load_head(write(tmp_path / "a", state, {**config, "vocab_size": 999}), engine.config)
    state3, config3 = released_v3(engine, draft_vocab=100)
    bad = {**config3, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1, 7]}}
    with pytest.raises(EagleHeadError, match="fuses layers"):
        load_head(write(tmp_path / "b", state3, bad), engine.config)
    with pytest.raises(EagleHeadError, match="EAGLE-3 head but .* EAGLE-1/2 keys"):
        load_head(write(tmp_path / "c", state, config3), engine.config)
    with pytest.raises(EagleHeadError, match="no EAGLE head at"):
        load_head(tmp_path / "nowhere", engine.config)
    with pytest.raises(EagleHeadError, match="cannot fetch EAGLE head"):  # tests run with HF_HUB_OFFLINE=1
        load_head("nobody/no-such-eagle-head", engine.config)
    head, _ = load_head(write(tmp_path / "d", state3, config3), engine.config)
    with pytest.raises(ValueError, match="reads an EAGLE-1 head, got EAGLE-3"):
        Eagle(EagleConfig(), engine, GREEDY, head=head)


@pytest.mark.parametrize("version", [1, 3])
def test_save_then_load_round_trip(engine, tmp_path, version):
    head = random_head(engine, version, draft_vocab_size=120)
    save_head(head, head.config, tmp_path, dtype=torch.float32, extra={"steps": 3})
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["harness"] == {"steps": 3}
    loaded, cfg = load_head(tmp_path, engine.config)
    assert cfg == head.config
    for k, v in head.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# ---- losslessness -----------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
def test_random_heads_equal_greedy_autoregressive(engine, prompt):
    stop = StopRule(max_new_tokens=30)
    ref = ar(engine, prompt, stop).tokens
    for method in methods(engine, random_head(engine, 1), random_head(engine, 3, draft_vocab_size=150)):
        gen = method.generate(prompt, stop)
        assert gen.tokens == ref, (method.cfg.name, method.describe())
        check_stats(gen)


def test_humaneval_x_prompts_equal_greedy_autoregressive(engine, tokenizer):
    stop = StopRule(max_new_tokens=24)
    v1, v3 = random_head(engine, 1, seed=2), random_head(engine, 3, seed=2, draft_vocab_size=150)
    for text in HUMANEVAL_X:
        prompt = tokenizer(text).input_ids
        ref = ar(engine, prompt, stop).tokens
        for method in methods(engine, v1, v3):
            assert method.generate(prompt, stop).tokens == ref, (text[:12], method.cfg.name)


@pytest.mark.parametrize("version", [1, 3])
def test_oracle_head_accepts_whole_paths(engine, version):
    """Always right: every step commits the tree's depth + 1 tokens (chain of 5 for eagle;
    depth 5 for eagle2/3), so 40 tokens take the prefill plus 7 steps."""
    prompt, stop = PROMPTS[1], StopRule(max_new_tokens=40)
    ref = ar(engine, prompt, stop).tokens
    head = OracleHead(engine, prompt + ref, version)
    deep = {"depth": 5, "total_tokens": 24, "stop_below": 0.0}  # five levels, whatever the defaults are
    made = [Eagle3(Eagle3Config(**deep), engine, GREEDY, head=head)] if version == 3 else \
        [Eagle(EagleConfig(tree="chain"), engine, GREEDY, head=head), Eagle2(Eagle2Config(**deep), engine, GREEDY, head=head)]  # fmt: skip
    for method in made:
        gen = method.generate(prompt, stop)
        assert gen.tokens == ref
        assert gen.accepted_per_step == [1] + [6] * 6 + [3]
        assert gen.accepted_per_position == [7, 7, 6, 6, 6]  # the last step had room for 2 draft tokens
        check_stats(gen)


@pytest.mark.parametrize("rank", [lambda p: None, lambda p: [0, 0, 1, None, 2, 0, 3][p % 7]])
def test_oracle_sometimes_or_never_right_still_exact(engine, rank):
    prompt, stop = PROMPTS[0], StopRule(max_new_tokens=36)
    ref = ar(engine, prompt, stop).tokens
    head = OracleHead(engine, prompt + ref, rank=rank)
    for method in (Eagle(EagleConfig(tree="medium"), engine, GREEDY, head=head), Eagle2(Eagle2Config(), engine, GREEDY, head=head)):
        gen = method.generate(prompt, stop)
        assert gen.tokens == ref
        check_stats(gen)
        never = rank(0) is None
        assert (max(gen.accepted_per_step) == 1) if never else (max(gen.accepted_per_step) >= 3)


def test_dynamic_depth_stops_drafting_where_the_frontier_is_unlikely(engine):
    """stop_below: a frontier whose summed path probability is below it is not expanded. A random
    head's top-4 hold far less than 0.99 of its probability, so every step drafts one level (the
    root's children: one head forward) and commits at most 2 tokens; 0 drafts all 4 levels.
    Both stay exact."""
    prompt, stop = PROMPTS[0], StopRule(max_new_tokens=30)
    ref = ar(engine, prompt, stop).tokens
    head = random_head(engine, 1, seed=3)
    shallow = Eagle2(Eagle2Config(depth=4, stop_below=0.99), engine, GREEDY, head=head).generate(prompt, stop)
    deep = Eagle2(Eagle2Config(depth=4, stop_below=0.0), engine, GREEDY, head=head).generate(prompt, stop)
    for gen in (shallow, deep):
        assert gen.tokens == ref
        check_stats(gen)
    steps = shallow.target_forwards - 1
    assert shallow.draft_forwards == steps and max(shallow.accepted_per_step) <= 2
    assert deep.draft_forwards > deep.target_forwards - 1  # the frontier expanded (last steps may lack room)
    method = Eagle2(Eagle2Config(stop_below=0.5), engine, GREEDY, head=head)
    assert method.unlikely([math.log(0.3), math.log(0.1)]) and not method.unlikely([math.log(0.3), math.log(0.25)])
    assert not Eagle2(Eagle2Config(stop_below=0.0), engine, GREEDY, head=head).unlikely([-50.0])  # 0: never stops


def test_eos_and_max_new_tokens_inside_an_accepted_block(engine):
    prompt = PROMPTS[1]
    ref = ar(engine, prompt, StopRule(40)).tokens
    head = OracleHead(engine, prompt + ref)
    chain = Eagle(EagleConfig(tree="chain"), engine, GREEDY, head=head)
    # steps commit tokens 1-6, 7-12, ...: an EOS at k in 8..11 is inside the second block
    k = next(k for k in range(8, 12) if ref[k] not in ref[:k])
    eos = frozenset({ref[k]})
    gen = chain.generate(prompt, StopRule(40, eos))
    assert gen.tokens == ref[: k + 1] and gen.stop_reason == "eos" and gen.accepted_per_step[-1] == k - 6
    assert gen.tokens == ar(engine, prompt, StopRule(40, eos)).tokens
    check_stats(gen)
    # max_new_tokens: the last step drafts only what still fits (1 token + the target's)
    gen = chain.generate(prompt, StopRule(9))
    assert gen.tokens == ref[:9] and gen.stop_reason == "max_new_tokens" and gen.accepted_per_step == [1, 6, 2]
    check_stats(gen)


def test_bad_settings_are_refused(engine):
    head = random_head(engine, 1)
    with pytest.raises(TreeError, match="unknown EAGLE tree"):
        Eagle(EagleConfig(tree="huge"), engine, GREEDY, head=head)
    with pytest.raises(TreeError, match="no parent"):
        Eagle(EagleConfig(choices=[[0], [1, 0]]), engine, GREEDY, head=head)
    with pytest.raises(ValueError, match="candidates"):
        Eagle(EagleConfig(candidates="nucleus"), engine, GREEDY, head=head)
    with pytest.raises(TreeError, match="top_k must be >= 1"):
        Eagle2(Eagle2Config(top_k=0), engine, GREEDY, head=head)
    with pytest.raises(TreeError, match="stop_below must be in"):
        Eagle2(Eagle2Config(stop_below=1.0), engine, GREEDY, head=head)
    with pytest.raises(ValueError, match="must be topk"):
        Eagle2(Eagle2Config(candidates="sampled"), engine, GREEDY, head=head)


# ---- sampling --------------------------------------------------------------------------------------
def test_eagle3_sampling_runs_seeded_and_lossless_label(engine):
    sampling = SamplingConfig(do_sample=True, temperature=0.8)
    method = Eagle3(Eagle3Config(), engine, sampling, head=random_head(engine, 3, draft_vocab_size=150))
    gen = method.generate(PROMPTS[0], StopRule(20), seed=3)
    assert len(gen.tokens) == 20 and not gen.lossy
    assert gen.tokens == method.generate(PROMPTS[0], StopRule(20), seed=3).tokens
    check_stats(gen)
