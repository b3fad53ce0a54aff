"""NEST: the kNN keys (windows, documents, exact search), strict mode equal to greedy
autoregressive with a datastore that holds the continuation / an unrelated one, stops inside an
accepted span, attribution, a random-init Qwen2, the relaxed mode (lossy: marked so, equal to
greedy only when the mixture cannot move the argmax), the build command, and the sampling law
of strict mode with a negative control."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from sampling_law import PVALUE_FLOOR, SAMPLE_PROMPT, SAMPLING, CONTROL_RUNS, METHOD_RUNS, sampled_pvalue, small_engine
from test_model_families import PROMPT, build
from test_speculative import autoregressive
from test_tree import ResampleFromP as WrongResidualVerifier
from test_tree import check_cache

from harness.cli import main
from harness.config import SamplingConfig
from harness.datastore import Datastore
from harness.engine import Engine
from harness.neighbours import KeyIndex, KeysMissing, TokenKeys, build_keys, document_ids, windows
from harness.registry import METHODS
from harness.stops import StopRule
from methods.nest import Nest, NestConfig, spans_after

PROMPTS = [[0, 17, 42, 99, 5], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]  # outputs without the EOS id (one document)
N = 40
GREEDY = SamplingConfig()


def store_for(engine: Engine, corpus: list[int]) -> tuple[Datastore, KeyIndex]:
    return Datastore.from_tokens(corpus), build_keys(engine, np.array(corpus), log=lambda _s: None)


def nest(engine, corpus: list[int], sampling=GREEDY, **cfg) -> Nest:
    store, keys = store_for(engine, corpus)
    return Nest(NestConfig(**cfg), engine, sampling, datastore=store, keys=keys)


def check_stats(gen, n: int) -> None:
    assert sum(gen.accepted_per_step) == len(gen.tokens) == n
    assert len(gen.accepted_per_step) == gen.target_forwards and gen.draft_forwards == 0
    assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))
    assert gen.extra["attributed_tokens"] <= sum(gen.accepted_per_position)  # only accepted draft tokens


# ---- keys ------------------------------------------------------------------------------------
def test_documents_and_windows():
    docs = document_ids(np.array([5, 6, 1, 7, 1, 8, 9, 9]), {1})
    assert docs.tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # a separator belongs to the document it ends
    assert windows(docs, 2) == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8)]


def test_spans_after_each_position_stop_at_the_document_end():
    rows = spans_after(np.array([5, 6, 1, 7, 8]), 5, 3, np.array([1]))
    assert rows.tolist() == [[6, 1, -1], [1, -1, -1], [7, 8, -1], [8, -1, -1], [-1, -1, -1]]


def test_keys_are_the_hidden_states_before_each_token(engine):
    corpus = [0, 5, 6, 7, 1, 8, 9, 10, 11, 12]
    keys = build_keys(engine, np.array(corpus), window=3, log=lambda _s: None)
    # windows [0,3) [3,5) [5,8) [8,10): keys for positions 1,2 | 4 | 6,7 | 9
    assert keys.positions.tolist() == [1, 2, 4, 6, 7, 9]
    assert keys.documents.tolist() == [0, 0, 0, 1, 1, 1]
    hidden = engine.forward([8, 9, 10], engine.new_cache(), hidden=True).hidden
    torch.testing.assert_close(keys.keys[3:5], hidden[:2].half().float())
    found = keys.search(hidden[1:2], 2)  # exact search: itself first
    assert found.positions[0, 0] == 7 and float(found.distances[0, 0]) < 1e-2


def test_search_among_the_keys_of_one_token_is_exact():
    """``TokenKeys.search`` = brute force over the keys whose predicted token is the one asked
    for: k of them when there are k (a search over all keys, filtered after, finds fewer)."""
    gen = torch.Generator().manual_seed(0)
    corpus = np.array([int(t) for t in torch.randint(0, 4, (301,), generator=gen)])
    positions = np.arange(1, 301)
    index = KeyIndex(torch.randn(300, 8, generator=gen), positions, np.zeros(300, dtype=np.int64))
    by_token = TokenKeys(index, corpus)
    query = torch.randn(1, 8, generator=gen)
    for token in range(4):
        found = by_token.search(query, 5, token)
        mine = np.flatnonzero(corpus[positions] == token)
        dist = (index.keys[mine] - query).norm(dim=1)
        order = torch.argsort(dist)[:5]
        assert found.positions[0].tolist() == positions[mine][order.numpy()].tolist()
        torch.testing.assert_close(found.distances[0], dist[order], atol=1e-4, rtol=1e-4)
        nearest_overall = [p for p in index.search(query, 5).positions[0].tolist() if corpus[p] == token]
        assert found.positions[0].tolist()[: len(nearest_overall)] == nearest_overall  # theirs lead ours
    assert by_token.search(query, 5, 9).positions.shape == (1, 0)  # a token no key predicts: none


def test_missing_keys_say_how_to_build_them(tmp_path, engine):
    Datastore.from_tokens([3, 4, 5, 3], {"format": 1}).save(tmp_path / "ds")
    with pytest.raises(KeysMissing, match="harness datastore build"):
        Nest(NestConfig(datastore=str(tmp_path / "ds")), engine, GREEDY)
    assert METHODS.get("nest") is Nest
    with pytest.raises(ValueError, match="strict"):
        Nest(NestConfig(mode="paper"), engine, GREEDY)
    with pytest.raises(ValueError, match="mode=strict to sample"):
        Nest(NestConfig(mode="relaxed"), engine, SAMPLING)


# ---- strict mode: equal to greedy autoregressive ---------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("span", [1, 4])
def test_datastore_with_the_continuation(engine, prompt, span):
    """The datastore is prompt + the autoregressive output: the nearest key of every query is the
    same context's, so every step's draft is right."""
    ref = autoregressive(engine, prompt, n=N)
    assert 1 not in ref  # no separator: one document, one window
    end = nest(engine, prompt + ref, span=span).loop(prompt, StopRule(N, frozenset()))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref
    check_stats(gen, N)
    assert gen.target_forwards == 1 + math.ceil((N - 1) / (span + 1))
    assert gen.extra["attributed_tokens"] == N - gen.target_forwards and gen.extra["documents_cited"] == 1
    check_cache(engine, cache, prompt + ref[:-1])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_unrelated_datastore(engine, prompt):
    ref = autoregressive(engine, prompt, n=N)
    rng = random.Random(3)
    noise = [rng.randrange(3, engine.config.vocab_size) for _ in range(800)]
    gen = nest(engine, noise, neighbours=64).generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    check_stats(gen, N)
    assert gen.extra["attribution_rate"] == sum(gen.accepted_per_position) / N


@pytest.mark.parametrize("limit", [1, 2, 3, 5, 8])
def test_max_new_tokens_inside_an_accepted_span(engine, limit):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt, n=N)
    end = nest(engine, prompt + ref, span=6).loop(prompt, StopRule(limit, frozenset()))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref[:limit] and gen.stop_reason == "max_new_tokens"
    check_cache(engine, cache, prompt + ref[: limit - 1])


def test_eos_inside_an_accepted_span(engine):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt, n=N)
    method = nest(engine, prompt + ref, span=6)
    k = next(i for i in range(3, N) if ref[i] not in ref[:i] and (i - 1) % 7 not in (0, 6))  # inside a span
    eos = frozenset({ref[k]})
    gen = method.generate(prompt, StopRule(N, eos))
    assert gen.tokens == ref[: k + 1] == autoregressive(engine, prompt, n=N, eos=eos)
    assert gen.stop_reason == "eos"


def test_random_init_qwen2():
    """tests/test_model_families.py's random Qwen2 (sliding-window layers among full ones)."""
    engine = build("qwen2", 0)
    ref = autoregressive(engine, PROMPT, n=N)
    assert len(set(ref)) > 5
    # one neighbour: the same context's key, so every draft is right (with more, other keys of the
    # same token also vote in the frequency tree)
    gen = nest(engine, PROMPT + ref, neighbours=1).generate(PROMPT, StopRule(N))
    assert gen.tokens == ref and gen.target_forwards == 1 + math.ceil((N - 1) / 7)


