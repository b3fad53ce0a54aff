"""Headroom and model families.

Sliding-window attention (Mistral v0.1's single window, Qwen2 and Gemma 2/3 mixing full and
sliding layers) and Gemma 2's final logit soft-capping, on tiny random models built from
their configs: every method equals transformers' ``generate`` token for token on sequences
several windows long (and the tree and chunk methods do not when the engine leaves the window
out: the test can fail), and the hidden-state path gives the plain path's logits. Then the
context: trees and SPACE chunks never feed a position beyond the model's context, and the
runner refuses such a run before it starts.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from conftest import tiny_model
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from harness.config import SamplingConfig
from harness.drafters.eagle import EagleHead, EagleHeadConfig
from harness.drafters.medusa import MedusaHeads, MedusaHeadsConfig
from harness.drafters.transfer import TransferConfig, TransferLayers
from harness.engine import SKIPPABLE, Engine
from harness.errors import HarnessError
from harness.runner import check_length
from harness.stops import StopRule
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.eagle import Eagle, EagleConfig
from methods.eagle3 import Eagle3, Eagle3Config
from methods.hidden_transfer import Firp, FirpConfig, HiddenTransfer, HiddenTransferConfig
from methods.medusa import Medusa, MedusaConfig
from methods.prompt_lookup import PromptLookup, PromptLookupConfig
from methods.recycling import Recycling, RecyclingConfig
from methods.reference_lookup import ReferenceLookup, ReferenceLookupConfig
from methods.space import Space, SpaceConfig
from methods.speculative import Speculative, SpeculativeConfig
from methods.speculative_tree import SpeculativeTree, SpeculativeTreeConfig
from tasks.base import Sample

GREEDY = SamplingConfig()
WINDOW = 8
PROMPT = [0, 5, 9, 13, 5, 9, 13, 5]  # repeats, so prompt lookup proposes
N = 40  # new tokens: the sequence is six windows long
COMMON = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=256, initializer_range=0.2, bos_token_id=0, eos_token_id=None,
              pad_token_id=2)  # fmt: skip
GEMMA = dict(head_dim=8, tie_word_embeddings=False)  # untied: a random tied Gemma repeats one token
FAMILIES = {
    "mistral": lambda: MistralForCausalLM(MistralConfig(num_hidden_layers=2, sliding_window=WINDOW, **COMMON)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                                  max_window_layers=1, **COMMON)),  # fmt: skip
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(num_hidden_layers=4, sliding_window=WINDOW, final_logit_softcapping=2.0,
                                                     attn_logit_softcapping=3.0, **GEMMA, **COMMON)),  # fmt: skip
    "gemma3": lambda: Gemma3ForCausalLM(Gemma3TextConfig(num_hidden_layers=4, sliding_window=WINDOW, **GEMMA, **COMMON,
                                                         layer_types=["sliding_attention", "full_attention"] * 2)),  # fmt: skip
}


def build(family: str, seed: int) -> Engine:
    torch.manual_seed(seed)
    return Engine.from_model(FAMILIES[family]().eval(), None)


def random_heads(engine: Engine) -> MedusaHeads:
    lm_head = engine.model.get_output_embeddings().weight
    heads = MedusaHeads(MedusaHeadsConfig(3, 1, lm_head.shape[1], lm_head.shape[0]))
    heads.init_from_lm_head(lm_head)
    return heads.eval()


def random_eagle_head(engine: Engine, version: int, draft_vocab: int = 48) -> EagleHead:
    """A random EAGLE head (v3: fused layers of this family's hidden states, a draft vocabulary
    of the first ``draft_vocab`` tokens)."""
    torch.manual_seed(0)
    head = EagleHead(EagleHeadConfig.from_target(engine.config, version, draft_vocab_size=draft_vocab)).eval()
    if head.config.maps_vocab:
        head.set_vocab_map(torch.arange(draft_vocab))
    return head


def random_transfer(engine: Engine, attend_rows: bool) -> TransferLayers:
    """Random transfer maps (3 rows, joining at decoder layer 1) for this family's hidden size."""
    torch.manual_seed(0)
    layers = TransferLayers(TransferConfig(layer=1, k=3, attend_rows=attend_rows, hidden_size=engine.config.hidden_size))
    with torch.no_grad():
        for p in layers.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return layers.eval()


