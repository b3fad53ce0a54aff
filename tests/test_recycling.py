"""Token recycling: the template, the adjacency table (refresh and expansion, hand-checked and
from a real run), equality with greedy autoregressive decoding for tables that hold the right
token at a given rank / never / as the run fills them, EOS and max_new_tokens inside an accepted
path, and the table's persistence setting (the sampling law every method keeps:
tests/test_conformance.py; the walk: tests/test_tree.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model
from test_model_families import PositionLog
from test_speculative import autoregressive

from harness.config import SamplingConfig
from harness.engine import Engine
from harness.stops import StopRule
from methods.recycling import TREES, AdjacencyTable, Recycling, RecyclingConfig, build_template, rank_budget
from methods.tree import TreeError, TreeVerifier

GREEDY = SamplingConfig()
PROMPTS = [[0, 17, 42, 99, 5], [0, 3], [0, 250, 251, 252, 253, 254, 255, 10, 11]]
DISTINCT = PROMPTS[2]  # its greedy continuation repeats no token within 6 (checked where it matters)
N = 40


def recycling(engine, sampling=GREEDY, **cfg) -> Recycling:
    return Recycling(RecyclingConfig(**cfg), engine, sampling)


class Oracle(Recycling):
    """Before each step, the rows of the root and of the next tokens of the reference ``ref``
    are overwritten: the row of each holds the reference's next token at rank ``rank`` (the
    first ``right`` of them; after that no row holds it), the other ranks wrong tokens."""

    def __init__(self, cfg, engine, ref: list[int], rank: int = 0, right: int = 100):
        super().__init__(cfg, engine, GREEDY)
        self.ref, self.rank, self.right = ref, rank, right

    def propose(self, seq, room):
        vocab, k = self.table.rows.shape
        wrong = [t for t in range(vocab) if t not in set(self.ref)][:k]  # never a reference token
        path = self.ref[len(seq) - 1 : len(seq) + self.template.max_depth]
        for i, (token, nxt) in enumerate(zip(path, path[1:])):
            row = list(wrong)
            if i < self.right and self.rank < k:
                row[self.rank] = nxt
            self.table.rows[token] = torch.tensor(row, dtype=torch.int32)
        return super().propose(seq, room)


# ---- the template and the table ------------------------------------------------------------------
def test_templates_hand_checked():
    assert rank_budget(3) == [(0,), (0, 0), (0, 0, 0), (0, 1), (1,), (1, 0), (2,)]
    assert [len(TREES[t]) for t in ("chain", "small", "medium", "large")] == [4, 15, 31, 63]
    t = build_template(((1,), (0,), (0, 0), (1, 0), (0, 1)))
    assert t.choices == ((0,), (1,), (0, 0), (0, 1), (1, 0))
    assert t.parents == (-1, 0, 0, 1, 1, 2) and t.ranks == (0, 0, 1, 0, 1, 0)
    assert t.depths == (0, 1, 1, 2, 2, 2) and t.top_k == 2 and t.max_depth == 2
    with pytest.raises(TreeError, match="has no parent"):
        build_template(((0,), (1, 0)))
    with pytest.raises(TreeError, match="distinct non-empty"):
        build_template(((0,), (0,)))


def test_bad_settings_are_refused(engine):
    with pytest.raises(TreeError, match="unknown recycling tree 'huge'"):
        recycling(engine, tree="huge")
    with pytest.raises(TreeError, match="k=4 but the tree template uses rank 4; set k >= 5"):
        recycling(engine, tree="medium", k=4)


def test_table_refresh_and_expansion_hand_checked():
    table = AdjacencyTable(10, 2)
    assert table.known() == 0 and table.nbytes == 10 * 2 * 4
    logits = torch.tensor([[0.0, 5, 4, 0, 0, 0, 0, 0, 0, 0],  # top-2 (1, 2)
                           [0.0, 0, 0, 7, 6, 0, 0, 0, 0, 0],  # (3, 4)
                           [9.0, 0, 0, 0, 0, 0, 0, 0, 0, 8]])  # (0, 9)  # fmt: skip
    table.update([5, 7, 5], logits)  # token 5 twice: its last node's row wins
    assert table.rows[5].tolist() == [0, 9] and table.rows[7].tolist() == [3, 4] and table.known() == 2
    table.update(torch.tensor([3]), logits[1:2])
    assert table.rows[3].tolist() == [3, 4]
    template = build_template(((0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)))
    # from 5: (0,) -> 0 (row unknown: its subtree goes), (1,) -> 9 (unknown: its subtree goes)
    tree = table.expand(5, template, depth=3)
    assert list(tree.tokens) == [5, 0, 9] and tree.parents == (-1, 0, 0)
    # from 7: (0,) -> 3 -> (3, 4), 3 -> 3 again at depth 3; (1,) -> 4 (unknown)
    tree = table.expand(7, template, depth=3)
    assert list(tree.tokens) == [7, 3, 4, 3, 4, 3] and tree.parents == (-1, 0, 0, 1, 1, 3)
    assert list(table.expand(7, template, depth=1).tokens) == [7, 3, 4]  # cut to the room left
    assert list(table.expand(7, template, depth=0).tokens) == [7]
    table.reset()
    assert table.known() == 0


class Recorder(TreeVerifier):
    """Keeps every verified tree and the target's logits over it."""

    def verify(self, tree, accept=None):
        step = super().verify(tree, accept)
        self.log.append((list(tree.tokens), step.output.logits))
        return step


