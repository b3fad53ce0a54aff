"""Self-distillation data on a tiny random model: prompts from the
training split, batched left-padded generation equal to one-at-a-time greedy, shards with a
manifest, resuming, and the batched-vs-single speed measurement."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from harness.zoo.corpus import Document
from harness.zoo.selfdistill import (
    SelfDistillConfig,
    collect_prompts,
    function_head,
    generate_batch,
    generate_selfdistill,
    load_selfdistill,
    measure_generation_speed,
)

PY = "import os\n\n\n" + "".join(
    f'def f{i}(a, b):\n    """Add {i}."""\n    x = a + b + {i}\n    return x\n\n\n' for i in range(6))
GO = "package main\n\n" + "".join(f"func g{i}(a int) int {{\n\tx := a + {i}\n\treturn x\n}}\n\n" for i in range(6))
DOCS = [Document("python", "a.py", PY, "a"), Document("go", "b.go", GO, "b"),
        Document("python", "held.py", "def secret():\n    return 42\n" * 30, "c", split="heldout")]


def _cfg(tmp_path, model_dir, **kw) -> SelfDistillConfig:
    base = dict(model=str(model_dir), out_dir=str(tmp_path / "sd"), n_prompts=12, prompt_min_tokens=4,
                prompt_max_tokens=40, max_new_tokens=6, temperatures=[0.0, 0.9], batch_size=4, shard_size=8,
                speed_prompts=4)
    base.update(kw)
    return SelfDistillConfig(**base)


def test_function_heads_stop_after_the_docstring_or_the_opening_brace():
    assert function_head('def f(a):\n    """Doc."""\n    return a\n', "python") == 'def f(a):\n    """Doc."""\n'
    assert function_head("def f(a):\n    x = 1\n    return x\n", "python") == "def f(a):\n"
    assert function_head('def f(a):\n    """Only a docstring."""\n', "python") is None
    assert function_head("// c\nfunc g(a int) int {\n\treturn a\n}\n", "go") == "// c\nfunc g(a int) int {\n"


def test_prompts_come_from_training_files_and_are_reproducible(model_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    cfg = _cfg(tmp_path, model_dir)
    a = collect_prompts(DOCS, tok, cfg)
    assert len(a) == 12 and [p.index for p in a] == list(range(12))
    assert {p.source for p in a} == {"function", "file"}
    assert all(p.ids[0] == tok.bos_token_id and len(p.ids) <= 40 for p in a)
    assert not any("secret" in tok.decode(p.ids) for p in a)  # held-out files give no prompts
    assert [p.ids for p in collect_prompts(DOCS, tok, cfg)] == [p.ids for p in a]


def test_batched_left_padded_greedy_equals_one_at_a_time(model_dir):
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    prompts = [tok(t).input_ids for t in ("def add(a, b):\n", "for i in range(10):\n    print(i)\n", "int main() {")]
    batched = generate_batch(model, prompts, tok.pad_token_id, tok.eos_token_id, 8, 0.0, 0)
    for p, c in zip(prompts, batched):
        single = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id,
                                eos_token_id=tok.eos_token_id)[0, len(p):].tolist()
        assert c.ids == single[: len(c.ids)] and (c.ended or len(c.ids) == 8)
    speed = measure_generation_speed(model, tok, prompts, 4, batch_size=3)
    assert speed.prompts == 3 and speed.batch_size == 3 and speed.one_at_a_time_tokens_per_s > 0


def test_shards_manifest_resume_and_restart(model_dir, tmp_path):
    cfg = _cfg(tmp_path, model_dir)
    st = generate_selfdistill(cfg, DOCS, log=lambda s: None)
    assert (st.shards_done, st.shards_generated, st.records) == (2, 2, 12)
    man = json.loads((tmp_path / "sd" / "manifest.json").read_text())
    assert man["generation_speed"]["prompts"] == 4 and man["generation_speed"]["batch_size"] == 4
    assert man["prompts"] == 12 and len(man["weights_sha256"]) == 64 and set(man["shards"]) == {
        "shard_00000.jsonl", "shard_00001.jsonl"}
    recs = load_selfdistill(tmp_path / "sd")
    assert [r["index"] for r in recs] == list(range(12))
    assert {r["temperature"] for r in recs} == {0.0, 0.9}
    assert all(r["temperature"] == (0.0 if r["index"] % 2 == 0 else 0.9) for r in recs)
    assert all(0 < len(r["ids"]) <= 6 for r in recs) and sum(len(r["ids"]) for r in recs) == st.new_tokens
    # a re-run finds both shards done; a lost shard is generated again, identically (seeded sampling)
    assert generate_selfdistill(cfg, DOCS, log=lambda s: None).shards_generated == 0
    first = (tmp_path / "sd" / "shard_00001.jsonl").read_text()
    (tmp_path / "sd" / "shard_00001.jsonl").unlink()
    assert generate_selfdistill(cfg, DOCS, log=lambda s: None).shards_generated == 1
    assert (tmp_path / "sd" / "shard_00001.jsonl").read_text() == first
    # other settings: the set starts again
    st2 = generate_selfdistill(_cfg(tmp_path, model_dir, max_new_tokens=3), DOCS, log=lambda s: None)
    assert st2.shards_generated == 2 and all(len(r["ids"]) <= 3 for r in load_selfdistill(tmp_path / "sd"))
    with pytest.raises(ValueError, match="temperatures"):
        generate_selfdistill(_cfg(tmp_path, model_dir, temperatures=[]), DOCS, log=lambda s: None)
