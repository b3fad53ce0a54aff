"""Sequence-level unlikelihood fine-tuning (``target_unlikelihood``): the repeat
mask against a brute force, the UL loss against a hand computation and its effect on a tiny
model, and the stage on a micro zoo (runs, resumes after a SIGTERM to the same weights as an
uninterrupted run, exports with its recipe on the card)."""

from __future__ import annotations

import json
import os
import random
import signal

import pytest
import torch

from harness.train.unlikelihood import (
    Rollout,
    UnlikelihoodTrainConfig,
    make_loss_fn,
    make_rollout,
    repeat_mask,
    rollout_summary,
    run_unlikelihood_training,
    unlikelihood_loss,
)
from tests.conftest import tiny_model

PAD, EOS = 2, 1


def brute_repeat_mask(seq: list[int], start: int, n: int) -> list[bool]:
    out = []
    for t in range(start, len(seq)):
        gram = seq[t - n + 1 : t + 1] if t >= n - 1 else None
        out.append(gram is not None and any(seq[u - n + 1 : u + 1] == gram for u in range(n - 1, t)))
    return out


def test_repeat_mask_matches_brute_force():
    rng = random.Random(0)
    checked = marked = 0
    for _ in range(300):
        n = rng.choice([1, 2, 3, 4])
        seq = [rng.randrange(3) for _ in range(rng.randrange(0, 30))]
        start = rng.randrange(0, len(seq) + 1)
        got = repeat_mask(seq, start, n)
        assert got == brute_repeat_mask(seq, start, n), (seq, start, n)
        checked += len(got)
        marked += sum(got)
    assert checked > 1000 and 0 < marked < checked  # both outcomes were exercised


def test_repeat_mask_examples():
    # a line repeated: the second copy's tokens complete 4-grams of the first from its 4th token on,
    # except where the seam makes a new 4-gram
    assert repeat_mask([5, 6, 7, 8, 5, 6, 7, 8, 5], 4, 4) == [False, False, False, True, True]
    assert repeat_mask([9, 9, 9, 9, 9], 0, 4) == [False, False, False, False, True]  # overlapping occurrences
    assert repeat_mask([1, 2, 3, 4, 1, 2, 3, 4], 6, 4) == [False, True]  # the prompt counts as earlier text
    assert repeat_mask(list(range(20)), 5, 4) == [False] * 15


def _rollout(vocab: int = 40, seed: int = 0) -> tuple[torch.nn.Module, Rollout]:
    model = tiny_model(vocab, seed=seed)
    g = torch.Generator().manual_seed(seed)
    prompts = [[0] + torch.randint(4, vocab, (k,), generator=g).tolist() for k in (5, 9, 7)]
    return model, make_rollout(model, prompts, PAD, EOS, max_new_tokens=24, n=4)


def test_rollout_layout_and_loss_by_hand():
    model, ro = _rollout()
    assert ro.marked.any() and (ro.marked <= ro.generated).all()  # a random tiny model loops
    for r in range(ro.ids.shape[0]):
        gen = ro.generated[r].nonzero().flatten().tolist()
        seq = ro.ids[r, : gen[-1] + 1].tolist()
        assert gen == list(range(gen[0], gen[-1] + 1))
        assert ro.marked[r, gen[0] : gen[-1] + 1].tolist() == repeat_mask(seq, gen[0], 4)
        assert (ro.ids[r, gen[-1] + 1 :] == PAD).all()
    with torch.no_grad():
        loss = float(unlikelihood_loss(model, ro))
        total = 0.0
        for r in range(ro.ids.shape[0]):  # one sequence at a time, unpadded
            L = int(ro.generated[r].nonzero().max()) + 1
            probs = torch.softmax(model(input_ids=ro.ids[r : r + 1, :L]).logits[0].float(), -1)
            for t in range(1, L):
                if ro.marked[r, t]:
                    total -= float(torch.log(1 - probs[t - 1, ro.ids[r, t]]))
    assert loss == pytest.approx(total / int(ro.generated.sum()), rel=1e-4)
    empty = Rollout(ro.ids, ro.generated, torch.zeros_like(ro.marked), ro.ended)
    with torch.no_grad():
        assert float(unlikelihood_loss(model, empty)) == 0.0  # nothing marked: nothing to push down


