"""Stop strings: the incremental check equals a full decode, every method ends at the same
token when a stop string completes inside an accepted block (speculative chain, prompt
lookup, reference lookup, Medusa path, EAGLE paths, recycling and speculative-tree paths, SPACE chunk, SWIFT draft, transformers' assisted / prompt-lookup
blocks), the stop reasons, agreement with transformers' own ``stop_strings`` (and the documented
prompt-seam difference), the tasks' defaults and the runner's records."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Optional

import pytest
import torch
from conftest import TEXT, tiny_model
from test_eagle import OracleHead
from test_medusa import LookupHeads
from test_space import Oracle as SpaceOracle
from test_speculative import OracleDraft
from test_speculative_tree import OracleTreeDraft
from test_recycling import Oracle as RecyclingOracle
from test_swift import FIND_NOOP, noop_engine
from tokenizers import Tokenizer, decoders, models, normalizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast, StoppingCriteriaList

from harness.cli import main
from harness.config import SamplingConfig
from harness.datastore import Datastore
from harness.engine import Engine
from harness.paths import REPO_ROOT
from harness.stops import Committer, StopRule, StopStrings
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.eagle import Eagle, EagleConfig
from methods.eagle2 import Eagle2, Eagle2Config
from methods.eagle3 import Eagle3, Eagle3Config
from methods.hf_assisted import HFAssisted, HFAssistedConfig
from methods.hf_generate import CommitEachStep, HFGenerate, HFGenerateConfig, counting_calls
from methods.hf_prompt_lookup import HFPromptLookup, HFPromptLookupConfig
from methods.lookahead import Lookahead, LookaheadConfig
from methods.medusa import Medusa, MedusaConfig
from methods.prompt_lookup import PromptLookup, PromptLookupConfig
from methods.recycling import RecyclingConfig
from methods.reference_lookup import ReferenceLookup, ReferenceLookupConfig
from methods.rest import Rest, RestConfig
from methods.space import SpaceConfig
from methods.speculative import Speculative, SpeculativeConfig
from methods.speculative_tree import SpeculativeTree, SpeculativeTreeConfig
from methods.suffix import Suffix, SuffixConfig
from methods.swift import Swift, SwiftConfig
from tasks.base import TaskDataError
from tasks.humaneval import CODEX_STOP, HumanEval, HumanEvalConfig
from tasks.humaneval_x import HumanEvalX, HumanEvalXConfig
from tasks.jsonl_task import JsonlTask, JsonlTaskConfig

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11]]
N = 40
EOS = frozenset({1})  # the tiny models' EOS id (conftest); transformers' generate stops there whatever it is told


def decoder(tokenizer):
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def brute_first_stop(decode, tokens: list[int], strings) -> Optional[int]:
    """Index of the first token whose full decode contains a stop string (None: never)."""
    for n in range(1, len(tokens) + 1):
        text = decode(tokens[:n])
        if any(s in text for s in strings):
            return n - 1
    return None


def stop_string_at(decode, tokens: list[int], k: int, ok=lambda s: True) -> Optional[str]:
    """A stop string (no replacement characters, ``ok``) whose first occurrence in the text is
    completed by token k; one that crosses into token k from before, ending as early in
    its text as possible (so the token carries characters past it), when there is one."""
    prev, full = decode(tokens[:k]), decode(tokens[: k + 1])
    same = 0
    while same < min(len(prev), len(full)) and prev[same] == full[same]:
        same += 1
    for length in (3, 2, 4, 5, 1):
        for end in range(same + 1, len(full) + 1):
            s = full[max(0, end - length) : end]
            if len(s) == length and "\ufffd" not in s and ok(s) and brute_first_stop(decode, tokens, [s]) == k:
                return s
    return None


def ar(engine: Engine, prompt: list[int], stop: StopRule):
    return Autoregressive(AutoregressiveConfig(), engine, GREEDY).generate(prompt, stop)


def stop_rule(tokenizer, strings, n=N, eos=frozenset()) -> StopRule:
    return StopRule(n, eos, StopStrings(strings, decoder(tokenizer)))


def mid_block_stop(tokenizer, ref: list[int], candidates) -> tuple[int, str]:
    """The first candidate index k (inside an accepted block) with a stop string ending there."""
    for k in candidates:
        s = stop_string_at(decoder(tokenizer), ref, k)
        if s is not None:
            return k, s
    raise AssertionError(f"no usable stop string at any of {list(candidates)}")


def check_cut(gen, engine, prompt, stop, ref, k, s) -> None:
    """``gen`` ends exactly at token k with reason stop:s, as autoregressive decoding does."""
    assert gen.tokens == ref[: k + 1]
    assert gen.stop_reason == f"stop:{s}"
    reference = ar(engine, prompt, stop)
    assert reference.tokens == gen.tokens and reference.stop_reason == gen.stop_reason


# ---- the check itself ---------------------------------------------------------------------------------
def random_sequences(tokenizer, rng: random.Random, count: int) -> list[list[int]]:
    """Token sequences with code, multi-byte characters (several byte tokens each) and random ids
    (invalid UTF-8 on a byte-level vocabulary)."""
    texts = ["def f(x):\n    return x  # é€😀\n", "int main() { return 0; }\n}\n",
             "naïve → ∑ 😀😀 ok\n\ndef g"]  # fmt: skip
    vocab = len(tokenizer)
    out = []
    for _ in range(count):
        ids: list[int] = []
        while len(ids) < 60:
            if rng.random() < 0.5:
                ids += tokenizer(rng.choice(texts), add_special_tokens=False).input_ids
            else:
                ids += [rng.randrange(4, vocab) for _ in range(rng.randrange(1, 6))]
        out.append(ids[:60])
    return out


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A SentencePiece-like BPE as Llama 2 ships it: spaces as "▁", byte-fallback tokens
    <0xNN> for other characters, and a decoder that drops the text's leading space (so a
    window decoded alone loses a space its full decode has)."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>", "<s>", "</s>"],
                                                       show_progress=False))  # fmt: skip
    trained = json.loads(base.to_str())["model"]
    vocab = dict(trained["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = base.normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize("which", ["tiny", "zoo", "llama-style"])
def test_incremental_check_equals_a_full_decode(tokenizer, which):
    if which == "tiny":
        tok = tokenizer
    elif which == "zoo":
        tok = AutoTokenizer.from_pretrained(REPO_ROOT / "zoo" / "target")
    else:
        tok = llama_style_tokenizer()
    decode, rng = decoder(tok), random.Random(0)
    checked = 0
    for tokens in random_sequences(tok, rng, 25):
        text = decode(tokens)
        for _ in range(4):
            # a stop string taken from the text (ASCII or not), or a fixed one that may be absent
            at, length = rng.randrange(len(text)), rng.randrange(1, 6)
            picked = text[at : at + length].replace("\ufffd", "")
            strings = [s for s in (picked, rng.choice(["\n}", "😀", "€\n", "\ndef", "zzz"])) if s]
            expect = brute_first_stop(decode, tokens, strings)
            out = Committer(StopRule(len(tokens) + 1, frozenset(), StopStrings(strings, decode)))
            out.add(tokens)
            if expect is None:
                assert not out.done and out.tokens == tokens
            else:
                first = decode(tokens[: expect + 1])
                hit = min((s for s in strings if s in first), key=lambda s: (first.find(s) + len(s), first.find(s)))
                assert len(out.tokens) == expect + 1 and out.reason == f"stop:{hit}", (tokens, strings)
                checked += 1
    assert checked >= 50


def test_stop_reasons_and_their_order(tokenizer):
    ids = tokenizer("def add(a, b):\n    return a + b\n", add_special_tokens=False).input_ids
    decode = decoder(tokenizer)
    k = brute_first_stop(decode, ids, ["\n"])
    strings = StopStrings(["return", "\n"], decode)
    out = Committer(StopRule(100, frozenset(), strings))
    assert out.add(ids + ids) == k + 1 and out.reason == "stop:\n" and out.tokens == ids[: k + 1]
    out = Committer(StopRule(k + 1, frozenset(), strings))  # the limit and a stop at the same token
    out.add(ids)
    assert out.reason == "stop:\n"
    out = Committer(StopRule(k, frozenset(), strings))
    out.add(ids)
    assert out.reason == "max_new_tokens" and len(out.tokens) == k
    out = Committer(StopRule(100, frozenset({ids[k]}), strings))  # EOS first
    out.add(ids)
    assert out.reason == "eos" and len(out.tokens) == k + 1
    out = Committer(StopRule(0, frozenset()))
    assert out.done and out.reason == "max_new_tokens" and out.add([5]) == 0
    both = Committer(StopRule(100, frozenset(), StopStrings(["a + b", "+"], decode)))  # ends first wins
    both.add(ids)
    assert both.reason == "stop:+"
    with pytest.raises(ValueError, match="empty stop string"):
        StopStrings(["\n", ""], decode)


def test_prompt_text_is_not_part_of_the_match(tokenizer):
    """The text is the output's alone: a stop string only present across the prompt seam, or
    in the prompt, does not fire."""
    decode = decoder(tokenizer)
    out = Committer(StopRule(10, frozenset(), StopStrings(["def"], decode)))
    out.add(tokenizer("ef x", add_special_tokens=False).input_ids)  # the prompt would have ended in "d"
    assert not out.done


# ---- every method ends at the same token, inside an accepted block ------------------------------------
def test_autoregressive_and_hf_generate(engine, tokenizer):
    for prompt in PROMPTS:
        ref = ar(engine, prompt, StopRule(N, EOS)).tokens
        k, s = mid_block_stop(tokenizer, ref, range(3, N))
        stop = stop_rule(tokenizer, [s], eos=EOS)
        for method in (Autoregressive(AutoregressiveConfig(), engine, GREEDY),
                       HFGenerate(HFGenerateConfig(), engine, GREEDY)):  # fmt: skip
            gen = method.generate(prompt, stop)
            check_cut(gen, engine, prompt, stop, ref, k, s)
            assert gen.target_forwards == k + 1 and gen.accepted_per_step == [1] * (k + 1)


class CountingStopStrings(StopStrings):
    def __init__(self, *args):
        super().__init__(*args)
        self.calls = 0

    def completed_by(self, tokens):
        self.calls += 1
        return super().completed_by(tokens)


def test_hf_generate_checks_each_token_once(engine, tokenizer):
    """The wrapper's stopping criterion is the commit path: every generated token is checked
    against the stop strings once, while transformers runs (not again after it)."""
    strings = CountingStopStrings(["never in this output \u2603"], decoder(tokenizer))
    gen = HFGenerate(HFGenerateConfig(), engine, GREEDY).generate(PROMPTS[0], StopRule(N, EOS, strings))
    assert strings.calls == len(gen.tokens) and gen.stop_reason in ("eos", "max_new_tokens")


@pytest.mark.parametrize("prompt", PROMPTS)
def test_speculative_stops_inside_an_accepted_chain(engine, tokenizer, prompt):
    ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
    # gamma=4 with an oracle draft: blocks of 5 tokens at indices 1-5, 6-10, ...
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(2, N) if i % 5 in (2, 3, 4)])
    stop = stop_rule(tokenizer, [s])
    method = Speculative(SpeculativeConfig(gamma=4), engine, GREEDY, draft=OracleDraft(engine, prompt + ref, 100))
    gen = method.generate(prompt, stop)
    check_cut(gen, engine, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == k % 5  # the chain was cut at the stop, nothing past it


def test_prompt_lookup_stops_inside_an_accepted_block(engine, tokenizer):
    found = 0
    for start_prompt in PROMPTS:
        # greedy decoding of a random model loops, so its continuation is copied from the prompt
        prompt = start_prompt + ar(engine, start_prompt, StopRule(40, frozenset())).tokens
        ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
        method = PromptLookup(PromptLookupConfig(), engine, GREEDY)
        steps = method.generate(prompt, StopRule(N, frozenset())).accepted_per_step
        ends = [sum(steps[: i + 1]) for i in range(len(steps))]
        for start, end in zip(ends, ends[1:]):
            inside = range(start + 1, end - 1)  # strictly inside a block of >= 3 tokens
            if not inside:
                continue
            try:
                k, s = mid_block_stop(tokenizer, ref, inside)
            except AssertionError:
                continue
            stop = stop_rule(tokenizer, [s])
            gen = method.generate(prompt, stop)
            check_cut(gen, engine, prompt, stop, ref, k, s)
            assert gen.accepted_per_step[-1] == k + 1 - start
            found += 1
            break
    assert found >= 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_reference_lookup_stops_inside_an_accepted_block(engine, tokenizer, prompt):
    """The reference is the output itself: 1 token from the prefill, then blocks of 10 copied + 1
    (indices 1-11, 12-22, ...); the stop falls strictly inside one."""
    ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
    method = ReferenceLookup(ReferenceLookupConfig(copy_tokens=10), engine, GREEDY)
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(2, N) if (i - 1) % 11 not in (0, 10)])
    stop = stop_rule(tokenizer, [s])
    gen = method.generate(prompt, stop, reference_ids=ref)
    check_cut(gen, engine, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 11 + 1  # the block was cut at the stop, nothing past it


def test_medusa_stops_inside_an_accepted_path(engine, tokenizer):
    prompt = [0, 200, 11, 11, 64, 150, 7, 9, 250, 33]
    ref = ar(engine, prompt, StopRule(30, frozenset())).tokens
    method = Medusa(MedusaConfig(tree="chain"), engine, GREEDY, heads=LookupHeads(engine, prompt + ref))
    # oracle heads on the chain: 1 token from the prefill, then paths of 4 (indices 1-4, 5-8, ...)
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(5, 29) if (i - 1) % 4 in (1, 2)])
    stop = stop_rule(tokenizer, [s], n=30)
    gen = method.generate(prompt, stop)
    check_cut(gen, engine, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 4 + 1


@pytest.mark.parametrize("name", ["eagle", "eagle2", "eagle3"])
def test_eagle_stops_inside_an_accepted_path(engine, tokenizer, name):
    prompt = [0, 200, 11, 11, 64, 150, 7, 9, 250, 33]
    ref = ar(engine, prompt, StopRule(30, frozenset())).tokens
    head = OracleHead(engine, prompt + ref, version=3 if name == "eagle3" else 1)
    method = {"eagle": lambda: Eagle(EagleConfig(tree="chain"), engine, GREEDY, head=head),
              "eagle2": lambda: Eagle2(Eagle2Config(depth=5, total_tokens=24, stop_below=0.0), engine, GREEDY, head=head),
              "eagle3": lambda: Eagle3(Eagle3Config(depth=5, total_tokens=24), engine, GREEDY, head=head)}[name]()  # fmt: skip
    # an oracle head, 5 deep: 1 token from the prefill, then paths of 6 (indices 1-6, 7-12, ...)
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(7, 29) if (i - 1) % 6 in (1, 2, 3, 4)])
    stop = stop_rule(tokenizer, [s], n=30)
    gen = method.generate(prompt, stop)
    check_cut(gen, engine, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 6 + 1


def test_recycling_stops_inside_an_accepted_path(engine, tokenizer):
    prompt = PROMPTS[2]  # its continuation repeats no token within a path (tests/test_recycling.py)
    ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
    method = RecyclingOracle(RecyclingConfig(tree="chain"), engine, prompt + ref)
    # the right token at rank 0 of every row on the chain: 1 from the prefill, then paths of 5 (1-5, 6-10, ...)
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(2, N - 5) if (i - 1) % 5 in (1, 2, 3)])
    stop = stop_rule(tokenizer, [s])
    gen = method.generate(prompt, stop)
    check_cut(gen, engine, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 5 + 1


def test_speculative_tree_stops_inside_an_accepted_path(engine, tokenizer):
    prompt = PROMPTS[2]
    ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
    draft = OracleTreeDraft(engine, prompt + ref)
    method = SpeculativeTree(SpeculativeTreeConfig(branching=[2, 1, 1, 1], max_nodes=6), engine, GREEDY, draft=draft)
    # an always-right draft, 4 deep: 1 from the prefill, then paths of 5 (1-5, 6-10, ...)
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(2, N - 5) if (i - 1) % 5 in (1, 2, 3)])
    stop = stop_rule(tokenizer, [s])
    gen = method.generate(prompt, stop)
    check_cut(gen, engine, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 5 + 1


def test_space_stops_inside_an_accepted_chunk(tokenizer):
    eng = Engine.from_model(tiny_model(len(tokenizer), seed=1, initializer_range=0.2), tokenizer)
    prompt, n = PROMPTS[0], 30
    ref = ar(eng, prompt, StopRule(n, frozenset())).tokens
    # k=3 with right proposals: blocks of 4 at indices 1-4, 5-8, ...
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(5, n - 1) if (i - 1) % 4 in (1, 2)])
    stop = stop_rule(tokenizer, [s], n=n)
    method = SpaceOracle(SpaceConfig(k=3), eng, GREEDY, reference=ref, prompt_len=len(prompt), right=3)
    gen = method.generate(prompt, stop)
    check_cut(gen, eng, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 4 + 1


def test_rest_stops_inside_an_accepted_path(engine, tokenizer):
    prompt = PROMPTS[2]
    ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
    # a datastore holding the exact continuation, copy_tokens=4: paths of 5 at indices 1-5, 6-10, ...
    method = Rest(RestConfig(copy_tokens=4), engine, GREEDY, datastore=Datastore.from_tokens(prompt + ref))
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(2, N) if (i - 1) % 5 in (1, 2, 3)])
    stop = stop_rule(tokenizer, [s])
    gen = method.generate(prompt, stop)
    check_cut(gen, engine, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 5 + 1


def test_suffix_stops_inside_an_accepted_path(engine, tokenizer):
    def primed() -> Suffix:
        """Suffix decoding whose global trie holds the prompt's whole greedy output."""
        method = Suffix(SuffixConfig(), engine, GREEDY)
        method.generate(prompt, StopRule(N, frozenset()))
        return method

    found = 0
    for prompt in PROMPTS:
        ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
        steps = primed().generate(prompt, StopRule(N, frozenset())).accepted_per_step
        ends = [sum(steps[: i + 1]) for i in range(len(steps))]
        for start, end in zip(ends, ends[1:]):
            inside = range(start + 1, end - 1)  # strictly inside a path of >= 3 tokens
            if not inside:
                continue
            try:
                k, s = mid_block_stop(tokenizer, ref, inside)
            except AssertionError:
                continue
            stop = stop_rule(tokenizer, [s])
            gen = primed().generate(prompt, stop)
            check_cut(gen, engine, prompt, stop, ref, k, s)
            assert gen.accepted_per_step[-1] == k + 1 - start
            found += 1
            break
    assert found >= 2


