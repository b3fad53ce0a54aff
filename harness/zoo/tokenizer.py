"""A byte-level BPE tokenizer trained on the corpus, saved as a standard transformers tokenizer.

Special tokens: ``<s>`` (BOS, id 0), ``</s>`` (EOS, id 1), ``<pad>`` (id 2) and ``<mask>``
(id 3, reserved for SPACE's mask-token decoding). Encoding adds BOS in front (a template
post-processor), decoding is byte-level so code whitespace round-trips exactly.

Pre-tokenisation splits line breaks from the indentation that follows them. GPT-2's
byte-level regex merges ``"\n" + indent`` into one piece, so a prompt that ends with a bare
newline (every HumanEval prompt does) ends on a token the model has only ever seen before
unindented code, and greedy completions start a new top-level ``def``. With line breaks
isolated, ``prompt + body`` tokenises as ``tokens(prompt) + tokens(body)`` at that boundary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

BOS, EOS, PAD, MASK = "<s>", "</s>", "<pad>", "<mask>"
SPECIAL_TOKENS = [BOS, EOS, PAD, MASK]

# GPT-2's pieces (contractions, words, numbers, punctuation runs, whitespace) with one change:
# a run of line breaks (and the spaces before them) is its own piece, never merged with the
# indentation of the next line.
PRETOKENIZE_PATTERN = (
    r"'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|[^\S\r\n]*[\r\n]+|[^\S\r\n]+(?!\S)|[^\S\r\n]+"
)


@dataclass
class TokenizerConfig:
    """Byte-level BPE settings."""

    vocab_size: int = 4096  # total vocabulary, special tokens included
    min_frequency: int = 2  # merges need at least this many occurrences


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | os.PathLike):
    """Train on ``texts`` and save to ``out_dir`` (``AutoTokenizer.from_pretrained`` loads it)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return wrap_and_save(tok, out_dir)


def wrap_and_save(tok, out_dir: str | os.PathLike):
    from transformers import PreTrainedTokenizerFast  # noqa: PLC0415

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        mask_token=MASK,
        unk_token=None,
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )
    fast.add_bos_token = True
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer  # noqa: PLC0415

    return AutoTokenizer.from_pretrained(str(path))


def check_tokenizer(tok, samples: Iterable[str] = ()) -> None:
    """Raise if BOS is not added, a sample does not round-trip, or a line break is merged
    with the next line's indentation."""
    ids = tok("def f():").input_ids
    if ids[0] != tok.bos_token_id:
        raise AssertionError(f"tokenizer does not add BOS: {ids[:4]}")
    for s in ["def f(x):\n\tif x:\n        return  x\r\n\n\n    # é ☃ 中\n", *samples]:
        back = tok.decode(tok.backend_tokenizer.encode(s, add_special_tokens=False).ids)
        if back != s:
            raise AssertionError(f"round trip failed: {s[:60]!r} -> {back[:60]!r}")
    prompt, body = 'def f(x):\n    """Doc."""\n', "    return x\n"
    enc = tok.backend_tokenizer.encode
    head, whole = enc(prompt, add_special_tokens=False).ids, enc(prompt + body, add_special_tokens=False).ids
    if whole[: len(head)] != head:
        raise AssertionError("a line break is merged with the next line's indentation")
    for name in ("bos_token", "eos_token", "pad_token", "mask_token"):
        if getattr(tok, name) is None:
            raise AssertionError(f"tokenizer lacks {name}")
