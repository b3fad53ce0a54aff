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
import json
import signal
import sys
from pathlib import Path
from typing import Any

from harness import hydra_setup
from harness.config import ModelConfig, RunSettings, SamplingConfig, VllmSettings
from harness.errors import HarnessError, one_line
from harness.paths import resolve_repo_path
from harness.registry import METHODS, MODELS, TASKS, UnknownName


class Terminated(BaseException):
    """SIGTERM, raised where the process is, as Ctrl-C raises KeyboardInterrupt: a run stops
    between two statements and everything already appended stays saved."""


def raise_terminated(signum, frame) -> None:
    raise Terminated()


# exit status of a run stopped by a signal: 128 + the signal's number, as a shell reports it
INTERRUPT_STATUS = {KeyboardInterrupt: 128 + signal.SIGINT, Terminated: 128 + signal.SIGTERM}


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
    p.add_argument("--engine", help="harness (default) | vllm: run the methods on vLLM (run.engine; docs/vllm.md)")
    p.add_argument("--force", action="store_true", help="append to a run directory made with another config")
    p.add_argument("--drop-corrupt", action="store_true", help="move corrupt samples.jsonl lines aside on resume")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="no progress bar (also off when stderr is not a terminal)")
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
    fields(VllmSettings(), "vllm.")
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
    if getattr(args, "engine", None):
        overrides.append(f"run.engine={args.engine}")
    if args.force:
        overrides.append("run.force=true")
    if args.drop_corrupt:
        overrides.append("run.drop_corrupt=true")
    if args.quiet:
        overrides.append("run.progress=false")
    return overrides


def method_list(text: str | None) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()] if text else ["autoregressive"]


def concurrency_list(override: str) -> str:
    """``run.concurrency=1,4,16`` (a list, not a sweep: one run measures every concurrency) as ``[1,4,16]``,
    and ``run.concurrency=4`` as ``[4]``."""
    key, _, value = override.partition("=")
    if key == "run.concurrency" and not value.startswith("["):
        return f"{key}=[{value}]"
    return override


def compose(args: argparse.Namespace):
    """The run's configuration: the flags' overrides, then the user's ``key=value`` ones."""
    methods = method_list(args.methods)
    overrides = flag_overrides(args, methods) + [f"methods=[{','.join(methods)}]"]
    if args.out:
        overrides.append(f"run.out={args.out}")
    return hydra_setup.compose(overrides + [concurrency_list(o) for o in args.overrides])


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
    user = [hydra_setup.model_paths_as_presets(o) for o in args.overrides]
    launcher = args.launcher or "basic"
    for o in list(user):
        if o.startswith("hydra/launcher="):
            launcher = o.split("=", 1)[1]
            user.remove(o)
    plan = sweep.plan(base, user, root, launcher)
    done, failed = sweep.launch(plan, progress=not args.quiet)
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
    exp = None
    try:
        from harness import engines, runner
        from harness.engine import quiet_transformers

        quiet_transformers()
        exp = hydra_setup.to_experiment(compose(args))
        exp.run.out = str(runner.out_dir(exp.run))  # named now, so an interrupt can say where the records are
        result = engines.run(exp)
    except (KeyboardInterrupt, Terminated) as stop:
        if args.debug:
            raise
        print(f"interrupted: {saved_records(exp.run.out if exp else None)}", file=sys.stderr)
        return INTERRUPT_STATUS[type(stop)]
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line unless --debug
        if args.debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    from harness.leaderboard import brief

    print((result.path / "leaderboard.md").read_text())
    print(brief(result.table))
    print(f"run directory: {result.path} (report: harness leaderboard {result.path} --format html --out report.html)")
    return 0


def saved_records(out: str | None) -> str:
    """What an interrupted run left: its records and how to resume them."""
    from pathlib import Path

    from harness.results import RunDir

    if out is None or not (Path(out) / "samples.jsonl").exists():
        return "nothing was saved (no record finished)" + (f"; rerun with --out {out} to start it" if out else "")
    try:
        count = len(RunDir(out).records()[0])
    except Exception:  # noqa: BLE001 - a summary line; the records themselves are untouched
        count = "the finished"
    return f"{count} records saved in {out}; rerun the same command (same --out) to resume"


