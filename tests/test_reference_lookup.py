"""Reference lookup (LLMA): the reference index against a brute force, greedy output equal to
autoregressive with a reference that is always right / always wrong / right for j tokens,
max_new_tokens inside an accepted block, the source rule (auto | prompt | sample), and the
runner's plumbing (the jsonl reference reaches the method; a required reference is checked
before the run). Stop rules and the sampling law every method keeps: tests/test_conformance.py."""

from __future__ import annotations

import json
import math
import random

import pytest
from test_speculative import autoregressive

from harness.cli import main
from harness.config import SamplingConfig
from harness.registry import METHODS
from harness.stops import StopRule
from methods.acceptance import ReferenceIndex
from methods.reference_lookup import ReferenceLookup, ReferenceLookupConfig

PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11], [0, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]]
N = 60


def brute_force(source: list[int], tokens: list[int], k: int, cursor: int, min_n: int, max_n: int):
    """(copy, start): the first occurrence of the longest matching tail n-gram whose continuation
    starts at or after ``cursor`` (else the first one), or None."""
    if k <= 0:
        return None
    for n in range(max_n, min_n - 1, -1):
        if n > len(tokens):
            continue
        follows = [e for e in range(n, len(source)) if source[e - n : e] == tokens[-n:]]
        if follows:
            start = next((e for e in follows if e >= cursor), follows[0])
            return source[start : start + k], start
    return None


def method(engine, sampling=None, **cfg) -> ReferenceLookup:
    return ReferenceLookup(ReferenceLookupConfig(**cfg), engine, sampling or SamplingConfig())


def absent(engine, *seqs: list[int]) -> int:
    """A token id in none of ``seqs``: a draft token that is always wrong."""
    used = {t for s in seqs for t in s}
    return next(t for t in range(engine.config.vocab_size) if t not in used)


def check_stats(gen, n: int) -> None:
    assert sum(gen.accepted_per_step) == len(gen.tokens) == n
    assert len(gen.accepted_per_step) == gen.target_forwards and gen.draft_forwards == 0
    assert len(gen.accepted_per_position) == len(gen.proposed_per_position)
    assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))


def test_reference_index_matches_brute_force():
    rng = random.Random(0)
    for _ in range(500):
        source = [rng.randrange(4) for _ in range(rng.randrange(0, 25))]
        tokens = [rng.randrange(5) for _ in range(rng.randrange(1, 12))]
        k, cursor, min_n = rng.randrange(0, 6), rng.randrange(0, 27), rng.randrange(1, 3)
        max_n = min_n + rng.randrange(0, 3)
        copy = ReferenceIndex(source, min_n, max_n).lookup(tokens, k, cursor)
        got = None if copy is None else (copy.tokens, copy.start)
        assert got == brute_force(source, tokens, k, cursor, min_n, max_n), (source, tokens, k, cursor, min_n, max_n)
    index = ReferenceIndex([1, 2, 3, 9, 1, 2, 4, 7, 2, 5], 1, 3)
    assert index.lookup([8, 1, 2], 3).tokens == [3, 9, 1]  # the first occurrence...
    assert index.lookup([8, 1, 2], 3, cursor=3).tokens == [4, 7, 2]  # ...or the first after the cursor
    assert index.lookup([8, 1, 2], 3, cursor=9).tokens == [3, 9, 1]  # none after it: the first again
    assert index.lookup([7, 2], 4).tokens == [5]  # cut at the end of the source
    assert index.lookup([6, 2], 2).tokens == [3, 9]  # the longest n that matches ([2])
    assert index.lookup([5], 2) is None  # the source's last token has nothing after it
    assert index.lookup([1], 0) is None
    with pytest.raises(ValueError):
        ReferenceIndex([1, 2], 2, 1)


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("copy_tokens", [1, 4, 10])
def test_reference_always_right(engine, prompt, copy_tokens):
    """The reference is the autoregressive output: every copy is accepted whole, one bonus each."""
    ref = autoregressive(engine, prompt, n=N)
    gen = method(engine, copy_tokens=copy_tokens).generate(prompt, StopRule(N, frozenset()), reference_ids=ref)
    assert gen.tokens == ref
    check_stats(gen, N)
    assert gen.target_forwards == 1 + math.ceil((N - 1) / (copy_tokens + 1))
    assert gen.accepted_per_position == gen.proposed_per_position
    assert gen.extra == {"mean_proposal": pytest.approx((N - gen.target_forwards) / (gen.target_forwards - 1)),
                         "source_tokens": N, "from_reference": True}  # fmt: skip


@pytest.mark.parametrize("prompt", PROMPTS)
def test_reference_always_wrong(engine, prompt):
    """Each context token is followed in the reference by a token the model never emits."""
    ref = autoregressive(engine, prompt, n=N)
    wrong = absent(engine, prompt, ref)
    reference = [x for t in sorted(set(prompt + ref)) for x in (t, wrong)]
    gen = method(engine).generate(prompt, StopRule(N, frozenset()), reference_ids=reference)
    assert gen.tokens == ref
    check_stats(gen, N)
    # a proposal every verify step but the last (no room left for a draft token there)...
    assert gen.target_forwards == N and gen.proposed_per_position[0] == N - 2
    assert sum(gen.accepted_per_position) == 0  # ...never accepted