def _marked_prob(model, ro: Rollout) -> float:
    with torch.no_grad():
        p = torch.softmax(model(input_ids=ro.ids[:, :-1]).logits.float(), -1)
        p = p.gather(-1, ro.ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    return float(p[ro.marked[:, 1:]].mean())


def test_unlikelihood_steps_lower_the_marked_tokens_probability():
    model, ro = _rollout()
    before = _marked_prob(model, ro)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(5):
        opt.zero_grad()
        unlikelihood_loss(model, ro).backward()
        opt.step()
    after = _marked_prob(model, ro)
    assert after < 0.5 * before, (before, after)
    # on policy: fresh greedy rollouts of the updated model repeat less than the first ones
    fresh = make_rollout(model, [r[: int(ro.generated[i].nonzero().min())].tolist() for i, r in enumerate(ro.ids)],
                         PAD, EOS, max_new_tokens=24, n=4)
    assert fresh.marked.sum() < ro.marked.sum()


def test_loss_fn_combines_ce_and_weighted_ul_and_logs_steps():
    from harness.train.lm import lm_loss
    from harness.train.unlikelihood import RolloutBatch

    model, ro = _rollout()
    prompts = [r[: int(ro.generated[i].nonzero().min())].tolist() for i, r in enumerate(ro.ids)]
    ce_rows = torch.randint(4, 40, (2, 17), generator=torch.Generator().manual_seed(1))
    stats: list[dict] = []
    cfg = UnlikelihoodTrainConfig(ul_weight=0.25, rollout_new_tokens=24)
    loss, n = make_loss_fn(cfg, PAD, EOS, stats)(model, RolloutBatch(ce_rows, prompts))
    with torch.no_grad():
        ce, n_ce = lm_loss(model, ce_rows)
        ul = unlikelihood_loss(model, ro)
    assert float(loss.detach()) == pytest.approx(float(ce) + 0.25 * float(ul), rel=1e-5)
    assert n == n_ce + int(ro.generated.sum())
    assert stats == [{"step": 1, "generated": int(ro.generated.sum()), "marked": int(ro.marked.sum()),
                      "ended": sum(ro.ended), "ce": round(float(ce), 4), "ul": round(float(ul), 4)}]
    s = rollout_summary(stats)
    assert s["marked_share_first"] == s["marked_share_last"] == round(int(ro.marked.sum()) / int(ro.generated.sum()), 4)


# ----------------------------------------------------------------------------- the stage on a micro zoo


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    from harness.zoo.build import ZooDataConfig, prepare_data
    from harness.zoo.corpus import CorpusConfig
    from harness.zoo.tokenizer import TokenizerConfig

    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("ulzoo")
    data = ZooDataConfig(cache_dir=str(tmp / "cache"), tokenizer=TokenizerConfig(vocab_size=320),
                         corpus=CorpusConfig(languages=["python"], max_files_per_lang=8, heldout_fraction=0.2))
    paths = prepare_data(data, log=lambda s: None)
    # the initial weights: a micro target-functions checkpoint (a few LM steps on the function mix)
    from harness.train.lm import LMTrainConfig, ModelConfig, make_job, run_lm_training

    shape = ModelConfig(name="target-functions", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512)
    tcfg = LMTrainConfig(max_steps=3, batch_size=2, seq_len=32, function_share=0.5, progress=False, eval_at_end=False)
    run_lm_training(make_job(shape, tcfg, paths, str(tmp / "train" / "target-functions")), log=lambda s: None)
    return {"tmp": tmp, "data": data, "paths": paths, "init": str(tmp / "train" / "target-functions")}


def _cfg(micro, steps: int) -> UnlikelihoodTrainConfig:
    return UnlikelihoodTrainConfig(max_steps=steps, warmup_steps=1, lr=5e-3, batch_size=2, seq_len=32,
                                   rollout_prompts=3, rollout_new_tokens=12, prompt_pool=8, prompt_max_tokens=40,
                                   init_from=micro["init"], progress=False, eval_at_end=True)


def test_stage_resumes_to_the_uninterrupted_weights(micro, monkeypatch):
    from harness.train import unlikelihood
    from harness.train.loop import load_checkpoint

    quiet = lambda s: None  # noqa: E731
    ref_dir, cut_dir = micro["tmp"] / "ul-ref", micro["tmp"] / "ul-cut"
    ref, ref_summary = run_unlikelihood_training(_cfg(micro, 5), micro["paths"], ref_dir, log=quiet)
    assert ref.finished and ref.step == 5 and ref_summary["rollouts"]["steps"] == 5
    assert ref_summary["heldout"]["ppl"] > 1.0

    real, calls = unlikelihood.lm_loss, {"n": 0}

    def ce_then_sigterm(model, batch):
        calls["n"] += 1
        if calls["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    monkeypatch.setattr(unlikelihood, "lm_loss", ce_then_sigterm)
    first, _ = run_unlikelihood_training(_cfg(micro, 5), micro["paths"], cut_dir, log=quiet)
    assert first.step == 2 and not first.finished
    ck = load_checkpoint(cut_dir)
    assert ck["data"]["prompt_cursor"] == 6 and len(ck["extra"]["unlikelihood_steps"]) == 2
    monkeypatch.setattr(unlikelihood, "lm_loss", real)
    second, summary = run_unlikelihood_training(_cfg(micro, 5), micro["paths"], cut_dir, log=quiet)
    assert second.resumed_from == 2 and second.step == 5 and second.finished
    a, b = load_checkpoint(ref_dir), load_checkpoint(cut_dir)
    for k in a["model"]:
        assert torch.allclose(a["model"][k], b["model"][k], atol=1e-6), k
    assert [s["marked"] for s in a["extra"]["unlikelihood_steps"]] == [s["marked"] for s in b["extra"]["unlikelihood_steps"]]
    assert summary["rollouts"] == ref_summary["rollouts"]


def test_stage_needs_initial_weights(micro):
    cfg = _cfg(micro, 1)
    cfg.init_from = ""
    with pytest.raises(ValueError, match="init_from"):
        run_unlikelihood_training(cfg, micro["paths"], micro["tmp"] / "ul-none", log=lambda s: None)


def test_cli_stage_then_export_with_the_recipe_on_the_card(micro, capsys):
    from harness import cli_zoo

    common = [f"data.cache_dir={micro['tmp'] / 'cache'}", "data.corpus.languages=[python]",
              "data.corpus.max_files_per_lang=8", "data.corpus.heldout_fraction=0.2", "data.tokenizer.vocab_size=320",
              f"train_root={micro['tmp'] / 'train'}"]
    ul = ["target_unlikelihood.max_steps=2", "target_unlikelihood.batch_size=2", "target_unlikelihood.seq_len=32",
          "target_unlikelihood.rollout_prompts=2", "target_unlikelihood.rollout_new_tokens=8",
          "target_unlikelihood.prompt_pool=4", "target_unlikelihood.prompt_max_tokens=40",
          "target_unlikelihood.progress=false"]
    assert cli_zoo.main(["build", "stages=[target_unlikelihood]", *common, *ul]) == 0  # init: the target-functions checkpoint
    state = json.loads((micro["tmp"] / "train" / "target-unlikelihood" / "train_state.json").read_text())
    assert state["step"] == 2 and state["reason"] == "end"
    zoo = micro["tmp"] / "zoo"
    assert cli_zoo.main(["export", *common, f"export.zoo_dir={zoo}", "export.models=[target]",
                         "export.sources={target:target-unlikelihood}", "export.humaneval_limit=1",
                         "export.max_new_tokens=4", "export.healed_prompts=false",
                         "export.execute_isolation=weak"]) == 0  # not a sandbox test
    info = json.loads((zoo / "target" / "training.json").read_text())
    assert info["step"] == 2 and info["initialized_from"]["kind"] == "checkpoint"
    assert info["unlikelihood"]["ngram"] == 4 and info["unlikelihood"]["rollouts"]["steps"] == 2
    card = (zoo / "target" / "README.md").read_text()
    assert "Unlikelihood fine-tune" in card and "-log(1 - p(token))" in card
    # the initial weights moved on: the stage starts again instead of resuming
    (micro["tmp"] / "train" / "target-functions" / "train_state.json").write_text(
        json.dumps({"step": 99, "tokens": 1, "elapsed_s": 1.0}))
    assert cli_zoo.main(["build", "stages=[target_unlikelihood]", *common, *ul]) == 0
    assert "changed since" in capsys.readouterr().out


def test_cut_at_stop_follows_the_harness_stop_rules():
    from harness.stops import StopStrings
    from harness.zoo.quality import cut_at_stop

    stops = StopStrings(("\ndef", "\n#"), lambda ids: "".join(chr(i) for i in ids))
    ids = [ord(c) for c in "    return x\ndef g():\n"]
    cut, why = cut_at_stop(ids, eos_id=1, stops=stops, max_new_tokens=64)
    assert "".join(map(chr, cut)) == "    return x\ndef" and why == "stop:\ndef"
    cut, why = cut_at_stop([ord("a"), 1, ord("\n"), ord("#")], eos_id=1, stops=stops, max_new_tokens=64)
    assert cut == [ord("a"), 1] and why == "eos"
    assert cut_at_stop(ids[:8], eos_id=1, stops=stops, max_new_tokens=8) == (ids[:8], "max_new_tokens")
