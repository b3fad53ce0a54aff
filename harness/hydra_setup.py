"""The Hydra set-up of ``harness run``: the root config, the config groups (a task, a model and
the methods, from the registry) and composing a run's configuration from overrides.

Only the command line (harness/cli.py) and sweeps (harness/sweep.py) use it; library code
takes the plain dataclasses of harness/config.py.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any

from harness.config import ModelConfig, RunSettings, SamplingConfig, VllmSettings
from harness.paths import resolve_repo_path
from harness.registry import METHODS, MODELS, TASKS, UnknownName


ROOT = "harness_run"


@dataclass
class RootConfig:
    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"task": "humaneval"}, {"model": default_model()}])
    methods: list[str] = field(default_factory=lambda: ["autoregressive"])  # methods to compare
    run: RunSettings = field(default_factory=RunSettings)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    task: Any = None  # filled from the `task` group
    model: Any = None  # filled from the `model` group
    method: dict[str, Any] = field(default_factory=dict)  # per-method configs, one entry per requested method
    vllm: VllmSettings = field(default_factory=VllmSettings)  # how run.engine=vllm starts vLLM


def default_model() -> str:
    """The zoo target when the zoo is there, else the untrained random-tiny model."""
    return "zoo-target" if (resolve_repo_path("zoo/target") / "config.json").exists() else "random-tiny"


def register_configs() -> None:
    """The root config and one config group each for tasks, models and methods."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=ROOT, node=RootConfig)
    for name in TASKS.names():
        cs.store(group="task", name=name, node=TASKS.get(name).config_class(name=name))
    for name in MODELS.names():
        cs.store(group="model", name=name, node=MODELS.get(name))
    for name in METHODS.names():
        cs.store(group="method", name=name, node=METHODS.get(name).config_class(name=name))


def compose(overrides: list[str]):
    """The run's configuration (an OmegaConf object) composed from ``overrides``."""
    from hydra import compose as hydra_compose
    from hydra import initialize

    from omegaconf import OmegaConf

    register_configs()
    with initialize(version_base=None, config_path=None):
        cfg = hydra_compose(config_name=ROOT, overrides=overrides)
    check_string_lists(OmegaConf.to_object(cfg), overrides)
    return cfg


def check_string_lists(obj: Any, overrides: list[str]) -> None:
    """A list override whose field holds strings (``task.stop``) must give strings: OmegaConf
    would turn ``[1,2]`` into ``["1", "2"]`` silently."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from harness.config import ConfigValueError

    for override in OverridesParser.create().parse_overrides(overrides):
        value = override.value()
        if not isinstance(value, list) or all(isinstance(v, str) for v in value):
            continue
        *parents, name = override.key_or_group.split(".")
        owner = obj
        for part in parents:
            owner = owner.get(part) if isinstance(owner, dict) else getattr(owner, part, None)
        if not dataclasses.is_dataclass(owner) or name not in typing.get_type_hints(type(owner)):
            continue
        hint = typing.get_type_hints(type(owner))[name]
        lists = [hint] + list(typing.get_args(hint))  # Optional[list[str]] holds list[str]
        if any(typing.get_origin(h) is list and typing.get_args(h) == (str,) for h in lists):
            bad = next(v for v in value if not isinstance(v, str))
            quoted = "[" + ",".join(f"'{v}'" for v in value) + "]"
            raise ConfigValueError(f"{override.key_or_group}={value!r} must be a list of strings, but {bad!r} is of "
                                   f"type {type(bad).__name__}; quote each item: {override.key_or_group}={quoted}")


def to_experiment(cfg):
    """The runner's ``Experiment`` from a composed configuration."""
    from omegaconf import OmegaConf

    from harness.runner import Experiment

    obj = OmegaConf.to_object(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("defaults", None)
    return Experiment(
        model=obj.model,
        task=obj.task,
        methods={name: obj.method[name] for name in obj.methods},
        run=obj.run,
        sampling=obj.sampling,
        config=plain,
        vllm=obj.vllm,
    )


def model_paths_as_presets(override: str) -> str:
    """``model=zoo-target,Qwen/Qwen2.5-0.5B,/models/x``: a hub id or local path in a model
    sweep becomes a preset of its own (registered here, named after it), so presets and any
    causal LM can be swept together."""
    from hydra.core.config_store import ConfigStore

    key, _, value = override.partition("=")
    if key.lstrip("+") != "model" or "," not in value:
        return override
    names = []
    for v in value.split(","):
        v = v.strip()
        if v in MODELS.names():
            names.append(v)
            continue
        if "/" not in v and not resolve_repo_path(v).exists():
            raise UnknownName(f"unknown model '{v}' in the sweep: not a preset ({', '.join(MODELS.names())}) "
                              "nor a local directory; give a hub id as owner/name or a path")
        name = re.sub(r"[^A-Za-z0-9_.-]+", "--", v).strip("-")
        ConfigStore.instance().store(group="model", name=name, node=ModelConfig(name=v, path=v))
        names.append(name)
    return f"{key}={','.join(names)}"