@pytest.mark.parametrize("prompt", PROMPTS)
def test_swift_stops_inside_an_accepted_draft(tokenizer, prompt):
    """A model two of whose sublayers do nothing: the search skips exactly those, so every
    draft of 4 is right: 1 token from the prefill, then blocks of 5 (indices 1-5, 6-10, ...)."""
    eng = noop_engine(len(tokenizer), tokenizer)
    ref = ar(eng, prompt, StopRule(N, frozenset())).tokens
    k, s = mid_block_stop(tokenizer, ref, [i for i in range(2, N) if (i - 1) % 5 in (1, 2, 3)])
    stop = stop_rule(tokenizer, [s])
    gen = Swift(SwiftConfig(**FIND_NOOP, max_draft=4), eng, GREEDY).generate(prompt, stop)
    check_cut(gen, eng, prompt, stop, ref, k, s)
    assert gen.accepted_per_step[-1] == (k - 1) % 5 + 1  # the draft was cut at the stop, nothing past it


def test_lookahead_stops_inside_an_accepted_ngram(engine, tokenizer):
    """Lookahead with the prompt's n-grams in its pool on looping text: blocks of 3 (a 3-gram
    and the bonus); a stop string completed by a block's first or second token cuts it there."""
    found = 0
    for start_prompt in PROMPTS:
        prompt = start_prompt + ar(engine, start_prompt, StopRule(40, frozenset())).tokens
        prompt += ar(engine, prompt, StopRule(40, frozenset())).tokens  # ends inside the loop
        ref = ar(engine, prompt, StopRule(N, frozenset())).tokens
        method = Lookahead(LookaheadConfig(window=4, ngram=3, candidates=4, context_pool=True), engine, GREEDY)
        steps = method.generate(prompt, StopRule(N, frozenset())).accepted_per_step
        ends = [sum(steps[: i + 1]) for i in range(len(steps))]
        for start, end in zip(ends, ends[1:]):
            try:
                k, s = mid_block_stop(tokenizer, ref, range(start, end - 1))  # not a block's last token
            except AssertionError:
                continue
            stop = stop_rule(tokenizer, [s])
            gen = method.generate(prompt, stop)
            check_cut(gen, engine, prompt, stop, ref, k, s)
            assert gen.accepted_per_step[-1] == k + 1 - start
            found += 1
            break
    assert found >= 2


