"""Speculative decoding: greedy output equals autoregressive for drafts that are always
right, always wrong and right for j tokens; stop rules inside accepted blocks; cache
rollback; stats; the sampling distribution (with a negative control); the shared
acceptance helpers; draft loading and refusal."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tokenizer, tiny_model
from sampling_law import CONTROL_RUNS, PVALUE_FLOOR, RUNS, SAMPLING, sampled_pvalue, small_engine

from harness.cli import main
from harness.config import SamplingConfig
from harness.engine import Engine, ForwardOutput, ModelLoadError
from harness.stops import StopRule
from methods.acceptance import ChainVerifier, greedy_accept, residual, sample_accept
from methods.autoregressive import Autoregressive, AutoregressiveConfig
from methods.hf_assisted import HFAssisted, HFAssistedConfig
from methods.hf_generate import counting_calls
from methods.speculative import DraftMismatchError, Speculative, SpeculativeConfig

PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11]]
GREEDY = SamplingConfig()
N = 40  # new tokens in the long runs


class CountingCache:
    """A cache that only counts entries: all an oracle draft needs."""

    def __init__(self):
        self.n = 0

    def __len__(self) -> int:
        return self.n

    def truncate(self, length: int) -> None:
        assert 0 <= length <= self.n
        self.n = length


class OracleDraft:
    """A draft that knows the reference sequence (prompt + greedy output): in every
    proposal its first ``right`` tokens are the reference, the rest a wrong token.
    right=0 is a draft that is never accepted. Same interface as Engine."""

    def __init__(self, target: Engine, reference: list[int], right: int):
        self.config, self.tokenizer = target.config, target.tokenizer
        self.vocab = target.config.vocab_size
        self.reference, self.right = reference, right
        self.run, self.expect = 0, None  # tokens proposed in this proposal; (length, token) a continuation feeds

    def new_cache(self) -> CountingCache:
        return CountingCache()

    def forward(self, ids, cache, positions=None, mask=None, hidden=False, last_only=False) -> ForwardOutput:
        ids = torch.as_tensor(ids).flatten().tolist()
        if (len(cache), ids) != self.expect:  # not fed its own last token: a new proposal
            self.run = 0
        cache.n += len(ids)
        pos = len(cache)  # index in the sequence of the token predicted
        token = self.reference[pos] if pos < len(self.reference) else 0
        if self.run >= self.right:
            token = (token + 1) % self.vocab
        self.run += 1
        self.expect = (cache.n, [token])
        logits = torch.zeros(1 if last_only else len(ids), self.vocab)
        logits[-1, token] = 10.0
        return ForwardOutput(logits=logits)


def autoregressive(engine, prompt, n=N, eos=frozenset(), sampling=GREEDY, seed=0) -> list[int]:
    return Autoregressive(AutoregressiveConfig(), engine, sampling).generate(prompt, StopRule(n, eos), seed).tokens


def speculative(engine, draft, sampling=GREEDY, **cfg) -> Speculative:
    return Speculative(SpeculativeConfig(**cfg), engine, sampling, draft=draft)


# ---- greedy equality ------------------------------------------------------------------
@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("right", [0, 1, 2, 3, 100])
def test_oracle_draft_equals_autoregressive(engine, prompt, right):
    ref = autoregressive(engine, prompt)
    method = speculative(engine, OracleDraft(engine, prompt + ref, right), gamma=4)
    gen = method.generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    steps = gen.accepted_per_step
    # each step commits min(right, gamma) proposals + 1 (the last step may be capped by the limit)
    assert steps[0] == 1 and all(s == min(right, 4) + 1 for s in steps[1:-1])
    assert sum(steps) == N and len(steps) == gen.target_forwards
    assert gen.draft_forwards == sum(gen.proposed_per_position)
    accepted = gen.accepted_per_position
    assert len(accepted) == len(gen.proposed_per_position) == 4
    assert accepted[min(right, 4) :] == [0] * (4 - min(right, 4))


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_target_as_draft_accepts_everything(engine, prompt, gamma):
    ref = autoregressive(engine, prompt)
    gen = speculative(engine, engine, gamma=gamma).generate(prompt, StopRule(N, frozenset()))
    assert gen.tokens == ref
    full, rest = divmod(N - 1, gamma + 1)
    assert gen.accepted_per_step == [1] + [gamma + 1] * full + ([rest] if rest else [])
    assert gen.target_forwards == 1 + full + (1 if rest else 0)
    assert gen.accepted_per_position == gen.proposed_per_position
    assert gen.extra["mean_proposal"] <= gamma


def test_different_random_draft_equals_autoregressive(engine, tokenizer):
    other = Engine.from_model(tiny_model(len(tokenizer), seed=1), tokenizer)
    for prompt in PROMPTS:
        for schedule in ("constant", "heuristic"):
            gen = speculative(engine, other, gamma=3, schedule=schedule).generate(prompt, StopRule(N, frozenset()))
            assert gen.tokens == autoregressive(engine, prompt)
            assert sum(gen.accepted_per_step) == N and len(gen.accepted_per_step) == gen.target_forwards


def test_heuristic_schedule_grows_and_shrinks(engine):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt)
    grow = speculative(engine, engine, gamma=2, max_gamma=6, schedule="heuristic")
    up = grow.generate(prompt, StopRule(N, frozenset()))
    assert up.tokens == ref and up.accepted_per_step[:4] == [1, 3, 5, 7]  # gamma 2, 4, 6, 6
    down = speculative(engine, OracleDraft(engine, prompt + ref, 0), gamma=5, schedule="heuristic")
    gen = down.generate(prompt, StopRule(10, frozenset()))
    assert gen.tokens == ref[:10]
    assert gen.proposed_per_position == [8, 4, 3, 2, 1]  # gamma 5, 4, 3, 2, 1, 1, 1, 1 then a last 1-token step


# ---- stop rules ---------------------------------------------------------------------------
@pytest.mark.parametrize("limit", range(1, 13))
def test_max_new_tokens_is_never_overshot(engine, limit):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt)
    gen = speculative(engine, engine, gamma=4).generate(prompt, StopRule(limit, frozenset()))
    assert gen.tokens == ref[:limit]
    # proposals are capped by what is left, so no forward is wasted: 1 + ceil((limit - 1) / 5)
    assert gen.target_forwards == 1 + -(-(limit - 1) // 5)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_eos_inside_an_accepted_block(engine, prompt):
    ref = autoregressive(engine, prompt)
    # an EOS at an index in the middle of a 5-token block of gamma=4 (blocks are 1-5, 6-10, ...)
    k = next(i for i in range(2, N) if i % 5 in (2, 3, 4) and ref[i] not in ref[:i])
    eos = frozenset({ref[k]})
    assert autoregressive(engine, prompt, eos=eos) == ref[: k + 1]
    gen = speculative(engine, OracleDraft(engine, prompt + ref, 100), gamma=4).generate(prompt, StopRule(N, eos))
    assert gen.tokens == ref[: k + 1]
    assert gen.accepted_per_step[-1] == k % 5  # the block was cut at the EOS, nothing past it


def test_verifier_cuts_an_oversized_block_at_the_limit(engine):
    prompt = PROMPTS[0]
    ref = autoregressive(engine, prompt)
    chain = ChainVerifier(engine, GREEDY, StopRule(4, frozenset()), prompt, seed=0)
    chain.prefill()
    assert chain.verify(ref[1:9]) == 3  # 8 right tokens proposed, room for 3 of them
    assert chain.out.tokens == ref[:4] and chain.done and chain.per_step == [1, 3]
    assert len(chain.cache) == len(prompt) + 3


# ---- caches --------------------------------------------------------------------------------
@pytest.mark.parametrize("right", [0, 2, 100])
def test_caches_are_rolled_back_to_the_committed_length(engine, tokenizer, right):
    prompt = PROMPTS[2]
    ref = autoregressive(engine, prompt, n=23)
    other = Engine.from_model(tiny_model(len(tokenizer), seed=2), tokenizer)
    drafts = [OracleDraft(engine, prompt + ref, right), other]
    for draft in drafts:
        end = speculative(engine, draft, gamma=4).loop(prompt, StopRule(23, frozenset()))
        assert end.generation.tokens == ref
        assert len(end.cache) == len(prompt) + len(ref) - 1  # everything but the last token
        assert len(end.draft_cache) <= len(prompt) + len(ref) - 1
        # a rolled-back cache continues exactly like a fresh one
        fresh = engine.new_cache()
        expect = engine.forward(prompt + ref, fresh).logits[-1]
        got = engine.forward([ref[-1]], end.cache).logits[-1]
        assert torch.allclose(expect, got, atol=1e-5)


# ---- acceptance helpers -----------------------------------------------------------------------
def test_greedy_accept():
    logits = torch.nn.functional.one_hot(torch.tensor([4, 5, 6, 7]), 10).float()  # argmax 4, 5, 6, 7
    assert greedy_accept([4, 5, 6], logits) == [4, 5, 6, 7]
    assert greedy_accept([4, 9, 6], logits) == [4, 5]
    assert greedy_accept(torch.tensor([1, 5, 6]), logits) == [4]
    assert greedy_accept([], logits[:1]) == [4]


def test_residual():
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.6, 0.2])
    assert torch.allclose(residual(p, q), torch.tensor([0.3, 0.0, 0.0]))
    assert torch.allclose(residual(p, token=0), torch.tensor([0.0, 0.3, 0.2]))
    assert torch.equal(residual(p, p), p)  # nothing left: rejection impossible, fall back to p


def test_sample_accept_matches_the_rule_exactly():
    """One draft position over a 3-token vocabulary: the output law is p, exactly."""
    p = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    q = torch.tensor([[0.2, 0.6, 0.2]])
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    for _ in range(5000):
        d = torch.multinomial(q[0], 1, generator=gen)
        counts[sample_accept(d, p, q, gen)[0]] += 1
    assert torch.allclose(counts / counts.sum(), p[0], atol=0.03)


# ---- draft loading ----------------------------------------------------------------------------
def test_draft_by_path_and_refusals(engine, tokenizer, model_dir, tmp_path):
    method = Speculative(SpeculativeConfig(draft=str(model_dir)), engine, GREEDY)
    assert method.draft.device == engine.device and method.draft.model.dtype == torch.float32
    assert method.generate(PROMPTS[0], StopRule(12, frozenset())).tokens == autoregressive(engine, PROMPTS[0], n=12)
    with pytest.raises(ModelLoadError, match="no draft model"):
        Speculative(SpeculativeConfig(), engine, GREEDY)
    other_size = tmp_path / "other"
    tiny_model(len(tokenizer) + 8).save_pretrained(other_size)
    tokenizer.save_pretrained(other_size)
    with pytest.raises(DraftMismatchError, match="vocabulary size"):
        Speculative(SpeculativeConfig(draft=str(other_size)), engine, GREEDY)
    other_map = Engine.from_model(tiny_model(len(tokenizer)), build_tokenizer(len(tokenizer) + 20))
    with pytest.raises(DraftMismatchError, match="other ids"):
        speculative(engine, other_map)
    with pytest.raises(ValueError, match="schedule"):
        speculative(engine, engine, schedule="sometimes")


# ---- transformers' assisted generation, and the command line ------------------------------------
def test_hf_assisted_equals_autoregressive(engine, tokenizer):
    other = Engine.from_model(tiny_model(len(tokenizer), seed=1), tokenizer)
    for schedule in ("constant", "heuristic"):
        method = HFAssisted(HFAssistedConfig(num_assistant_tokens_schedule=schedule), engine, GREEDY, draft=other)
        for prompt in PROMPTS:
            eos = frozenset(engine.eos_ids)  # transformers' generate stops at the model's EOS anyway
            with counting_calls(engine.model, other.model) as forwards:  # each model's, counted apart
                gen = method.generate(prompt, StopRule(N, eos))
            assert gen.tokens == autoregressive(engine, prompt, eos=eos)
            assert [gen.target_forwards, gen.draft_forwards] == forwards
            # a draft that is never right: one token per target forward
            assert gen.target_forwards == len(gen.tokens) and gen.draft_forwards >= len(gen.tokens) - 1
            assert gen.accepted_per_step == [1] * len(gen.tokens)
            again = method.generate(prompt, StopRule(N, eos))  # the schedule restarts every call
            assert again.tokens == gen.tokens and again.draft_forwards == gen.draft_forwards
    with pytest.raises(ValueError, match="greedy"):
        HFAssisted(HFAssistedConfig(), engine, SamplingConfig(do_sample=True), draft=other)


def test_command_line_with_drafts(model_dir, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "a", "prompt": "def add(a, b):"}) + "\n")
    out = tmp_path / "run"
    methods = "speculative,prompt-lookup,hf-assisted,hf-prompt-lookup"
    args = ["run", "--methods", methods, "--model", str(model_dir), "--task", "jsonl", f"task.path={prompts}",
            "--max-new-tokens", "16", "--out", str(out), "run.progress=false", f"method.speculative.draft={model_dir}",
            f"method.hf-assisted.draft={model_dir}", "method.speculative.gamma=3", "method.prompt-lookup.num_tokens=5",
            "method.hf-assisted.num_assistant_tokens=3", "method.hf-prompt-lookup.prompt_lookup_num_tokens=5"]  # fmt: skip
    assert main(args) == 0
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted(r["method"] for r in records) == sorted(["autoregressive"] + methods.split(","))
    assert all(r["status"] == "exact" for r in records)
    by_name = {r["method"]: r for r in records}
    assert by_name["speculative"]["target_forwards"] == 1 + 4  # the target as draft: 1 + 4 + 4 + 4 + 3 tokens
    assert by_name["hf-assisted"]["target_forwards"] == 4  # transformers' first step verifies with the prefill
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["method"]["prompt-lookup"]["num_tokens"] == 5


# ---- the sampling distribution (tests/sampling_law.py) -------------------------------------------
# gamma = 1: the first four tokens always take the prefill and at least two verify steps, so the
# target and draft caches rolled back after a sampled rejection are under test, not only the first
# block. Calibrated: p = 0.13, 0.60, 0.21 for seeds 0-1499, 5000-6499, 10000-11499; resampling from
# p instead of the residual: p = 2e-5 at 800 runs.
def resample_from_p(p, q=None, token=None):
    """A broken ``residual`` (upstream SPACE's mistake): the negative control."""
    return p


def test_speculative_sampling_keeps_the_target_distribution(monkeypatch):
    target, draft = small_engine(0), small_engine(1)
    method = speculative(target, draft, SAMPLING, gamma=1)
    pvalue, multi_step = sampled_pvalue(method, target, RUNS)
    assert pvalue > PVALUE_FLOOR and multi_step == 1.0
    # negative control, same statistic: resample from p instead of the residual after a rejection
    monkeypatch.setattr("methods.acceptance.residual", resample_from_p)
    assert sampled_pvalue(method, target, CONTROL_RUNS)[0] < PVALUE_FLOOR
