"""``harness train lm model=target|draft [key=value ...]``: train a zoo LM (resumable).

Examples::

    harness train lm model=draft train.max_minutes=40 train.threads=1
    harness train lm model=target train.max_minutes=120 train.threads=1
    harness train eagle version=3 max_minutes=45 threads=1   # an EAGLE-3 head on zoo/target
    harness train hidden-transfer preset=firp max_minutes=30 threads=1   # FIRP's transfer maps on zoo/target
    harness train lm --help          # print the composed configuration

Running the same command again continues from the checkpoint in ``out_dir``
(default ``$HARNESS_CACHE/train/<model>``, ``$HARNESS_CACHE`` = ``~/.cache/harness``).
"""

from __future__ import annotations

import functools
import importlib
import sys
from dataclasses import dataclass, field
from typing import Any

from harness import progress
from harness.train.lm import DRAFT, TARGET, LMTrainConfig, ModelConfig
from harness.zoo.build import ZooDataConfig

USAGE = (
    "usage: harness train {lm model=target|draft | medusa | space | coral | eagle version=1|3 | hidden-transfer "
    "preset=hidden-transfer|firp | chimera | llm-to-slm} [key=value ...] [--quiet]   "
    "(harness train <job> --help shows all keys)"
)


@dataclass
class TrainLMCommand:
    """Top-level config of ``harness train lm``."""

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"model": "target"}])
    model: ModelConfig = field(default_factory=ModelConfig)  # architecture (group: target | draft)
    train: LMTrainConfig = field(default_factory=LMTrainConfig)  # optimisation and budget
    data: ZooDataConfig = field(default_factory=ZooDataConfig)  # corpus / tokenizer / token data
    out_dir: str = ""  # checkpoint dir ("" = <cache>/train/<model.name>)


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore  # noqa: PLC0415

    cs = ConfigStore.instance()
    cs.store(name="train_lm", node=TrainLMCommand)
    cs.store(group="model", name="target", node=TARGET)
    cs.store(group="model", name="draft", node=DRAFT)
    from harness.train.medusa import MedusaTrainConfig  # noqa: PLC0415
    from harness.train.space import SpaceTrainConfig  # noqa: PLC0415

    cs.store(name="train_medusa", node=MedusaTrainConfig)
    cs.store(name="train_space", node=SpaceTrainConfig)
    from harness.train.coral import CoralTrainConfig  # noqa: PLC0415

    cs.store(name="train_coral", node=CoralTrainConfig)
    from harness.train.eagle import EagleTrainConfig  # noqa: PLC0415

    cs.store(name="train_eagle", node=EagleTrainConfig)
    from harness.train.hidden_transfer import TransferTrainConfig  # noqa: PLC0415

    cs.store(name="train_hidden-transfer", node=TransferTrainConfig)
    from harness.train.chimera import ChimeraTrainConfig  # noqa: PLC0415

    cs.store(name="train_chimera", node=ChimeraTrainConfig)
    from harness.train.llm_to_slm import LlmToSlmTrainConfig  # noqa: PLC0415

    cs.store(name="train_llm-to-slm", node=LlmToSlmTrainConfig)


def compose_config(config_name: str, overrides: list[str]):
    """Compose a registered structured config with overrides; returns the plain dataclass."""
    from hydra import compose, initialize  # noqa: PLC0415
    from hydra.core.global_hydra import GlobalHydra  # noqa: PLC0415
    from omegaconf import OmegaConf  # noqa: PLC0415

    GlobalHydra.instance().clear()
    with initialize(version_base=None, config_path=None):
        cfg = compose(config_name=config_name, overrides=overrides)
    return OmegaConf.to_object(cfg), OmegaConf.to_yaml(cfg)


def _one_line(exc: BaseException) -> str:
    """``Type: first line`` of an exception, plus the first line of its cause if any."""
    msg = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {msg[0] if msg else ''}"
    cause = exc.__cause__
    if cause is not None and str(cause).strip():
        text += f" ({str(cause).strip().splitlines()[0]})"
    return text