def raw_generate(engine: Engine, prompt: list[int], stop: StopRule, **kwargs) -> list[int]:
    """transformers' generate with the stop criterion but without the shared cut."""
    ids = torch.tensor([prompt])
    criteria = StoppingCriteriaList([CommitEachStep(engine, stop, len(prompt))])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                max_new_tokens=stop.max_new_tokens, stopping_criteria=criteria, pad_token_id=2,
                                eos_token_id=sorted(EOS), **kwargs)  # fmt: skip
    return out[0, len(prompt) :].tolist()


def test_hf_assisted_is_cut_inside_transformers_block(engine, tokenizer):
    """The target as its own assistant accepts every block of 4 drafts + 1; transformers checks
    its stopping criteria only after a block, so it runs past the stop and the wrapper cuts."""
    for prompt in PROMPTS:
        ref = ar(engine, prompt, StopRule(N, EOS)).tokens
        k, s = mid_block_stop(tokenizer, ref, [i for i in range(2, N) if i % 5 in (1, 2, 3)])
        stop = stop_rule(tokenizer, [s], eos=EOS)
        saved = engine.model.generation_config  # the wrapper sets the assistant's (here: the target's)
        try:
            method = HFAssisted(HFAssistedConfig(num_assistant_tokens=4), engine, GREEDY, draft=engine)
            gen = method.generate(prompt, stop)
            raw = raw_generate(engine, prompt, stop, assistant_model=engine.model)
        finally:
            engine.model.generation_config = saved
        check_cut(gen, engine, prompt, stop, ref, k, s)
        assert len(raw) > k + 1 and raw[: k + 1] == gen.tokens  # transformers alone runs past the stop
        # every target forward commits its 4 drafts + 1 (the prompt's too: it verifies the first
        # drafts), the last one cut at the stop
        steps = gen.accepted_per_step
        assert steps == [5] * (len(steps) - 1) + [k + 1 - 5 * (len(steps) - 1)] and len(steps) == gen.target_forwards