@pytest.mark.parametrize("j", [0, 1, 2, 3, 6])
def test_reference_right_for_j_tokens(engine, j):
    """The reference holds the first j+1 output tokens, then a wrong one: the first copy (after
    the prefill's token) is right for j tokens, so that step commits j + 1."""
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt, n=N)
    assert ref[0] not in ref[1 : j + 1] and prompt[-1] not in ref[: j + 1]  # the match is at the start
    reference = ref[: j + 1] + [absent(engine, prompt, ref)]
    gen = method(engine).generate(prompt, StopRule(N, frozenset()), reference_ids=reference)
    assert gen.tokens == ref
    check_stats(gen, N)
    assert gen.accepted_per_step[1] == j + 1
    end = method(engine).loop(prompt, StopRule(N, frozenset()), reference)
    assert end.proposed_per_step[0] == j + 1  # j + 1 proposed, j accepted (+ the correction)


@pytest.mark.parametrize("limit", range(1, 16))
def test_max_new_tokens_inside_an_accepted_block(engine, limit):
    prompt = PROMPTS[1]
    ref = autoregressive(engine, prompt, n=N)
    gen = method(engine, copy_tokens=6).generate(prompt, StopRule(limit, frozenset()), reference_ids=ref)
    assert gen.tokens == ref[:limit] and gen.stop_reason == "max_new_tokens"
    check_stats(gen, limit)
    end = method(engine, copy_tokens=6).loop(prompt, StopRule(limit, frozenset()), ref)
    per_step = end.generation.accepted_per_step
    committed = [sum(per_step[: i + 1]) for i in range(len(per_step))]
    # each copy fits what is left: g <= min(copy_tokens, limit - committed - 1)
    assert all(g <= min(6, limit - c - 1) for g, c in zip(end.proposed_per_step, committed))


def test_cache_is_rolled_back_to_the_committed_length(engine):
    for prompt in PROMPTS:
        ref = autoregressive(engine, prompt, n=37)
        wrong = absent(engine, prompt, ref)
        half_right = [x for i, t in enumerate(ref) for x in ((t, wrong) if i % 5 == 4 else (t,))]
        end = method(engine).loop(prompt, StopRule(37, frozenset()), half_right)
        assert end.generation.tokens == ref
        assert len(end.cache) == len(prompt) + 37 - 1


def test_source_rule(engine):
    """auto: the reference when the sample has one, else the prompt; prompt: always the prompt;
    sample: the reference, required."""
    prompt = PROMPTS[3]
    ref = autoregressive(engine, prompt, n=N)
    stop = StopRule(N, frozenset())
    from_ref = method(engine).generate(prompt, stop, reference_ids=ref)
    from_prompt = method(engine).generate(prompt, stop)
    assert from_ref.extra["from_reference"] and from_ref.extra["source_tokens"] == N
    assert not from_prompt.extra["from_reference"] and from_prompt.extra["source_tokens"] == len(prompt)
    forced_prompt = method(engine, source="prompt").generate(prompt, stop, reference_ids=ref)
    assert forced_prompt.accepted_per_step == from_prompt.accepted_per_step != from_ref.accepted_per_step
    assert not forced_prompt.extra["from_reference"]
    sample = method(engine, source="sample")
    assert sample.requires_reference and not method(engine).requires_reference
    assert sample.generate(prompt, stop, reference_ids=ref).accepted_per_step == from_ref.accepted_per_step
    with pytest.raises(ValueError, match="source=sample but the sample has no reference"):
        sample.generate(prompt, stop)
    for gen in (from_ref, from_prompt, forced_prompt):
        assert gen.tokens == ref
    for bad, match in [({"source": "doc"}, "source='doc'"), ({"copy_tokens": 0}, "copy_tokens=0"),
                       ({"match_tokens": 1, "min_match_tokens": 2}, "min_match_tokens <= match_tokens")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            method(engine, **bad)
    assert METHODS.get("reference-lookup") is ReferenceLookup and ReferenceLookup.uses_reference


def test_runner_hands_the_jsonl_reference_to_the_method(model_dir, tmp_path, tokenizer, capsys):
    """The runner tokenises a jsonl line's reference and passes it to reference-lookup only;
    outputs are exact; source=sample with a sample lacking a reference fails before the run."""
    texts = ["def add(a, b):", "class Foo:"]
    prompts = tmp_path / "p.jsonl"
    free = tmp_path / "free"
    base = ["run", "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}", "--max-new-tokens", "20",
            "run.progress=false"]  # fmt: skip
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(texts)))
    assert main(base + ["--out", str(free)]) == 0
    outputs = [json.loads(line)["text"] for line in (free / "samples.jsonl").read_text().splitlines()]
    # line 0's reference: the model's own output text (so copies are accepted); line 1 has none
    lines = [{"id": "0", "prompt": texts[0], "reference": outputs[0]}, {"id": "1", "prompt": texts[1]}]
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "ref"
    assert main(base + ["--out", str(out), "--methods", "reference-lookup,prompt-lookup"]) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(r["status"] == "exact" for r in records)
    ours = {r["sample_id"]: r for r in records if r["method"] == "reference-lookup"}
    assert ours["0"]["extra"]["from_reference"] and not ours["1"]["extra"]["from_reference"]
    assert ours["0"]["extra"]["source_tokens"] == len(tokenizer(outputs[0], add_special_tokens=False).input_ids)
    assert ours["0"]["target_forwards"] < len(ours["0"]["tokens"])  # the reference's copies were accepted
    refused = tmp_path / "refused"
    args = base + ["--out", str(refused), "--methods", "reference-lookup", "method.reference-lookup.source=sample"]
    assert main(args) == 2 and not (refused / "samples.jsonl").exists()
    assert "error: reference-lookup copies from the sample's reference, but 1 sample(s) have none (first: 1)" in (
        capsys.readouterr().err)  # fmt: skip