def test_a_run_refreshes_the_table_from_every_verify_forward(engine):
    method = recycling(engine, tree="small", persist=False)
    method.verifier_class = Recorder
    Recorder.log = []
    # the prefill alone fills the row of the prompt's last token
    method.generate(PROMPTS[0], StopRule(1))
    prefill = engine.forward(PROMPTS[0], engine.new_cache()).logits[-1]
    assert method.table.known() == 1
    assert method.table.rows[PROMPTS[0][-1]].tolist() == prefill.topk(8).indices.tolist()
    gen = method.generate(PROMPTS[0], StopRule(N))
    assert len(Recorder.log) == gen.target_forwards - 1
    expect = {PROMPTS[0][-1]: prefill.topk(8).indices.tolist()}
    for tokens, logits in Recorder.log:  # each node's top-8 becomes its token's row, later nodes last
        for token, row in zip(tokens, logits):
            expect[token] = row.topk(8).indices.tolist()
    assert {t: method.table.rows[t].tolist() for t in expect} == expect
    assert method.table.known() == len(expect) == gen.extra["table_rows"]
    assert gen.extra["table_bytes"] == engine.config.vocab_size * 8 * 4


# ---- equality with greedy AR ----------------------------------------------------------------------
@pytest.mark.parametrize("tree", ["chain", "small", "large"])
@pytest.mark.parametrize("persist", [False, True])
def test_equals_greedy_autoregressive(engine, tree, persist):
    method = recycling(engine, tree=tree, persist=persist)
    accepted = 0
    for prompt in PROMPTS:
        gen = method.generate(prompt, StopRule(N))
        assert gen.tokens == autoregressive(engine, prompt)
        assert sum(gen.accepted_per_step) == len(gen.tokens) == N
        assert gen.target_forwards == len(gen.accepted_per_step) and gen.draft_forwards == 0
        assert all(a <= p for a, p in zip(gen.accepted_per_position, gen.proposed_per_position))
        accepted += sum(gen.accepted_per_position)
        assert gen.extra["persist"] is persist and not gen.lossy
    assert accepted > 0  # the recycled candidates are right sometimes, even on a random model


