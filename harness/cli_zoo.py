"""``harness zoo prepare|build|export|eval [key=value ...]``: the model zoo.

- ``prepare``: corpus -> tokenizer -> token data (in the cache; skipped if present).
- ``build``: everything from scratch: prepare, train draft, train target (each resumable,
  one after the other, with their time budgets), export with quality figures and cards.
  ``clean=true`` first deletes the cached data and checkpoints.
- ``export``: export the latest checkpoints (fp16 safetensors + tokenizer + manifest) to
  ``zoo/``, evaluate them (``export.evaluate=false`` to skip) and write the cards.
- ``eval``: re-evaluate the exported models and rewrite their cards.

``harness zoo <cmd> --cfg`` prints the composed configuration.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from harness.train.lm import DRAFT, TARGET, LMTrainConfig, ModelConfig
from harness.zoo.build import ExportConfig, ZooDataConfig

USAGE = "usage: harness zoo {prepare|build|export|eval} [key=value ...]   (--cfg shows all keys)"


@dataclass
class ZooCommand:
    """Top-level config of ``harness zoo``."""

    data: ZooDataConfig = field(default_factory=ZooDataConfig)  # corpus / tokenizer / token data
    draft: ModelConfig = field(default_factory=lambda: DRAFT)  # draft architecture
    target: ModelConfig = field(default_factory=lambda: TARGET)  # target architecture
    # ~20 training tokens per parameter (8,192 tokens per step): 0.95M x 20 and 3.44M x 20
    draft_train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(max_steps=2400, lr=3e-3))  # draft plan
    target_train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(max_steps=8400))  # target plan
    export: ExportConfig = field(default_factory=ExportConfig)  # export / evaluation settings
    train_root: str = ""  # checkpoint root ("" = <cache>/train; models in <train_root>/<name>)
    clean: bool = False  # build only: delete cached data and these checkpoints first


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # noqa: PLC0415

    ConfigStore.instance().store(name="zoo", node=ZooCommand)


def main(argv: list[str]) -> int:
    from harness.cli_train import dispatch  # noqa: PLC0415

    runners = {"prepare": _prepare, "build": _build, "export": _export, "eval": _eval}
    return dispatch(argv, USAGE, runners, lambda _what: "zoo", "zoo command", register_configs)


def _prepare(cmd: ZooCommand) -> int:
    from harness.zoo.build import prepare_data  # noqa: PLC0415

    p = prepare_data(cmd.data)
    print(f"[zoo] data ready under {p.root / 'zoo-data'}")
    return 0


def _build(cmd: ZooCommand) -> int:
    from harness.train.lm import make_job, run_lm_training  # noqa: PLC0415
    from harness.zoo.build import data_paths, export_zoo, prepare_data  # noqa: PLC0415

    paths = data_paths(cmd.data)
    root = Path(cmd.train_root).expanduser() if cmd.train_root else paths.root / "train"
    if cmd.clean:
        for d in (paths.corpus, paths.tokenizer, paths.tokens, root / cmd.draft.name, root / cmd.target.name):
            if d.exists():
                shutil.rmtree(d)
                print(f"[zoo] removed {d}")
    prepare_data(cmd.data)
    for model, train_cfg in ((cmd.draft, cmd.draft_train), (cmd.target, cmd.target_train)):
        job = make_job(model, train_cfg, paths, str(root / model.name))
        _res, summary = run_lm_training(job)
        print(f"[zoo] trained {model.name}: {summary}")
    cmd.export.models = [cmd.draft.name, cmd.target.name]
    cmd.export.draft_name, cmd.export.target_name = cmd.draft.name, cmd.target.name
    export_zoo(cmd.export, cmd.data, str(root))
    return 0


def _export(cmd: ZooCommand) -> int:
    from harness.zoo.build import export_zoo  # noqa: PLC0415

    export_zoo(cmd.export, cmd.data, cmd.train_root)
    return 0


def _eval(cmd: ZooCommand) -> int:
    from harness.zoo.build import data_paths, evaluate_zoo, write_card, write_zoo_index, zoo_dir_of  # noqa: PLC0415

    zoo = zoo_dir_of(cmd.export)
    missing = [m for m in cmd.export.models if not (zoo / m / "config.json").exists()]
    if missing:
        raise FileNotFoundError(f"not exported yet: {', '.join(missing)} (run harness zoo export)")
    evaluate_zoo(zoo, cmd.export, data_paths(cmd.data))
    for m in cmd.export.models:
        write_card(zoo / m)
    write_zoo_index(zoo)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