# ---- relaxed mode (lossy) ----------------------------------------------------------------------
def test_relaxed_mode_is_marked_lossy_and_exact_when_the_mixture_is_off(engine):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt, n=N)
    # lambda = exp(-d / 1e-9) = 0 unless a key is the query itself: p_M = p_LM except on the stored context
    off = nest(engine, [3, 4, 5, 6] * 50, mode="relaxed", lambda_scale=1e-9, relaxation=1.0)
    gen = off.generate(prompt, StopRule(N))
    assert gen.lossy and gen.tokens == ref and gen.target_forwards == N and gen.extra["mean_lambda"] == 0.0
    # on its own continuation the retrieval is certain: spans proposed and accepted, still the same tokens
    on = nest(engine, prompt + ref, mode="relaxed", span=4, lambda_scale=1.0, span_threshold=0.5, relaxation=1.0)
    gen = on.generate(prompt, StopRule(N))
    assert gen.lossy and gen.tokens == ref and gen.target_forwards == 1 + math.ceil((N - 1) / 5)
    assert gen.extra["attribution_rate"] == (N - gen.target_forwards) / N


def test_relaxed_mode_follows_the_corpus_where_the_target_would_not(engine):
    """A corpus that continues the prompt otherwise than the target: the certain retrieval wins
    (output differs from greedy, attributed to the corpus)."""
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt, n=N)
    other = [t for t in range(3, 300) if t not in ref][:N]
    corpus = prompt + [ref[0]] + other  # the corpus agrees on the first token, then parts ways
    gen = nest(engine, corpus, mode="relaxed", span=4, lambda_scale=1.0, relaxation=0.01).generate(prompt, StopRule(8))
    assert gen.lossy and gen.tokens[0] == ref[0] and gen.tokens != ref[:8]
    assert gen.tokens[1:5] == other[:4] and gen.extra["attributed_tokens"] >= 4


