"""Task loaders on the shared data, their filters and errors, and prompt rendering."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import fields

import pytest

from harness.paths import DATA_ENV, default_data_dir
from harness.registry import TASKS
from tasks.base import Sample, TaskDataError, render_prompt
from tasks.humaneval import HumanEval, HumanEvalConfig
from tasks.humaneval_x import LANGUAGES, HumanEvalX, HumanEvalXConfig
from tasks.jsonl_task import JsonlTask, JsonlTaskConfig
from tasks.spec_bench import CATEGORIES, SpecBench, SpecBenchConfig

needs_shared = pytest.mark.skipif(
    not (default_data_dir() / "spec_bench" / "question.jsonl").is_file(),
    reason=f"shared datasets not found at {default_data_dir()}",
)


# --- loading is the slow part (datasets import): load each suite once per session ---
@pytest.fixture(scope="session")
def humaneval_x() -> list[Sample]:
    return HumanEvalX(HumanEvalXConfig()).samples()


@pytest.fixture(scope="session")
def spec_bench() -> list[Sample]:
    return SpecBench(SpecBenchConfig()).samples()


@pytest.mark.parametrize(
    "name, cls, cfg_cls",
    [
        ("humaneval", HumanEval, HumanEvalConfig),
        ("humaneval-x", HumanEvalX, HumanEvalXConfig),
        ("spec-bench", SpecBench, SpecBenchConfig),
        ("jsonl", JsonlTask, JsonlTaskConfig),
    ],
)
def test_registry_and_config(name, cls, cfg_cls):
    assert TASKS.get(name) is cls
    assert cls.config_class is cfg_cls
    assert cfg_cls().name == name
    # Hydra structured configs: every field typed and defaulted so OmegaConf accepts it.
    omegaconf = pytest.importorskip("omegaconf")
    node = omegaconf.OmegaConf.structured(cfg_cls)
    assert {f.name for f in fields(cfg_cls)} == set(node.keys())


# --- HumanEval ---
def test_humaneval():
    samples = HumanEval(HumanEvalConfig()).samples()
    assert len(samples) == 164
    first = samples[0]
    assert first.id == "HumanEval/0" and len({s.id for s in samples}) == 164
    assert first.turns[0].startswith("from typing import List")
    assert not first.chat and first.language == "python"
    assert first.meta["entry_point"] == "has_close_elements"
    assert "def check" in first.meta["test"] and first.meta["canonical_solution"]
    assert len(HumanEval(HumanEvalConfig(limit=3)).samples()) == 3


def test_humaneval_path_override(tmp_path):
    path = tmp_path / "mini.jsonl"
    row = {"task_id": "X/0", "prompt": "def f():\n", "entry_point": "f", "test": "pass"}
    path.write_text(json.dumps(row) + "\n")
    (sample,) = HumanEval(HumanEvalConfig(path=str(path))).samples()
    assert sample.id == "X/0" and sample.meta["canonical_solution"] == ""
    with pytest.raises(TaskDataError, match="task.path="):
        HumanEval(HumanEvalConfig(path=str(tmp_path / "nope.jsonl.gz"))).load()


# --- HumanEval-X ---
@needs_shared
def test_humaneval_x_all(humaneval_x):
    by_lang = Counter(s.language for s in humaneval_x)
    assert by_lang == {lang: 164 for lang in LANGUAGES}
    assert len({s.id for s in humaneval_x}) == 5 * 164
    cpp = next(s for s in humaneval_x if s.id == "CPP/0")
    assert cpp.language == "cpp" and not cpp.chat
    assert "has_close_elements" in cpp.turns[0]
    for key in ("test", "declaration", "canonical_solution", "example_test"):
        assert cpp.meta[key]
    ids = {s.id.split("/")[0] for s in humaneval_x}
    assert ids == {"Python", "CPP", "Java", "JavaScript", "Go"}
    # example_test is kept only where the file has one
    assert all(s.meta.get("example_test", "x") for s in humaneval_x)
    assert sum("example_test" not in s.meta for s in humaneval_x) < 5 * 164 // 10


@needs_shared
def test_humaneval_x_filter_and_limit():
    samples = HumanEvalX(HumanEvalXConfig(languages=["go", "CPP"], limit=2)).samples()
    assert [s.id for s in samples] == ["Go/0", "Go/1", "CPP/0", "CPP/1"]
    assert [s.language for s in samples] == ["go", "go", "cpp", "cpp"]


def test_humaneval_x_unknown_language():
    with pytest.raises(TaskDataError, match="unknown humaneval-x language 'rust'.*cpp, java"):
        HumanEvalX(HumanEvalXConfig(languages=["python", "rust"])).load()


def test_humaneval_x_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(TaskDataError) as err:
        HumanEvalX(HumanEvalXConfig()).load()
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "elsewhere" / "humaneval-x") in msg
    assert "task.data_dir=" in msg and DATA_ENV in msg


def test_humaneval_x_missing_language_file(tmp_path):
    with pytest.raises(TaskDataError, match=r"humaneval_js\.jsonl\.gz.*task\.data_dir="):
        HumanEvalX(HumanEvalXConfig(data_dir=str(tmp_path), languages=["js"])).load()


# --- Spec-Bench ---
@needs_shared
def test_spec_bench_all(spec_bench):
    assert len(spec_bench) == 480 and len({s.id for s in spec_bench}) == 480
    cats = Counter(s.category for s in spec_bench)
    assert set(cats) == set(CATEGORIES) and len(cats) == 13
    assert all(s.chat and s.turns and all(isinstance(t, str) for t in s.turns) for s in spec_bench)
    multi = [s for s in spec_bench if len(s.turns) > 1]
    assert len(multi) == 80 and {s.meta["task"] for s in multi} == {"mt_bench"}
    assert {s.meta["task"] for s in spec_bench} == {
        "mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag"
    }
    assert spec_bench[0].id == str(spec_bench[0].meta["question_id"])


@needs_shared
def test_spec_bench_filter_and_limit():
    samples = SpecBench(SpecBenchConfig(categories=["qa", "writing"])).samples()
    assert Counter(s.category for s in samples) == {"qa": 80, "writing": 10}
    limited = SpecBench(SpecBenchConfig(categories=["rag"], limit=5)).samples()
    assert len(limited) == 5 and {s.category for s in limited} == {"rag"}
    assert len(SpecBench(SpecBenchConfig(limit=7)).samples()) == 7


@needs_shared
def test_spec_bench_unknown_category():
    with pytest.raises(TaskDataError, match="'poetry'.*valid: writing, roleplay.*rag"):
        SpecBench(SpecBenchConfig(categories=["poetry"])).load()


def test_spec_bench_missing_file(tmp_path, monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    with pytest.raises(TaskDataError) as err:
        SpecBench(SpecBenchConfig()).load()
    msg = str(err.value)
    assert str(tmp_path / "spec_bench" / "question.jsonl") in msg
    assert "task.path=" in msg and DATA_ENV in msg and "\n" not in msg


# --- jsonl ---
def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_jsonl_task(tmp_path):
    path = write_lines(
        tmp_path / "mine.jsonl",
        [
            {"id": "a", "prompt": "Hello", "category": "greet", "extra": 1, "reference": "Hello, world"},
            "",
            {"id": 7, "turns": ["Hi", "Again"], "language": "en"},
        ],
    )
    a, b = JsonlTask(JsonlTaskConfig(path=path)).samples()
    assert (a.id, a.turns, a.chat, a.category, a.reference) == ("a", ["Hello"], False, "greet", "Hello, world")
    assert a.meta == {"extra": 1}
    assert (b.id, b.turns, b.chat, b.language, b.reference) == ("7", ["Hi", "Again"], True, "en", None)
    (doc,) = JsonlTask(JsonlTaskConfig(path=path, reference_field="doc", limit=1)).samples()
    assert doc.reference is None and doc.meta == {"extra": 1, "reference": "Hello, world"}  # another key
    forced = JsonlTask(JsonlTaskConfig(path=path, chat=True, limit=1)).samples()
    assert len(forced) == 1 and forced[0].chat

    renamed = write_lines(tmp_path / "renamed.jsonl", [{"qid": "q", "text": "Hey"}])
    (s,) = JsonlTask(JsonlTaskConfig(path=renamed, id_field="qid", prompt_field="text")).samples()
    assert (s.id, s.turns) == ("q", ["Hey"])


@pytest.mark.parametrize(
    "bad, problem",
    [
        ("{not json", "invalid JSON"),
        ('["a list"]', "expected a JSON object"),
        ({"prompt": "no id"}, "missing id field 'id'"),
        ({"id": "x"}, "missing prompt field 'prompt'"),
        ({"id": "x", "prompt": 3}, "'prompt' must be a non-empty string"),
        ({"id": "x", "turns": []}, "'turns' must be a non-empty list"),
        ({"id": "x", "turns": ["ok", 2]}, "'turns' must hold only non-empty strings"),
        ({"id": "x", "prompt": "a", "turns": ["b"]}, "has both"),
        ({"id": "x", "prompt": "a", "reference": ["b"]}, "'reference' must be a string"),
        ({"id": "first", "prompt": "again"}, "duplicate id 'first' \\(first on line 1\\)"),
    ],
)
def test_jsonl_bad_line(tmp_path, bad, problem):
    path = write_lines(tmp_path / "bad.jsonl", [{"id": "first", "prompt": "fine"}, bad])
    with pytest.raises(TaskDataError, match=rf"bad\.jsonl:2: {problem}"):
        JsonlTask(JsonlTaskConfig(path=path)).load()


def test_jsonl_missing_path(tmp_path):
    with pytest.raises(TaskDataError, match="task.path="):
        JsonlTask(JsonlTaskConfig()).load()
    with pytest.raises(TaskDataError, match=r"nope\.jsonl.*task\.path="):
        JsonlTask(JsonlTaskConfig(path=str(tmp_path / "nope.jsonl"))).load()


# --- render_prompt ---
def tiny_tokenizer(chat_template=None):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hi": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    if chat_template:
        fast.chat_template = chat_template
    return fast


CHAT = Sample(id="c", turns=["What is 2+2?", "And 3+3?"], chat=True)


def test_render_plain_sample():
    sample = Sample(id="p", turns=["def f():\n"])
    assert render_prompt(sample, 0, [], tiny_tokenizer()) == "def f():\n"


def test_render_vicuna_without_template():
    tok = tiny_tokenizer()
    assert not tok.chat_template
    system = (
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions."
    )
    assert render_prompt(CHAT, 0, [], tok) == f"{system} USER: What is 2+2? ASSISTANT:"
    assert render_prompt(CHAT, 1, ["4"], tok) == (
        f"{system} USER: What is 2+2? ASSISTANT: 4</s>USER: And 3+3? ASSISTANT:"
    )


def test_render_with_chat_template():
    template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    tok = tiny_tokenizer(template)
    assert render_prompt(CHAT, 0, [], tok) == "<|user|>What is 2+2?\n<|assistant|>"
    assert render_prompt(CHAT, 1, ["4"], tok) == (
        "<|user|>What is 2+2?\n<|assistant|>4\n<|user|>And 3+3?\n<|assistant|>"
    )


# --- task.split: tune (settings are chosen on it) and report (published figures) ---
def check_partition(every: list[Sample], tune: list[Sample], report: list[Sample]) -> None:
    """tune and report are disjoint, cover the task, and each keeps the task's order."""
    ids = [s.id for s in every]
    assert not {s.id for s in tune} & {s.id for s in report}
    assert sorted(s.id for s in tune + report) == sorted(ids)
    for part in (tune, report):
        positions = [ids.index(s.id) for s in part]
        assert positions == sorted(positions) and part


