"""REST: the suffix array and its searches against brute force, the frequency trie and its
pruning, greedy output equal to autoregressive with a datastore that holds the exact
continuation / an unrelated one / the right one for j tokens, max_new_tokens inside an
accepted path, stats, the datastore build command and its manifest, and the missing
datastore error (stop rules and the sampling law every method keeps: tests/test_conformance.py)."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from test_speculative import autoregressive
from test_tree import check_cache

from harness.cli import main
from harness.config import SamplingConfig
from harness.datastore import Datastore, DatastoreError, suffix_array
from harness.registry import METHODS
from harness.stops import StopRule
from methods.rest import Rest, RestConfig, frequency_tree, padded

PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
N = 60
GREEDY = SamplingConfig()


def rest(engine, store: Datastore, sampling=GREEDY, **cfg) -> Rest:
    return Rest(RestConfig(**cfg), engine, sampling, datastore=store)


def check_stats(gen, n: int) -> None:
    assert sum(gen.accepted_per_step) == len(gen.tokens) == n
    assert len(gen.accepted_per_step) == gen.target_forwards and gen.draft_forwards == 0
    assert len(gen.accepted_per_position) == len(gen.proposed_per_position)
    assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))
    assert gen.extra["hits"] <= gen.extra["lookups"] <= gen.target_forwards - 1


def absent(engine, *seqs: list[int]) -> int:
    used = {t for s in seqs for t in s}
    return next(t for t in range(engine.config.vocab_size) if t not in used)


# ---- the datastore -------------------------------------------------------------------------
def random_corpus(rng: random.Random) -> list[int]:
    tokens = [rng.randrange(rng.choice([1, 2, 3, 40])) for _ in range(rng.randrange(0, 50))]
    if rng.random() < 0.4:  # long repeats: the doubling needs many rounds
        tokens = tokens + tokens[: rng.randrange(len(tokens) + 1)] + tokens
    return tokens


def test_suffix_array_matches_brute_force():
    rng = random.Random(0)
    for _ in range(400):
        tokens = random_corpus(rng)
        assert suffix_array(tokens).tolist() == sorted(range(len(tokens)), key=lambda i: tokens[i:]), tokens
    assert suffix_array([]).tolist() == []
    assert suffix_array([7] * 9).tolist() == list(range(8, -1, -1))  # shorter suffixes first


def brute_range(tokens: list[int], pattern: list[int]) -> list[int]:
    """Start positions of ``pattern`` in ``tokens``, in suffix order."""
    starts = [i for i in range(len(tokens)) if tokens[i : i + len(pattern)] == pattern]
    return sorted(starts, key=lambda i: tokens[i:])


def test_find_and_longest_match_match_brute_force():
    rng = random.Random(1)
    for _ in range(300):
        tokens = random_corpus(rng)
        store = Datastore.from_tokens(tokens)
        for _ in range(5):
            pattern = [rng.randrange(3) for _ in range(rng.randrange(1, 5))]
            lo, hi, probes = store.find(pattern)
            assert sorted(store.sa[lo:hi].tolist()) == sorted(brute_range(tokens, pattern))
            assert probes <= 2 * (math.ceil(math.log2(len(tokens) + 1)) + 1)
            context = [rng.randrange(3) for _ in range(rng.randrange(1, 12))]
            lo_len, hi_len = rng.randrange(1, 3), rng.randrange(2, 8)
            match = store.longest_match(context, lo_len, hi_len)
            # brute force: the longest tail in [lo_len, hi_len] that occurs with a token after it
            want = next((m for m in range(min(hi_len, len(context)), lo_len - 1, -1)
                         if any(tokens[i : i + m] == context[-m:] and i + m < len(tokens)
                                for i in range(len(tokens)))), None)  # fmt: skip
            assert (match.length if match else None) == want, (tokens, context, lo_len, hi_len)
            if match:
                assert sorted(store.sa[match.lo : match.hi].tolist()) == sorted(brute_range(tokens, context[-want:]))


def test_a_longer_context_matches_at_most_the_tokens_added_more():
    """What the lookups' ``reach`` rests on: if the longest suffix of a context that occurs
    (followed by a token) has L tokens, after a more tokens the longest has at most L + a."""
    rng = random.Random(4)
    for _ in range(300):
        tokens = random_corpus(rng)
        store = Datastore.from_tokens(tokens)
        context = [rng.randrange(3) for _ in range(rng.randrange(1, 10))]
        added = [rng.randrange(3) for _ in range(rng.randrange(1, 4))]
        before = store.longest_match(context, 1, 20)
        after = store.longest_match(context + added, 1, 20)
        if after is not None:
            assert after.length <= (before.length if before else 0) + len(added)


def test_a_bounded_lookup_finds_the_same_drafts(engine):
    """REST bounds each lookup by the last match plus the tokens committed since: the same
    matches, hence the same steps, with fewer suffix comparisons than unbounded lookups."""

    class Unbounded(Rest):
        def propose(self, seq, room, reach, stats):
            return super().propose(seq, room, self.cfg.max_suffix, stats)

    prompt = PROMPTS[3]
    ref = autoregressive(engine, prompt, n=N)
    rng = random.Random(5)
    store = Datastore.from_tokens([t for _ in range(20) for t in ref[: rng.randrange(2, N)] + [3, 4]])
    bounded = rest(engine, store).generate(prompt, StopRule(N, frozenset()))
    unbounded = Unbounded(RestConfig(), engine, GREEDY, datastore=store).generate(prompt, StopRule(N, frozenset()))
    assert bounded.tokens == unbounded.tokens == ref
    assert bounded.accepted_per_step == unbounded.accepted_per_step and len(bounded.accepted_per_step) < N
    assert bounded.extra["mean_match_length"] == unbounded.extra["mean_match_length"]
    assert bounded.extra["lookup_probes"] < unbounded.extra["lookup_probes"]


def test_continuations_spread_over_the_matches():
    tokens = [5, 1, 2, 5, 1, 3, 5, 1, 2, 5, 1, 2, 5, 1]
    store = Datastore.from_tokens(tokens)
    match = store.longest_match([9, 5, 1], 1, 4)
    assert match.length == 2 and match.count == 5
    every = store.continuations(match, 10, 2).tolist()
    assert sorted(every) == [[2, 5]] * 3 + [[3, 5]]  # the occurrence at the corpus's end has none
    spread = store.continuations(match, 3, 1).tolist()  # ranks lo, lo + 1, lo + 3 of the 5; the first is the end
    assert len(spread) == 2 and all(c in ([2], [3]) for c in spread)
    assert store.continuations(match, 10, 4).tolist().count([2, 5, 1, -1]) == 1  # -1 past the corpus's end


def test_frequency_tree_hand_checked():
    conts = [[1, 2, 3], [1, 2, 4], [1, 5], [6], [1, 2, 3]]
    tree = frequency_tree(9, conts, max_nodes=100)
    # counts: (1)4 (1,2)3 (1,2,3)2 (1,2,4)1 (1,5)1 (6)1; ties shallower first, then first seen
    assert tree.tokens == [9, 1, 2, 3, 6, 5, 4]
    assert tree.parents == (-1, 0, 1, 2, 0, 1, 2)
    small = frequency_tree(9, conts, max_nodes=3)
    assert small.tokens == [9, 1, 2, 3] and small.parents == (-1, 0, 1, 2)
    assert frequency_tree(9, [], 5).tokens == [9]
    rows = padded(conts)  # a matrix, -1 after each continuation's end: the same tree
    assert rows[2].tolist() == [1, 5, -1] and frequency_tree(9, rows, max_nodes=100) == tree


def test_frequency_tree_pruning_is_prefix_closed_and_keeps_the_most_frequent():
    rng = random.Random(2)
    for _ in range(200):
        conts = [[rng.randrange(3) for _ in range(rng.randrange(1, 5))] for _ in range(rng.randrange(1, 12))]
        k = rng.randrange(1, 10)
        tree = frequency_tree(7, conts, k)
        paths = {0: ()}
        for i in range(1, len(tree.tokens)):
            assert tree.parents[i] < i  # parents first: prefix-closed
            paths[i] = paths[tree.parents[i]] + (tree.tokens[i],)
        count = lambda p: sum(1 for c in conts if tuple(c[: len(p)]) == p)  # noqa: E731
        every = {tuple(c[:d]) for c in conts for d in range(1, len(c) + 1)}
        kept = set(paths.values()) - {()}
        assert len(kept) == len(tree.tokens) - 1 == min(k, len(every))  # distinct nodes (a trie)
        dropped = every - kept
        if dropped and kept:
            assert min(count(p) for p in kept) >= max(count(p) for p in dropped)


def test_save_load_and_the_missing_datastore(tmp_path, engine):
    store = Datastore.from_tokens([3, 4, 5, 3, 4, 6], {"format": 1, "tokens": 6})
    store.save(tmp_path / "ds")
    loaded = Datastore.load(tmp_path / "ds")
    assert loaded.tokens.tolist() == [3, 4, 5, 3, 4, 6] and loaded.sa.tolist() == store.sa.tolist()
    assert loaded.manifest["bytes"] > 0
    with pytest.raises(DatastoreError, match="harness datastore build"):
        Rest(RestConfig(datastore=str(tmp_path / "nowhere")), engine, GREEDY)
    assert METHODS.get("rest") is Rest


def test_build_command_and_a_run(model_dir, tmp_path, tokenizer):
    """`harness datastore build` on text + jsonl files with the model's tokenizer; a run with
    rest on it is exact; a missing datastore fails before the run with one line."""
    texts = ["def add(a, b):\n    return a + b\n", "for i in range(10):\n    print(i)\n"]
    (tmp_path / "a.txt").write_text(texts[0])
    lines = [{"text": texts[1], "lang": "python"}, {"text": "int main() {}", "lang": "cpp"}]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "ds"
    assert main(["datastore", "build", f"out={out}", f"tokenizer={model_dir}",
                 f"inputs=[{tmp_path / 'a.txt'},{tmp_path / 'b.jsonl'}]", "languages=[python]"]) == 0  # fmt: skip
    manifest = json.loads((out / "manifest.json").read_text())
    ids = [tokenizer(t, add_special_tokens=False).input_ids + [tokenizer.eos_token_id] for t in texts]
    assert np.load(out / "tokens.npy").tolist() == ids[0] + ids[1]
    assert manifest["tokens"] == len(ids[0] + ids[1]) and manifest["bytes"] > 0 and manifest["build_seconds"] >= 0
    assert [s["documents"] for s in manifest["sources"]] == [1, 1]
    assert manifest["tokenizer"]["vocab_size"] == len(tokenizer)
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "0", "prompt": "def add(a, b):"}) + "\n")
    base = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "12",
            "run.progress=false", "--methods", "rest"]  # fmt: skip
    assert main(base + ["--out", str(tmp_path / "run"), f"method.rest.datastore={out}"]) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["status"] == "exact" for r in records)
    ours = next(r for r in records if r["method"] == "rest")
    assert ours["extra"]["datastore_tokens"] == manifest["tokens"] and "lookup_ms_mean" in ours["extra"]
    refused = tmp_path / "refused"
    assert main(base + ["--out", str(refused), f"method.rest.datastore={tmp_path / 'none'}"]) == 2
    assert not (refused / "samples.jsonl").exists()
    assert main(["datastore", "build", f"out={tmp_path / 'x'}", f"inputs=[{tmp_path / 'missing.txt'}]"]) == 1


# ---- equality with greedy AR -----------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("copy_tokens", [1, 4, 8])
def test_datastore_with_the_exact_continuation(engine, prompt, copy_tokens):
    """The datastore is prompt + the autoregressive output: every step's tree holds the right path."""
    ref = autoregressive(engine, prompt, n=N)
    store = Datastore.from_tokens(prompt + ref)
    end = rest(engine, store, copy_tokens=copy_tokens).loop(prompt, StopRule(N, frozenset()))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref
    check_stats(gen, N)
    assert gen.extra["hits"] == gen.extra["lookups"]
    assert gen.target_forwards == 1 + math.ceil((N - 1) / (copy_tokens + 1))  # copy_tokens + 1 per step
    check_cache(engine, cache, prompt + ref[:-1])