def test_hf_prompt_lookup_is_cut_inside_transformers_block(engine, tokenizer):
    found = 0
    for start_prompt in PROMPTS:
        prompt = start_prompt + ar(engine, start_prompt, StopRule(40, frozenset())).tokens
        ref = ar(engine, prompt, StopRule(N, EOS)).tokens
        method = HFPromptLookup(HFPromptLookupConfig(), engine, GREEDY)
        for k in range(2, N - 1):
            s = stop_string_at(decoder(tokenizer), ref, k)
            if s is None:
                continue
            stop = stop_rule(tokenizer, [s], eos=EOS)
            raw = raw_generate(engine, prompt, stop, prompt_lookup_num_tokens=10, max_matching_ngram_size=3)
            if len(raw) == k + 1:
                continue  # the stop fell at the end of transformers' block: nothing to cut
            with counting_calls(engine.model) as forwards:  # the target's forwards, counted apart
                gen = method.generate(prompt, stop)
            check_cut(gen, engine, prompt, stop, ref, k, s)
            assert raw[: k + 1] == gen.tokens  # transformers ran past the stop (a block), the wrapper cut it
            assert sum(gen.accepted_per_step) == k + 1 and len(gen.accepted_per_step) == gen.target_forwards
            assert gen.target_forwards == forwards[0]
            found += 1
            break
    assert found >= 2