def split(cls, cfg_cls, name: str, **kw) -> list[Sample]:
    return cls(cfg_cls(split=name, **kw)).samples()


def test_humaneval_split():
    every, tune, report = (split(HumanEval, HumanEvalConfig, s) for s in ("all", "tune", "report"))
    check_partition(every, tune, report)
    assert [s.id for s in tune] == [f"HumanEval/{i}" for i in range(40)]
    assert [s.id for s in report] == [f"HumanEval/{i}" for i in range(40, 164)]
    # the split comes before limit and shard
    assert [s.id for s in split(HumanEval, HumanEvalConfig, "report", limit=3)] == ["HumanEval/40", "HumanEval/41",
                                                                                    "HumanEval/42"]  # fmt: skip
    sharded = split(HumanEval, HumanEvalConfig, "tune", limit=5, shard=1, num_shards=2)
    assert [s.id for s in sharded] == ["HumanEval/1", "HumanEval/3"]


def test_humaneval_x_split(humaneval_x):
    tune = split(HumanEvalX, HumanEvalXConfig, "tune")
    report = split(HumanEvalX, HumanEvalXConfig, "report")
    check_partition(humaneval_x, tune, report)
    number = lambda s: int(s.id.split("/")[1])  # noqa: E731
    for lang in LANGUAGES:  # the same problems in every language
        assert sorted(number(s) for s in tune if s.language == lang) == list(range(40))
        assert sorted(number(s) for s in report if s.language == lang) == list(range(40, 164))
    # filters and the per-language limit do not move a problem to the other split
    go = split(HumanEvalX, HumanEvalXConfig, "report", languages=["go"], limit=2)
    assert [s.id for s in go] == ["Go/40", "Go/41"]