@pytest.mark.parametrize("rank,depth", [(0, 4), (1, 2), (3, 1), (4, 0)])
def test_right_candidate_at_a_rank(engine, rank, depth):
    """The small template (every rank path with depth + sum of ranks <= 4) reaches the right
    token at rank r down to depth 4 // (r + 1): each step commits that many + 1."""
    prompt = DISTINCT
    ref = prompt + autoregressive(engine, prompt)
    assert all(len(set(ref[i : i + 6])) == 6 for i in range(len(prompt) - 1, len(ref) - 5))
    gen = Oracle(RecyclingConfig(tree="small"), engine, ref, rank=rank).generate(prompt, StopRule(N))
    assert gen.tokens == ref[len(prompt) :]
    steps = gen.accepted_per_step
    assert steps[0] == 1 and all(s == depth + 1 for s in steps[1:-1]) and steps[-1] <= depth + 1


@pytest.mark.parametrize("right", [0, 1, 2])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_right_for_j_tokens_then_wrong(engine, prompt, right):
    ref = prompt + autoregressive(engine, prompt)
    gen = Oracle(RecyclingConfig(tree="large"), engine, ref, rank=0, right=right).generate(prompt, StopRule(N))
    assert gen.tokens == ref[len(prompt) :]
    assert max(gen.accepted_per_step[1:]) <= right + 1
    if right == 0:
        assert gen.accepted_per_step == [1] * N  # a table that never holds the right token


def test_stops_inside_an_accepted_path(engine):
    prompt = DISTINCT
    ref = prompt + autoregressive(engine, prompt)
    out = ref[len(prompt) :]
    method = Oracle(RecyclingConfig(tree="chain"), engine, ref)
    # max_new_tokens = 8: the prefill gives 1, the first step 5, the second is cut after 2
    gen = method.generate(prompt, StopRule(8))
    assert gen.tokens == out[:8] and gen.accepted_per_step == [1, 5, 2]
    # EOS in the middle of the second step's path (indices 6-10): nothing after it
    at = next(i for i in range(7, 10) if out[i] not in out[:i])
    stop = StopRule(N, frozenset({out[at]}))
    gen = method.generate(prompt, stop)
    assert gen.tokens == out[: at + 1] == autoregressive(engine, prompt, eos=frozenset({out[at]}))
    assert gen.accepted_per_step == [1, 5, at + 1 - 6] and gen.stop_reason == "eos"


def test_steps_stay_inside_the_context(tokenizer):
    """Templates are cut to the tokens still allowed: with prompt + max_new_tokens equal to the
    context, no forward passes its last position."""
    prompt, n = [0, 17, 42, 99, 5, 23], 30
    model = tiny_model(len(tokenizer), max_position_embeddings=len(prompt) + n)
    engine = PositionLog(model, tokenizer, Engine.from_model(model, tokenizer).cfg, torch.device("cpu"))
    ref = prompt + autoregressive(engine, prompt, n)
    method = Oracle(RecyclingConfig(tree="large"), engine, ref)
    assert method.headroom() == 0
    assert method.generate(prompt, StopRule(n)).tokens == ref[len(prompt) :]
    assert engine.highest == len(prompt) + n - 2  # the last token is committed, never fed


def test_persistence(engine):
    """persist=false: a sample's run does not depend on the samples before it; persist=true:
    the table carries over, and a run starting from it accepts more (both exact); reset()
    empties it."""
    fresh = recycling(engine, tree="small", persist=False)
    alone = fresh.generate(PROMPTS[0], StopRule(N))
    fresh.generate(PROMPTS[1], StopRule(N))
    again = fresh.generate(PROMPTS[0], StopRule(N))
    assert again.accepted_per_step == alone.accepted_per_step and again.extra["table_rows"] == alone.extra["table_rows"]
    kept = recycling(engine, tree="small", persist=True)
    first = kept.generate(PROMPTS[0], StopRule(N))
    assert first.accepted_per_step == alone.accepted_per_step  # the same empty start
    second = kept.generate(PROMPTS[0], StopRule(N))
    assert second.tokens == first.tokens and len(second.accepted_per_step) < len(first.accepted_per_step)
    assert second.extra["table_rows"] >= first.extra["table_rows"]
    kept.reset()  # what the runner does after its warm-up
    assert kept.table.known() == 0 and kept.generate(PROMPTS[0], StopRule(N)).accepted_per_step == alone.accepted_per_step


# ---- sampling -------------------------------------------------------------------------------------