# ---- agreement with transformers' own stop_strings ----------------------------------------------------
def test_equals_transformers_stop_strings(engine, tokenizer):
    """Our cut equals ``generate(stop_strings=...)`` whenever the stop string lies in the output."""
    eos = frozenset(engine.eos_ids)
    assert eos == EOS
    compared = 0
    for prompt in PROMPTS:
        ref = ar(engine, prompt, StopRule(N, eos)).tokens
        for k in range(2, len(ref) - 1, 2):
            s = stop_string_at(decoder(tokenizer), ref, k)
            if s is None:
                continue
            ids = torch.tensor([prompt])
            out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                                        stop_strings=[s], tokenizer=tokenizer, eos_token_id=sorted(eos),
                                        pad_token_id=2)  # fmt: skip
            theirs = out[0, len(prompt) :].tolist()
            gen = ar(engine, prompt, stop_rule(tokenizer, [s], eos=eos))
            assert gen.tokens == theirs == ref[: k + 1], (prompt, s)
            compared += 1
    assert compared >= 12


def test_prompt_seam_difference_with_transformers(engine, tokenizer):
    """The one documented difference: transformers' StopStringCriteria also matches a stop
    string that starts in the prompt and ends in the output; the shared rule does not."""
    prompt = PROMPTS[0]
    ref = ar(engine, prompt, StopRule(N, EOS)).tokens
    decode = decoder(tokenizer)
    seam = decode(prompt)[-1] + decode(ref[:1])[0]  # last prompt character + first output character
    ids = torch.tensor([prompt])
    out = engine.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N,
                                stop_strings=[seam], tokenizer=tokenizer, eos_token_id=sorted(EOS),
                                pad_token_id=2)  # fmt: skip
    assert out[0, len(prompt) :].tolist() == ref[:1]  # transformers stops at the first token
    stop = stop_rule(tokenizer, [seam], eos=EOS)
    ours = ar(engine, prompt, stop)
    first = brute_first_stop(decode, ref, [seam])
    assert ours.tokens == ref[: (first + 1 if first is not None else N)]
    assert len(ours.tokens) > 1
    assert HFGenerate(HFGenerateConfig(), engine, GREEDY).generate(prompt, stop).tokens == ours.tokens