def dispatch(argv: list[str], usage: str, runners: dict, config_name, noun: str, register=None) -> int:
    """Shared front end of ``harness train`` and ``harness zoo``: pick the job, compose its
    config from ``key=value`` overrides (``--cfg`` prints it), run it; failures are one line.
    ``--quiet``: no progress bar and no closing summary (none either when stderr is not a terminal)."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0 if argv else 2
    what, rest = argv[0], argv[1:]
    if what not in runners:
        print(f"error: unknown {noun} {what!r}. {usage}", file=sys.stderr)
        return 2
    show = any(a in ("-h", "--help", "--cfg") for a in rest)
    if "--quiet" in rest:
        progress.quiet()
    rest = [a for a in rest if a not in ("-h", "--help", "--cfg", "--quiet")]
    (register or register_configs)()
    try:
        cmd, yaml = compose_config(config_name(what), rest)
    except Exception as exc:  # noqa: BLE001 - one clear line for bad overrides
        print(f"error: bad configuration: {_one_line(exc)}", file=sys.stderr)
        return 2
    if show:
        print(yaml)
        return 0
    try:
        return runners[what](cmd)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as exc:
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 1


# the trainers that train on a frozen target and export at the end: name -> (module, function); each
# function takes its config and returns (result, one-line summary)
HEAD_TRAINERS = {
    "medusa": ("harness.train.medusa", "run_medusa_training"),
    "eagle": ("harness.train.eagle", "run_eagle_training"),
    "hidden-transfer": ("harness.train.hidden_transfer", "run_transfer_training"),
    "chimera": ("harness.train.chimera", "run_chimera_training"),
    "llm-to-slm": ("harness.train.llm_to_slm", "run_llm_to_slm_training"),
}


# the fine-tunes of the whole target that export when their schedule ends: name -> (module, training function)
FINETUNES = {
    "space": ("harness.train.space", "run_space_training"),
    "coral": ("harness.train.coral", "run_coral_training"),
}


# a fine-tune's held-out measure that runs its decoding method (training code cannot import methods):
# name -> (module, function), handed to the fine-tune's export as ``evaluate``
EVALUATORS = {"coral": ("harness.heldout", "coral_heldout_acceptance")}


def export_finetune(name: str, module, cfg):
    """``module.export(cfg)``, with the fine-tune's evaluator when it has one; returns the directory."""
    if name not in EVALUATORS:
        return module.export(cfg)
    where, function = EVALUATORS[name]
    return module.export(cfg, evaluate=getattr(importlib.import_module(where), function))


def main(argv: list[str]) -> int:
    runners = {"lm": run_train_lm}
    runners.update({name: functools.partial(run_finetune, name) for name in FINETUNES})
    runners.update({name: functools.partial(run_head_trainer, name) for name in HEAD_TRAINERS})
    return dispatch(argv, USAGE, runners, lambda what: f"train_{what}", "training job")


def run_train_lm(cmd: TrainLMCommand) -> int:
    from harness.train.lm import make_job, run_lm_training  # noqa: PLC0415
    from harness.zoo.build import prepare_data  # noqa: PLC0415

    paths = prepare_data(cmd.data)
    job = make_job(cmd.model, cmd.train, paths, cmd.out_dir)
    _result, summary = run_lm_training(job)
    print(f"[train {cmd.model.name}] done: {summary}")
    return 0


def run_head_trainer(name: str, cfg) -> int:
    """One of ``HEAD_TRAINERS`` on a frozen target (resumable); it exports at the end."""
    module, function = HEAD_TRAINERS[name]
    _result, summary = getattr(importlib.import_module(module), function)(cfg)
    print(f"[train {getattr(cfg, 'preset', name)}] done: {summary}")
    return 0


def run_finetune(name: str, cfg) -> int:
    """One of ``FINETUNES`` (resumable), then its export (quality figures and card) once the schedule ends."""
    module_name, function = FINETUNES[name]
    module = importlib.import_module(module_name)
    result, summary = getattr(module, function)(cfg)
    print(f"[train {name}] done: {summary}")
    if result.finished:
        print(f"[train {name}] exported to {export_finetune(name, module, cfg)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
