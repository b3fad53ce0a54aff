"""Shared fixtures: tiny random Llamas and a tiny byte-level BPE tokenizer, built here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from harness.engine import Engine

torch.set_num_threads(1)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "class Foo:\n    def __init__(self):\n        self.x = 1\n",
    "int main() { return 0; }\n",
    "function f(x) { return x * 2; }\n",
] * 20


def build_tokenizer(vocab_size: int = 300) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<pad>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TEXT, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", mask_token="<mask>"
    )


def tiny_config(vocab_size: int, **kw) -> LlamaConfig:
    base = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        bos_token_id=0, eos_token_id=1, pad_token_id=2,
    )  # fmt: skip
    base.update(kw)
    return LlamaConfig(**base)


def tiny_model(vocab_size: int, seed: int = 0, **kw) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(vocab_size, **kw)).eval()


@pytest.fixture(scope="session")
def tokenizer() -> PreTrainedTokenizerFast:
    return build_tokenizer()


# the device of the session's engine: cpu, or cuda for scripts/gpu_check.sh (the same tests on a GPU)
TEST_DEVICE = os.environ.get("HARNESS_TEST_DEVICE", "cpu")


@pytest.fixture(scope="session")
def engine(tokenizer) -> Engine:
    return Engine.from_model(tiny_model(len(tokenizer)).to(TEST_DEVICE), tokenizer)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A saved tiny random Llama + tokenizer: loadable by path like any HF model."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model(len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def pytest_collection_modifyitems(config, items):
    """Tests marked ``vllm`` start vLLM engines (minutes on a CPU) and need .venv-vllm: they belong to
    ``make test-vllm`` (HARNESS_VLLM_TESTS=1, after `make vllm`), and `make test` leaves them out
    (deselected, and counted as such in pytest's summary)."""
    if os.environ.get("HARNESS_VLLM_TESTS") == "1":
        return
    vllm = [item for item in items if item.get_closest_marker("vllm") is not None]
    if vllm:
        config.hook.pytest_deselected(items=vllm)
        items[:] = [item for item in items if item.get_closest_marker("vllm") is None]