# ---- tasks and the runner -------------------------------------------------------------------------------
def test_task_defaults_and_overrides(tmp_path):
    he = HumanEval(HumanEvalConfig())
    sample = he.samples()[0]
    assert he.stop_strings(sample) == CODEX_STOP == ("\ndef", "\nclass", "\nif __name__", "\nprint", "\n#")
    assert HumanEval(HumanEvalConfig(stop=[])).stop_strings(sample) == ()
    assert HumanEval(HumanEvalConfig(stop=["\\n\\n", "a\\\\nb", "}"])).stop_strings(sample) == ("\n\n", "a\\nb", "}")
    hx = HumanEvalX(HumanEvalXConfig(limit=1))
    stops = {s.language: hx.stop_strings(s) for s in hx.samples()}
    assert stops == {"python": CODEX_STOP, "cpp": ("\n}",), "java": ("\n    }",), "js": ("\n}",), "go": ("\n}",)}
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": "x"}) + "\n")
    own = JsonlTask(JsonlTaskConfig(path=str(path)))
    assert own.stop_strings(own.samples()[0]) == ()
    with pytest.raises(TaskDataError, match="empty string"):
        HumanEval(HumanEvalConfig(stop=["\n", ""]))


def test_humaneval_x_default_stops_end_the_canonical_function():
    """Each language's default stop first occurs where the canonical solution closes the
    function, except in two of the 656 solutions: CPP/94's carries the test file's first
    lines after the function, and Go/72's defines a helper after it (which the stop cuts)."""
    hx = HumanEvalX(HumanEvalXConfig(languages=["cpp", "java", "js", "go"]))
    past_the_function = set()
    for sample in hx.samples():
        solution = "\n" + sample.meta["canonical_solution"]  # the prompt ends with a newline
        (stop,) = hx.stop_strings(sample)
        at = solution.find(stop)
        assert at >= 0, sample.id
        if solution[at + len(stop) :].strip() not in ("", "}"):  # blank lines (Java: the class's "}")
            past_the_function.add(sample.id)
    assert past_the_function == {"CPP/94", "Go/72"}