def outputs(engine: Engine, draft: Engine) -> dict[str, list[int]]:
    stop = StopRule(N)
    tree_config = SpeculativeTreeConfig(branching=[3, 2, 2, 1], max_nodes=8)
    methods = {
        "autoregressive": Autoregressive(AutoregressiveConfig(), engine, GREEDY),
        "speculative": Speculative(SpeculativeConfig(gamma=3), engine, GREEDY, draft=draft),
        "prompt-lookup": PromptLookup(PromptLookupConfig(), engine, GREEDY),
        "reference-lookup": ReferenceLookup(ReferenceLookupConfig(), engine, GREEDY),  # the prompt as reference
        "medusa": Medusa(MedusaConfig(tree="large"), engine, GREEDY, heads=random_heads(engine)),
        "space": Space(SpaceConfig(k=2, mask_id=3), engine, GREEDY),
        "eagle": Eagle(EagleConfig(tree="medium"), engine, GREEDY, head=random_eagle_head(engine, 1)),
        "eagle3": Eagle3(Eagle3Config(), engine, GREEDY, head=random_eagle_head(engine, 3)),
        "recycling": Recycling(RecyclingConfig(tree="large"), engine, GREEDY),
        "speculative-tree": SpeculativeTree(tree_config, engine, GREEDY, draft=draft),  # the other random model
        "speculative-tree (self-draft)": SpeculativeTree(tree_config, engine, GREEDY, draft=engine),  # always right
        "speculative-tree (LLMCad)": SpeculativeTree(replace(tree_config, confidence=0.3), engine, GREEDY, draft=draft),
    }
    if engine.config.model_type in SKIPPABLE:  # the families whose layers the engine can run one by one
        methods["hidden-transfer"] = HiddenTransfer(HiddenTransferConfig(tree="small"), engine, GREEDY,
                                                    transfer=random_transfer(engine, False))  # fmt: skip
        methods["firp"] = Firp(FirpConfig(tree="small"), engine, GREEDY, transfer=random_transfer(engine, True))
    return {name: m.generate(PROMPT, stop).tokens for name, m in methods.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_sliding_window_models_equal_generate(family):
    engine, draft = build(family, 0), build(family, 1)
    assert engine.sliding_window == WINDOW
    with torch.no_grad():
        ref = engine.model.generate(torch.tensor([PROMPT]), max_new_tokens=N, do_sample=False, pad_token_id=2)
    ref = ref[0, len(PROMPT) :].tolist()
    assert len(set(ref)) > 5  # a real sequence, not one token repeated
    for name, tokens in outputs(engine, draft).items():
        assert tokens == ref, name
    # the rolled-back cache keeps every entry of a sliding layer, past the window
    cache = engine.new_cache()
    engine.forward(PROMPT + ref, cache)
    cache.truncate(len(PROMPT) + 3)
    assert len(cache) == len(PROMPT) + 3 and all(layer.keys.shape[2] == len(PROMPT) + 3 for layer in cache.inner.layers)
    # negative control: without the window in the custom masks, trees and chunks see too much
    blind = copy.copy(engine)
    blind.sliding_window = None
    wrong = outputs(blind, draft)
    assert wrong["medusa"] != ref and wrong["space"] != ref
    assert wrong["autoregressive"] == ref  # transformers' own masks: the window stays


def test_soft_capped_logits_are_the_same_on_the_hidden_state_path():
    engine = build("gemma2", 0)
    cap = engine.config.final_logit_softcapping
    ids = PROMPT + list(range(10, 30))
    plain = engine.forward(ids, engine.new_cache()).logits
    out = engine.forward(ids, engine.new_cache(), hidden=True)
    last = engine.forward(ids, engine.new_cache(), hidden=True, keep_last=3)
    with torch.no_grad():
        model = engine.model(input_ids=torch.tensor([ids])).logits[0]
        raw = engine.model.get_output_embeddings()(out.hidden)  # the head alone, without the cap
    torch.testing.assert_close(out.logits, plain, atol=0, rtol=0)
    torch.testing.assert_close(plain, model, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(last.logits, plain[-3:], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(last.hidden, out.hidden[-3:], atol=1e-6, rtol=1e-6)
    assert float(plain.abs().max()) < cap < float(raw.abs().max())  # the cap binds: lm_head(hidden) alone differs
    assert out.hidden.shape == (len(ids), engine.config.hidden_size)


def test_custom_masks_refuse_other_layer_types(engine):
    other = copy.copy(engine)
    other.layer_types = ["full_attention", "chunked_attention"]
    cache = other.new_cache()
    other.forward(PROMPT, cache)
    with pytest.raises(ValueError, match="chunked_attention layers: trees and chunks .* full and sliding-window"):
        other.forward([1, 2], cache, positions=[8, 9], mask=torch.ones(2, 10, dtype=torch.bool))


# ---- the context: positions a step uses past the output -------------------------------------
class PositionLog(Engine):
    """An engine that remembers the largest position id any forward was fed."""

    highest = -1

    def forward(self, ids, cache, positions=None, mask=None, **kw):
        n = torch.as_tensor(ids).numel()
        pos = range(len(cache), len(cache) + n) if positions is None else torch.as_tensor(positions).flatten().tolist()
        self.highest = max(self.highest, max(pos))
        return super().forward(ids, cache, positions=positions, mask=mask, **kw)


@pytest.mark.parametrize("method", ["medusa", "space"])
def test_steps_stay_inside_the_context(tokenizer, method):
    """With prompt + max_new_tokens + headroom equal to the context, the last step's deepest
    node or mask sits at its last position; one token of context less is refused."""
    prompt, n = [0, 17, 42, 99, 5, 23], 20
    headroom = 2 if method == "medusa" else 2 * 3 - 1  # a 3-deep tree; k = 3
    context = len(prompt) + n + headroom
    model = tiny_model(len(tokenizer), max_position_embeddings=context)
    engine = PositionLog(model, tokenizer, Engine.from_model(model, tokenizer).cfg, torch.device("cpu"))
    if method == "medusa":
        m = Medusa(MedusaConfig(tree="large"), engine, GREEDY, heads=random_heads(engine))
    else:
        m = Space(SpaceConfig(k=3), engine, GREEDY)
    assert m.headroom() == headroom
    gen = m.generate(prompt, StopRule(n))
    assert len(gen.tokens) == n and gen.accepted_per_step[-1] == 1  # the last step started one token short
    assert engine.highest == context - 1  # ...and used every position, none beyond
    with pytest.raises(ValueError, match=f"{headroom} positions for {method}'s steps exceed the model's context"):
        m.generate(prompt, StopRule(n + 1))


def test_runner_refuses_a_run_that_would_pass_the_context(engine):
    methods = {"autoregressive": Autoregressive(AutoregressiveConfig(), engine, GREEDY),
               "space": Space(SpaceConfig(k=3), engine, GREEDY)}  # fmt: skip
    sample = Sample(id="s", turns=["x"])
    check_length(engine, methods, sample, 0, 500, 7)  # 500 + 7 + 5 = 512, the context
    with pytest.raises(HarnessError, match=r"sample s turn 0: prompt of 500 tokens \+ max_new_tokens 8 \+ 5 positions "
                                           r"for space's steps exceeds the model's context of 512"):  # fmt: skip
        check_length(engine, methods, sample, 0, 500, 8)
    del methods["space"]
    check_length(engine, methods, sample, 0, 500, 12)  # chain methods need no headroom
