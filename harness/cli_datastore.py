"""``harness datastore build [key=value ...]``: the token datastore REST retrieves from.

Examples::

    harness datastore build                          # the zoo corpus's training tokens -> $HARNESS_CACHE/datastore/zoo
    harness datastore build name=zoo-python inputs=[$HOME/.cache/harness/zoo-data/corpus/documents.jsonl] languages=[python]
    harness datastore build name=mine inputs=[notes.txt,chats.jsonl] tokenizer=Qwen/Qwen2.5-0.5B
    harness datastore build name=nest max_tokens=200000 keys=zoo/target   # + NEST's kNN keys (hidden states)
    harness datastore build --cfg                    # print the composed configuration

Use it with ``harness run --methods rest method.rest.datastore=<dir>`` (default: the zoo one), and
one with keys with ``--methods nest method.nest.datastore=<dir>`` (default: ``$HARNESS_CACHE/datastore/nest``).
The datastore's tokens must come from the model's tokenizer: the method checks its vocabulary.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from harness.zoo.build import ZooDataConfig

USAGE = "usage: harness datastore build [key=value ...] [--quiet]   (harness datastore build --cfg shows all keys)"


@dataclass
class DatastoreBuildConfig:
    """What ``harness datastore build`` reads and where it writes."""

    name: str = "zoo"  # datastore name: the default output is $HARNESS_CACHE/datastore/<name>
    out: str = ""  # output directory ("" = $HARNESS_CACHE/datastore/<name>)
    # text files (one document each) or .jsonl files (one document per line); [] = the zoo corpus's token data
    inputs: list[str] = field(default_factory=list)
    text_field: str = "text"  # .jsonl inputs: the field holding a document's text
    languages: list[str] = field(default_factory=list)  # .jsonl inputs: keep lines whose "lang" is one of these ([] = all)
    # tokenizer of `inputs` (the model's: a local dir or hub id); the zoo data is encoded with it too when it is a
    # local model directory and `data.tokenizer_from` is unset (a re-built corpus would otherwise get a re-trained one)
    tokenizer: str = "zoo/target"
    zoo_tokens: str = "train.npy"  # no inputs: the zoo token file (train.npy | train_functions.npy)
    data: ZooDataConfig = field(default_factory=ZooDataConfig)  # where the zoo data lives (built first if missing)
    max_tokens: int = 0  # keep only the first N tokens (0 = all)
    # also store kNN keys (NEST): this model's hidden state before each token (a local dir or hub id; "" = none)
    keys: str = ""
    max_keys: int = 200000  # keys for the first N tokens only (0 = all; an exact search reads every key per step)
    keys_window: int = 256  # tokens a key may have read: keys are computed in windows of this many (within a document)
    threads: int = 1  # torch threads for the keys' forwards (0 = torch's default; more than the free cores slows it badly)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # noqa: PLC0415

    ConfigStore.instance().store(name="datastore_build", node=DatastoreBuildConfig)


def main(argv: list[str]) -> int:
    from harness.cli_train import dispatch  # noqa: PLC0415

    return dispatch(argv, USAGE, {"build": run_build}, lambda _what: "datastore_build", "datastore command",
                    register_configs)  # fmt: skip


def run_build(cfg: DatastoreBuildConfig) -> int:
    from harness.datastore import build, default_datastore_dir  # noqa: PLC0415
    from harness.progress import Progress  # noqa: PLC0415

    out = Path(cfg.out).expanduser() if cfg.out else default_datastore_dir(cfg.name)
    with Progress(3 if cfg.keys else 2, "datastore build", "stage") as bar:
        bar.start("tokenising the inputs" if cfg.inputs else "reading the zoo's token data")
        tokens, sources, tokenizer = read_inputs(cfg) if cfg.inputs else read_zoo(cfg)
        if cfg.max_tokens > 0:
            tokens = tokens[: cfg.max_tokens]
        bar.start(f"suffix array of {len(tokens):,} tokens")
        build(tokens, sources, tokenizer, out)
        if cfg.keys:
            bar.start(f"kNN keys from {cfg.keys}")
            add_keys(cfg, out, tokens)
        bar.done()
    return 0


def add_keys(cfg: DatastoreBuildConfig, out: Path, tokens: np.ndarray) -> None:
    """NEST's kNN keys from ``cfg.keys``'s hidden states, written into the datastore ``out``."""
    from harness.config import ModelConfig  # noqa: PLC0415
    from harness.engine import Engine  # noqa: PLC0415
    from harness.neighbours import build_keys  # noqa: PLC0415

    import torch  # noqa: PLC0415

    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    engine = Engine.load(ModelConfig(name="keys", path=cfg.keys, dtype="float32", device="cpu"))
    if int(np.max(tokens)) >= engine.config.vocab_size:
        raise ValueError(f"the datastore holds token ids past {cfg.keys}'s vocabulary: build it with that model's tokenizer")
    build_keys(engine, tokens, cfg.max_keys, cfg.keys_window).save(out)


def read_zoo(cfg: DatastoreBuildConfig) -> tuple[np.ndarray, list[dict], dict]:
    """The zoo corpus's token data (documents as ``<s> ... </s>``), built first when missing."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from harness.datastore import tokenizer_fingerprint  # noqa: PLC0415
    from harness.paths import resolve_repo_path  # noqa: PLC0415
    from harness.zoo.build import prepare_data  # noqa: PLC0415

    data, model_dir = cfg.data, resolve_repo_path(cfg.tokenizer)
    if not data.tokenizer_from and (model_dir / "tokenizer.json").exists():
        data = replace(data, tokenizer_from=str(model_dir))  # the zoo data in the model's tokens
    paths = prepare_data(data)
    file = paths.tokens / cfg.zoo_tokens
    if not file.exists():
        raise FileNotFoundError(f"no zoo token file {file}; use zoo_tokens=train.npy or train_functions.npy")
    tok = AutoTokenizer.from_pretrained(str(paths.tokenizer))
    sources = [{"path": str(file), "bytes": file.stat().st_size, "kind": "zoo token data"}]
    return np.load(file), sources, tokenizer_info(str(paths.tokenizer), tok, tokenizer_fingerprint)