@pytest.mark.parametrize("prompt", PROMPTS)
def test_unrelated_datastore(engine, prompt):
    ref = autoregressive(engine, prompt, n=N)
    wrong = absent(engine, prompt, ref)
    store = Datastore.from_tokens([t for x in sorted(set(prompt + ref)) for t in (x, wrong, wrong)])
    gen = rest(engine, store, min_suffix=1).generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    check_stats(gen, N)
    assert gen.extra["hits"] == N - 2 and sum(gen.accepted_per_position) == 0  # proposed every step, never right
    rng = random.Random(3)
    noise = Datastore.from_tokens([rng.randrange(engine.config.vocab_size) for _ in range(3000)])
    gen = rest(engine, noise, min_suffix=1).generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    check_stats(gen, N)


@pytest.mark.parametrize("j", [0, 1, 2, 5])
def test_datastore_right_for_j_tokens(engine, j):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt, n=N)
    store = Datastore.from_tokens(prompt[-3:] + ref[: j + 1] + [absent(engine, prompt, ref)])
    gen = rest(engine, store, max_suffix=4).generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    check_stats(gen, N)
    assert gen.accepted_per_step[1] == j + 1


@pytest.mark.parametrize("limit", range(1, 14))
def test_max_new_tokens_inside_an_accepted_path(engine, limit):
    prompt = PROMPTS[2]
    ref = autoregressive(engine, prompt, n=N)
    end = rest(engine, Datastore.from_tokens(prompt + ref), copy_tokens=5).loop(prompt, StopRule(limit, frozenset()))
    gen, cache = end.generation, end.cache
    assert gen.tokens == ref[:limit] and gen.stop_reason == "max_new_tokens"
    check_stats(gen, limit)
    assert len(gen.proposed_per_position) <= max(limit - 2, 0)  # no tree deeper than what may be committed
    check_cache(engine, cache, prompt + ref[: limit - 1])


# ---- sampling ----------------------------------------------------------------------------------