# ---- the build command ---------------------------------------------------------------------------
def test_build_command_with_keys_and_a_run(model_dir, tmp_path, tokenizer):
    texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.txt").write_text(texts[1])
    out = tmp_path / "ds"
    assert main(["datastore", "build", f"out={out}", f"tokenizer={model_dir}", f"keys={model_dir}",
                 f"inputs=[{tmp_path / 'a.txt'},{tmp_path / 'b.txt'}]"]) == 0  # fmt: skip
    keys = KeyIndex.load(out)
    tokens = np.load(out / "tokens.npy").tolist()
    assert len(keys) == len(tokens) - 2  # every token but each document's first
    assert json.loads((out / "keys.json").read_text())["keys"] == len(keys)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "0", "prompt": "def add(a, b):"}) + "\n")
    base = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "12",
            "run.progress=false", "--methods", "nest"]  # fmt: skip
    assert main(base + ["--out", str(tmp_path / "run"), f"method.nest.datastore={out}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] == "exact" for r in records)
    assert main(base + ["--out", str(tmp_path / "relaxed"), f"method.nest.datastore={out}", "method.nest.mode=relaxed"]) == 0
    ours = [json.loads(line) for line in (tmp_path / "relaxed" / "samples.jsonl").read_text().splitlines()]
    assert [r["lossy"] for r in ours] == [False, True] and ours[1]["status"] == "not-checked"


# ---- sampling ------------------------------------------------------------------------------------
class WrongResidual(Nest):
    """The negative control: strict NEST on the tree step whose last rule is wrong (tests/test_tree.py)."""

    verifier_class = WrongResidualVerifier


def test_strict_sampling_keeps_the_target_distribution():
    target = small_engine(0)
    rng = random.Random(4)
    corpus = [rng.randrange(8) for _ in range(400)]
    store, keys = store_for(target, corpus)
    cfg = NestConfig(neighbours=64, span=1, max_nodes=2)  # few children: the control's rejected ones come back often
    method = Nest(cfg, target, SAMPLING, datastore=store, keys=keys)
    gen = method.generate(SAMPLE_PROMPT, StopRule(6, frozenset()), seed=0)
    assert gen.extra["drafts"] >= gen.target_forwards - 2 and gen.extra["mean_tree_size"] > 2  # hand-checked: 3 of 5, 2.5
    pvalue, multi_step = sampled_pvalue(method, target, METHOD_RUNS)
    assert pvalue > PVALUE_FLOOR and multi_step == 1.0
    control = WrongResidual(cfg, target, SAMPLING, datastore=store, keys=keys)
    assert sampled_pvalue(control, target, CONTROL_RUNS)[0] < PVALUE_FLOOR