def guarded(debug: bool, fn) -> int:
    """Run fn(); any failure becomes one line on stderr and exit code 2 (unless debug)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        if debug:
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2


def write_or_print(text: str, out: str | None) -> int:
    """Write ``text`` to ``out`` (creating its folder) or print it; 0, the exit status."""
    from pathlib import Path

    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)
        print(f"wrote {out}", file=sys.stderr)
    else:
        print(text)
    return 0


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
        from harness.serving.vllm_report import is_vllm_run, write_report

        if len(args.runs) == 1 and is_vllm_run(Path(args.runs[0])):  # the --out of `harness run --engine vllm`
            out = Path(args.out) if args.out else Path(args.runs[0]) / "leaderboard.md"
            write_report(Path(args.runs[0]), out)
            print(out.read_text() if not args.out else f"wrote {out}", file=sys.stderr if args.out else sys.stdout)
            return 0
        runs = load_runs(args.runs, allow_mixed=args.allow_mixed)
        for notice in runs.notices:
            print(f"note: {notice}", file=sys.stderr)
        table = metrics(runs, by=args.by)
        plots = make_plots(runs, table, by=args.by) if args.plots else {}
        text = render(runs, table, args.format, by=args.by)
        if args.plots:
            for path in write_plots(plots, Path(args.plots)):
                print(f"wrote {path}", file=sys.stderr)
        return write_or_print(text, args.out)

    return guarded(args.debug, go)


def cmd_compare(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="harness compare", description="Two runs side by side: the same methods, and "
                                "which figures moved beyond their intervals.")  # fmt: skip
    p.add_argument("run_a", help="run directory A (e.g. the eager run)")
    p.add_argument("run_b", help="run directory B (e.g. the compiled run)")
    p.add_argument("--format", default="markdown", choices=["markdown", "html"])
    p.add_argument("--out", help="write to this file instead of stdout")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)

    def go() -> int:
        from harness.compare import compare_dirs

        text = compare_dirs(args.run_a, args.run_b, args.format)
        return write_or_print(text, args.out)

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
    """harness profile --methods NAME [run flags and overrides]: where the method's time goes;
    with --phases, several methods' decode steps split by phase, written as JSON to --out."""
    parser = run_parser()
    parser.prog = "harness profile"
    parser.description = ("Profile one method (cProfile over its functions; nothing is written), or with --phases "
                          "several methods' steps split into draft / verify / tree / accept / cache / other "
                          "(wall clocks; a table on stdout and a JSON file at --out).")  # fmt: skip
    parser.add_argument("--top", type=int, default=15, help="functions to show (default 15)")
    parser.add_argument("--phases", action="store_true", help="the per-phase table of every method in --methods")
    parser.add_argument("--json", default="results/profile-phases.json",
                        help="with --phases: where the table goes as JSON (default results/profile-phases.json)")
    args = parser.parse_intermixed_args(argv)

    def go() -> int:
        from harness.engine import quiet_transformers
        from harness.profile import profile, profile_phases

        methods = method_list(args.methods)
        if args.phases:
            if not args.json.endswith(".json"):
                raise HarnessError(f"--json {args.json}: the phase table is written as JSON; name a .json file")
            quiet_transformers()
            table = profile_phases(hydra_setup.to_experiment(compose(args)), methods)
            out = Path(args.json)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(table.as_json(), indent=1) + "\n")
            print(table.table())
            print(f"wrote {out}", file=sys.stderr)
            return 0
        if len(methods) != 1:
            raise UnknownName(f"profile one method at a time, got {len(methods)}: --methods NAME (or --phases)")
        quiet_transformers()
        print(profile(hydra_setup.to_experiment(compose(args)), methods[0], top=args.top).table())
        return 0

    return guarded(args.debug, go)


def cmd_list(argv: list[str]) -> int:
    from harness.catalogue import KINDS, catalogue

    p = argparse.ArgumentParser(prog="harness list", description="What the registry holds: methods, tasks, models.")
    p.add_argument("kinds", nargs="*", metavar="KIND", help=f"only these ({', '.join(KINDS)}); naming one shows every setting")
    p.add_argument("--verbose", "-v", action="store_true", help="every config field and its default")
    p.add_argument("--debug", action="store_true")
    args = p.parse_args(argv)
    kinds = tuple(args.kinds) or KINDS

    def go() -> int:
        if unknown := [k for k in kinds if k not in KINDS]:
            raise UnknownName(f"harness list {' '.join(unknown)}: list one of {', '.join(KINDS)} (or nothing for all)")
        print(catalogue(kinds, verbose=args.verbose or bool(args.kinds)))
        return 0

    return guarded(args.debug, go)


def main(argv: list[str] | None = None) -> int:
    """Every command; Ctrl-C or SIGTERM outside a run's own handling ends in one line too."""
    argv = sys.argv[1:] if argv is None else argv
    previous = signal.signal(signal.SIGTERM, raise_terminated)
    try:
        return dispatch(argv)
    except (KeyboardInterrupt, Terminated) as stop:
        if "--debug" in argv:
            raise
        print("interrupted: the command stopped before it finished; run it again to complete it", file=sys.stderr)
        return INTERRUPT_STATUS[type(stop)]
    finally:
        signal.signal(signal.SIGTERM, previous)


def dispatch(argv: list[str]) -> int:
    commands = "run, list, leaderboard, compare, baseline, check, profile, train, zoo, datastore"
    if not argv or argv[0] in ("-h", "--help"):
        print(f"usage: harness {{{commands}}} ...  (harness run --help for the benchmark options)")
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "run":
        return cmd_run(rest)
    if command == "list":
        return cmd_list(rest)
    if command == "profile":
        return cmd_profile(rest)
    if command == "leaderboard":
        return cmd_leaderboard(rest)
    if command == "compare":
        return cmd_compare(rest)
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