def test_spec_bench_split(spec_bench):
    tune = split(SpecBench, SpecBenchConfig, "tune")
    report = split(SpecBench, SpecBenchConfig, "report")
    check_partition(spec_bench, tune, report)
    counts = Counter(s.category for s in tune)
    assert counts == {c: (3 if c in ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem",
                                      "humanities") else 20) for c in CATEGORIES}  # fmt: skip
    for category in CATEGORIES:  # the first questions of each category, in file order
        in_file = [s.id for s in spec_bench if s.category == category]
        assert [s.id for s in tune if s.category == category] == in_file[: counts[category]]
    # a category filter keeps each question's split
    qa = split(SpecBench, SpecBenchConfig, "tune", categories=["qa"])
    assert [s.id for s in qa] == [s.id for s in tune if s.category == "qa"]


def test_jsonl_split_and_bad_split(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": "x"} for i in range(6)])
    every, tune, report = (split(JsonlTask, JsonlTaskConfig, s, path=path) for s in ("all", "tune", "report"))
    check_partition(every, tune, report)
    assert [s.id for s in tune] == ["q0", "q1"]  # the first quarter, rounded up
    with pytest.raises(TaskDataError, match="task.split='train': use all, tune .* or report"):
        split(JsonlTask, JsonlTaskConfig, "train", path=path)