def tokenizer_info(path: str, tok, fingerprint) -> dict:
    return {"path": path, "vocab_size": len(tok), "fingerprint": fingerprint(tok), "separator": tok.eos_token}


def read_inputs(cfg: DatastoreBuildConfig) -> tuple[np.ndarray, list[dict], dict]:
    """Tokenise text / jsonl files with the model's tokenizer; each document ends with EOS."""
    from transformers import AutoTokenizer  # noqa: PLC0415

    from harness.datastore import tokenizer_fingerprint  # noqa: PLC0415
    from harness.paths import resolve_repo_path  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(str(resolve_repo_path(cfg.tokenizer)))
    if tok.eos_token_id is None:
        raise ValueError(f"tokenizer {cfg.tokenizer} has no EOS token to separate documents with")
    parts, sources = [], []
    for name in cfg.inputs:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"datastore input {path} is not a file; give text or .jsonl files in inputs=[...]")
        texts = list(jsonl_texts(path, cfg.text_field, cfg.languages)) if path.suffix == ".jsonl" else [path.read_text()]
        ids = encode(tok, texts)
        parts += [np.asarray([*d, tok.eos_token_id], dtype=np.int64) for d in ids]
        sources.append({"path": str(path), "bytes": path.stat().st_size, "documents": len(texts)})
    if not parts:
        raise ValueError("the inputs hold no documents (check text_field= and languages=)")
    return np.concatenate(parts), sources, tokenizer_info(cfg.tokenizer, tok, tokenizer_fingerprint)


def encode(tok, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens (a fast tokenizer's batch encoder when there is one)."""
    if not texts:
        return []
    if tok.is_fast:  # no "longer than the model's maximum length" warnings: documents are not model inputs
        return [e.ids for e in tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)]
    return tok(texts, add_special_tokens=False).input_ids


def jsonl_texts(path: Path, text_field: str, languages: list[str]):
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            if text_field not in row:
                raise ValueError(f"{path}:{number} has no {text_field!r} field; set text_field=...")
            if languages and row.get("lang") not in languages:
                continue
            yield row[text_field]


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
