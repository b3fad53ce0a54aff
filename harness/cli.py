"""The command line: the only module that knows about Hydra (besides cli_train/cli_zoo/cli_datastore).

    harness run --methods autoregressive,hf-generate --task humaneval --limit 20 [key=value ...]
    harness list
    harness train ... | harness zoo ... | harness datastore build ...

Flags are shorthands for overrides; any config field can be set as ``key=value``
(``task.languages=[cpp,go]``, ``model.dtype=bfloat16``, ``method.<name>.<field>=...``).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

from harness.config import ModelConfig, RunSettings, SamplingConfig
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


def default_model() -> str:
    return "zoo-target" if (resolve_repo_path("zoo/target") / "config.json").exists() else "random-tiny"


def register_configs() -> None:
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name=ROOT, node=RootConfig)
    for name in TASKS.names():
        cs.store(group="task", name=name, node=TASKS.get(name).config_class(name=name))
    for name in MODELS.names():
        cs.store(group="model", name=name, node=MODELS.get(name))
    for name in METHODS.names():
        cs.store(group="method", name=name, node=METHODS.get(name).config_class(name=name))


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="harness run",
        description="Benchmark decoding methods against greedy autoregressive decoding of the same model.",
        epilog=overrides_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--methods", help="comma-separated method names (autoregressive always runs as the reference)")
    p.add_argument("--task", help="task name (default humaneval)")
    p.add_argument("--model", help="model preset name, or a hub id / local directory of any causal LM")
    p.add_argument("--limit", type=int, help="at most N samples (per language for humaneval-x)")
    p.add_argument("--max-new-tokens", type=int, help="new tokens per turn (default 128)")
    p.add_argument("--out", help="run directory (re-running with the same one resumes)")
    p.add_argument("--force", action="store_true", help="append to a run directory made with another config")
    p.add_argument("--drop-corrupt", action="store_true", help="move corrupt samples.jsonl lines aside on resume")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("-m", "--multirun", action="store_true",
                   help="sweep: key=a,b overrides expand into one job (and run directory under --out) per combination")
    p.add_argument("--launcher", help="with -m: basic (default, sequential) | joblib | ray | submitit_local | "
                   "submitit_slurm (Hydra launcher plugins; hydra.launcher.* overrides configure them)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides (see below)")
    return p


def overrides_help() -> str:
    lines = ["config overrides (key=value):"]

    def fields(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            if f.name == "name":
                continue
            lines.append(f"  {prefix}{f.name}={getattr(obj, f.name)!r}")

    fields(RunSettings(), "run.")
    fields(SamplingConfig(), "sampling.")
    fields(ModelConfig(), "model.")
    for name in TASKS.names():
        lines.append(f" task {name}:")
        fields(TASKS.get(name).config_class(name=name), "task.")
    for name in METHODS.names():
        cfg = METHODS.get(name).config_class(name=name)
        if len(dataclasses.fields(cfg)) > 1:
            lines.append(f" method {name}:")
            fields(cfg, f"method.{name}.")
    lines.append("models: " + ", ".join(MODELS.names()) + "  (or any hub id / local path)")
    return "\n".join(lines)


def flag_overrides(args: argparse.Namespace, methods: list[str]) -> list[str]:
    """The overrides the shorthand flags stand for (method configs for ``methods`` included)."""
    overrides = []
    for m in methods:
        METHODS.get(m)  # unknown names fail here with the list of valid ones
        overrides.append(f"+method@method.{m}={m}")
    if args.task:
        TASKS.get(args.task)
        overrides.append(f"task={args.task}")
    if args.model:
        if args.model in MODELS.names():
            overrides.append(f"model={args.model}")
        elif "/" not in args.model and not resolve_repo_path(args.model).exists():
            raise UnknownName(
                f"unknown model '{args.model}': not a preset ({', '.join(MODELS.names())}) nor a local directory; "
                "give a hub id as owner/name or a path"
            )
        else:  # any hub id or local path
            overrides += ["model=random-tiny", f"model.name={args.model}", f"model.path={args.model}",
                          "model.random_init=false"]  # fmt: skip
    if args.limit is not None:
        overrides.append(f"task.limit={args.limit}")
    if args.max_new_tokens is not None:
        overrides.append(f"run.max_new_tokens={args.max_new_tokens}")
    if args.force:
        overrides.append("run.force=true")
    if args.drop_corrupt:
        overrides.append("run.drop_corrupt=true")
    return overrides


def method_list(text: str | None) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()] if text else ["autoregressive"]


def compose(args: argparse.Namespace):
    from hydra import compose as hydra_compose
    from hydra import initialize
    from omegaconf import OmegaConf

    methods = method_list(args.methods)
    overrides = flag_overrides(args, methods) + [f"methods=[{','.join(methods)}]"]
    if args.out:
        overrides.append(f"run.out={args.out}")
    overrides += args.overrides
    register_configs()
    with initialize(version_base=None, config_path=None):
        cfg = hydra_compose(config_name=ROOT, overrides=overrides)
    return cfg, OmegaConf


def to_experiment(cfg, OmegaConf):
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
    )


def model_paths_as_presets(override: str) -> str:
    """``model=zoo-target,Qwen/Qwen2.5-0.5B,/models/x``: a hub id or local path in a model
    sweep becomes a preset of its own (registered here, named after it), so presets and any
    causal LM can be swept together."""
    import re

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


def cmd_multirun(args: argparse.Namespace) -> int:
    """A Hydra multirun: one job (and run directory under --out) per combination of the
    swept overrides, run by the chosen launcher (see harness/sweep.py)."""
    from datetime import datetime
    from pathlib import Path

    from harness import sweep

    methods = method_list(args.methods)
    swept_methods = [m for v in sweep.sweep_values(args.overrides, "methods") for m in v.strip("[]").split(",")]
    configs = list(dict.fromkeys(methods + [m.strip() for m in swept_methods if m.strip()]))
    base = flag_overrides(args, configs)
    if not any(o.split("=", 1)[0] == "methods" for o in args.overrides):
        base.append(f"methods=[{','.join(methods)}]")
    root = Path(args.out or f"results/runs/sweep-{datetime.now():%Y%m%d-%H%M%S}").resolve()
    user = [model_paths_as_presets(o) for o in args.overrides]
    launcher = args.launcher or "basic"
    for o in list(user):
        if o.startswith("hydra/launcher="):
            launcher = o.split("=", 1)[1]
            user.remove(o)
    plan = sweep.plan(base, user, root, launcher)
    done, failed = sweep.launch(plan)
    print(f"[sweep] {done} of {done + failed} jobs done under {root}; "
          f"compare with: harness leaderboard {root}/*/ --by run_dir")  # fmt: skip
    return 0 if failed == 0 else 2


def cmd_run(argv: list[str]) -> int:
    args = run_parser().parse_intermixed_args(argv)
    if args.multirun:
        try:
            return cmd_multirun(args)
        except Exception as exc:  # noqa: BLE001
            if args.debug:
                raise
            print(f"error: {one_line(exc)}", file=sys.stderr)
            return 2
    return cmd_run_args(args)


def cmd_run_args(args: argparse.Namespace) -> int:
    try:
        from harness import runner

        quiet_transformers()
        cfg, OmegaConf = compose(args)
        exp = to_experiment(cfg, OmegaConf)
        result = runner.run(exp)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line unless --debug
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    print((result.path / "leaderboard.md").read_text())
    print(f"run directory: {result.path}")
    return 0


def quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def one_line(exc: BaseException) -> str:
    from harness.engine import ModelLoadError
    from harness.results import RunDirError
    from harness.runner import HarnessError
    from harness.sweep import SweepError
    from tasks.base import TaskDataError

    known = (HarnessError, ModelLoadError, RunDirError, TaskDataError, UnknownName, SweepError)
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, known):
        return text
    name = type(exc).__name__
    if "ConfigComposition" in name or "OverrideParse" in name or "ConfigKey" in name or "Validation" in name:
        return f"bad config override: {text} (see `harness run --help` for the valid keys)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; finished records are saved, rerun with the same --out to resume"
    return f"{name}: {text} (rerun with --debug for the traceback)"


def guarded(debug: bool, fn) -> int:
    """Run fn(); any failure becomes one line on stderr and exit code 2 (unless debug)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def cmd_leaderboard(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness leaderboard", description="Tables and plots from run directories.")
    p.add_argument("runs", nargs="+", help="run directories (several are merged: machines, shards, tasks)")
    p.add_argument("--format", default="markdown", choices=["markdown", "csv", "html", "json"])
    p.add_argument("--by", choices=["language", "category", "run_dir"],
                   help="also split rows by language, category, or run directory (sweep jobs)")
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--plots", help="also write the PNG plots into this directory")
    p.add_argument("--allow-mixed", action="store_true", help="merge runs of different models/settings anyway")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    def go() -> int:
        from pathlib import Path

        from harness.leaderboard import make_plots, render, write_plots
        from harness.report import load_runs, metrics

        runs = load_runs(args.runs, allow_mixed=args.allow_mixed)
        for notice in runs.notices:
            print(f"note: {notice}", file=sys.stderr)
        table = metrics(runs, by=args.by)
        plots = make_plots(runs, table, by=args.by) if (args.plots or args.format == "html") else {}
        text = render(runs, table, args.format, by=args.by, plots=plots)
        if args.plots:
            for path in write_plots(plots, Path(args.plots)):
                print(f"wrote {path}", file=sys.stderr)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(text)
            print(f"wrote {args.out}", file=sys.stderr)
        else:
            print(text)
        return 0

    return guarded(args.debug, go)


def cmd_baseline(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness baseline", description="Record a run's figures as a baseline.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", required=True, help="baseline file, e.g. results/baselines/NAME.json")
    p.add_argument("--speedup-tolerance", type=float, help="allowed relative speedup drop (default 0.25)")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    def go() -> int:
        from harness.gate import Tolerances, make_baseline, save_baseline

        tol = Tolerances()
        if args.speedup_tolerance is not None:
            tol.speedup = args.speedup_tolerance
        save_baseline(make_baseline(args.runs, tol), args.out)
        print(f"wrote {args.out}")
        return 0

    return guarded(args.debug, go)


def cmd_check(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness check", description="Fail when a run regresses against a baseline.")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--baseline", required=True, help="a file written by `harness baseline`")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    def go() -> int:
        from harness.gate import check, load_baseline, render_verdict

        verdict = check(args.runs, load_baseline(args.baseline))
        print(render_verdict(verdict))
        return 0 if verdict.ok else 1

    return guarded(args.debug, go)


def cmd_profile(argv: list[str]) -> int:
    """harness profile --methods NAME [run flags and overrides]: where the method's time goes."""
    parser = run_parser()
    parser.prog = "harness profile"
    parser.description = "Profile one method (cProfile over its functions; nothing is written)."
    parser.add_argument("--top", type=int, default=15, help="functions to show (default 15)")
    args = parser.parse_intermixed_args(argv)

    def go() -> int:
        from harness.profile import profile

        methods = method_list(args.methods)
        if len(methods) != 1:
            raise UnknownName(f"profile one method at a time, got {len(methods)}: --methods NAME")
        quiet_transformers()
        cfg, OmegaConf = compose(args)
        print(profile(to_experiment(cfg, OmegaConf), methods[0], top=args.top).table())
        return 0

    return guarded(args.debug, go)


def cmd_list() -> int:
    print(f"methods: {', '.join(method_label(name) for name in METHODS.names())}")
    for title, reg in (("tasks", TASKS), ("models", MODELS)):
        print(f"{title}: {', '.join(reg.names())}")
    return 0


def method_label(name: str) -> str:
    """``name``, with ``(lossy: <when>)`` for a method whose output is not the target's in some mode."""
    modes = getattr(METHODS.get(name), "lossy_modes", "")
    return name if not modes else f"{name} (lossy)" if modes == "always" else f"{name} (lossy: {modes})"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = "run, list, leaderboard, baseline, check, profile, train, zoo, datastore"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: harness {{{commands}}} ...  (harness run --help for the benchmark options)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "list":
        return cmd_list()
    if command == "profile":
        return cmd_profile(rest)
    if command == "leaderboard":
        return cmd_leaderboard(rest)
    if command == "baseline":
        return cmd_baseline(rest)
    if command == "check":
        return cmd_check(rest)
    if command == "train":
        from harness import cli_train

        return cli_train.main(rest)
    if command == "zoo":
        from harness import cli_zoo

        return cli_zoo.main(rest)
    if command == "datastore":
        from harness import cli_datastore

        return cli_datastore.main(rest)
    print(f"error: unknown command '{command}'; valid commands: {commands}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