def test_runner_records_stop_reasons_and_never_runs_past_a_stop(model_dir, tmp_path, tokenizer):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in
                               enumerate(["def add(a, b):", "class Foo:", "int main() {"])))  # fmt: skip
    free = tmp_path / "free"
    base = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "24",
            "run.progress=false"]  # fmt: skip
    assert main(base + ["--out", str(free)]) == 0
    texts = [json.loads(line)["text"] for line in (free / "samples.jsonl").read_text().splitlines()]
    # stop strings taken from the middle of the free outputs (plain characters), so that they fire
    plain = re.compile(r"[A-Za-z0-9 ():.\n]{2}")
    stops = sorted({m.group(0) for t in texts if (m := plain.search(t, len(t) // 3))})
    assert len(stops) >= 2
    out = tmp_path / "stopped"
    methods = "hf-generate,speculative,prompt-lookup,hf-assisted,hf-prompt-lookup"
    escaped = ",".join("'" + s.replace("\n", "\\n") + "'" for s in stops)  # task.stop reads \n as a newline
    args = base + ["--methods", methods, "--out", str(out), f"task.stop=[{escaped}]",
                   f"method.speculative.draft={model_dir}", f"method.hf-assisted.draft={model_dir}"]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 6 and all(r["status"] == "exact" for r in records)
    reasons = {r["stop_reason"] for r in records}
    assert any(reason.startswith("stop:") for reason in reasons)
    assert reasons <= {"eos", "max_new_tokens"} | {f"stop:{s}" for s in stops}
    decode = decoder(tokenizer)
    for r in records:
        first = brute_first_stop(decode, r["tokens"], stops)
        if r["stop_reason"].startswith("stop:"):
            assert first == len(r["tokens"]) - 1 and r["stop_reason"][5:] in r["text"]
        else:
            assert first is None  # no output runs past a stop
    assert json.loads((out / "manifest.json").read_text())["config"]["task"]["stop"] is not None


def test_runner_defaults_humaneval_stops(model_dir, tmp_path):
    out = tmp_path / "he"
    assert main(["run", "--model", str(model_dir), "--task", "humaneval", "--limit", "1", "--max-new-tokens", "8",
                 "--out", str(out), "run.progress=false"]) == 0  # fmt: skip
    (record,) = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert record["stop_reason"] in {"eos", "max_new_tokens"} | {f"stop:{s}" for s in CODEX_STOP}
    assert brute_first_stop(decoder(AutoTokenizer.from_pretrained(model_dir)), record["tokens"], CODEX_STOP) in (
        None, len(record["tokens"]) - 1)  # fmt: skip
    assert Path(out / "summary.csv").exists()
