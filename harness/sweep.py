"""``harness run -m``: sweeps on Hydra's multirun and its launcher plugins.

The harness has no scheduler of its own. A sweep is a Hydra multirun of one task function
(:func:`run_job`): Hydra's sweeper expands ``key=a,b`` overrides into jobs, and the chosen
launcher runs them:

- ``basic`` (Hydra's default): one after the other in this process;
- ``joblib``: local processes in parallel (extra ``joblib``);
- ``ray``: tasks on a Ray cluster, a local one unless ``hydra.launcher.ray.init.address``
  names another (extra ``ray``);
- ``submitit_local`` / ``submitit_slurm``: jobs through submitit, as local processes or
  SLURM jobs (extra ``submitit``).

Each job writes its own run directory ``<sweep dir>/<swept key-value pairs>`` (Hydra's
``override_dirname``), so re-running the same sweep resumes it job by job, and
``harness leaderboard <sweep dir>/* --by run_dir`` compares the jobs.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from harness.errors import HarnessError
from harness.progress import Progress

# launcher name -> (module that provides it, pip extra of this project that installs it)
LAUNCHERS: dict[str, tuple[str, str]] = {
    "basic": ("hydra._internal.core_plugins.basic_launcher", ""),
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "joblib"),
    "ray": ("hydra_plugins.hydra_ray_launcher", "ray"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "submitit"),
}
ERROR_FILE = "job_error.txt"  # written into a job's run directory when the job fails
# the bar of the sweep running in this process; jobs a launcher runs here (basic) report to it
_bar: Progress | None = None


class SweepError(HarnessError, RuntimeError):
    pass


def check_launcher(name: str) -> None:
    """Raise one clear line if launcher ``name`` is unknown or its extra is not installed."""
    import importlib.util

    if name not in LAUNCHERS:
        raise SweepError(f"unknown launcher '{name}': choose one of {', '.join(LAUNCHERS)}")
    module, extra = LAUNCHERS[name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        raise SweepError(
            f"the '{name}' launcher is not installed: pip install 'spec-harness[{extra}]' "
            f"(or pip install -e '.[{extra}]' in a checkout)"
        )


def swept_keys(overrides: list[str]) -> list[str]:
    """Keys whose value is a sweep (``key=a,b``, ``key=range(...)``, ``key=choice(...)``)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(overrides) if o.is_sweep_override()]


def sweep_values(overrides: list[str], key: str) -> list[str]:
    """Every value ``key`` takes in the sweep (one for a plain override)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    values: list[str] = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if o.get_key_element() == key:
            values += list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
    return values


def override_keys(overrides: list[str], only: set[str] | None = None) -> list[str]:
    """The keys Hydra's ``override_dirname`` matches ``exclude_keys`` against."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return [o.key_or_group for o in parsed if only is None or o.get_key_element() in only]


@dataclass
class SweepPlan:
    """What :func:`launch` hands to Hydra."""

    root: Path  # the sweep directory
    overrides: list[str]  # the job overrides (sweeps included) plus Hydra's own settings


def plan(base: list[str], user: list[str], root: Path, launcher: str) -> SweepPlan:
    """Hydra overrides for a sweep: ``base`` (from the flags), the user's, and where jobs write."""
    check_launcher(launcher)
    job_overrides = base + user
    swept = set(swept_keys(job_overrides))
    if not swept:
        raise SweepError("-m needs at least one swept key, e.g. method.speculative.gamma=1,2 or model=a,b")
    fixed = sorted(set(override_keys(job_overrides)) - set(override_keys(job_overrides, swept)))
    hydra_overrides = [
        f"hydra.sweep.dir={root}",
        "hydra.sweep.subdir=${hydra.job.override_dirname}",
        "hydra.job.config.override_dirname.kv_sep=-",
        "hydra.job.config.override_dirname.item_sep=+",
        f"hydra.job.config.override_dirname.exclude_keys=[{','.join(_quote(k) for k in fixed)}]",
        "hydra.job.chdir=false",
    ]
    if launcher != "basic":
        hydra_overrides.append(f"hydra/launcher={launcher}")
    return SweepPlan(root=root, overrides=job_overrides + hydra_overrides)


def job_count(overrides: list[str]) -> int | None:
    """How many jobs the sweep expands into (the product of each swept key's number of values);
    None when a sweep cannot be counted ahead (an unbounded range)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    count = 1
    try:
        for o in OverridesParser.create().parse_overrides(overrides):
            if o.is_sweep_override():
                count *= len(list(o.sweep_string_iterator()))
    except Exception:  # noqa: BLE001 - only the bar's total: unknown, not wrong
        return None
    return count


def _quote(key: str) -> str:
    return f"'{key}'" if any(c in key for c in "@/") else key


def launch(sweep: SweepPlan, progress: bool = True) -> tuple[int, int]:
    """Run the sweep through ``hydra.main``; returns (jobs done, jobs failed). With ``progress``,
    a bar of the jobs run in this process (the basic launcher's) and their times at the end."""
    global _bar
    import hydra

    from harness.hydra_setup import ROOT, register_configs

    register_configs()
    app = hydra.main(version_base=None, config_path=None, config_name=ROOT)(run_job)
    started = time.time()
    argv = sys.argv
    sys.argv = ["harness-run", "-m", *sweep.overrides]  # hydra.main reads its command line
    _bar = Progress(job_count(sweep.overrides), "sweep", "job", enabled=progress)
    try:
        app()
    except SystemExit as exc:  # Hydra exits on a bad override; our jobs never raise
        if exc.code not in (0, None):
            raise SweepError("the sweep could not start: see Hydra's message above") from None
    finally:
        sys.argv = argv
        _bar.close([f"run directories under {sweep.root}"])
        _bar = None
    # this launch's jobs: Hydra rewrites each job's .hydra/overrides.yaml when it starts it
    candidates = [p / ".hydra" / "overrides.yaml" for p in sweep.root.iterdir()] if sweep.root.exists() else []
    jobs = [f.parent.parent for f in candidates if f.exists() and f.stat().st_mtime >= started - 1]
    failed = sum((p / ERROR_FILE).exists() for p in jobs)
    return len(jobs) - failed, failed


def run_job(cfg) -> dict:
    """One job of a sweep (runs wherever the launcher puts it): the job's run directory is
    Hydra's output directory; a failure is reported in one line and never raised, so the
    other jobs go on."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from harness import engines
    from harness.devices import claim_device
    from harness.engine import quiet_transformers
    from harness.errors import one_line
    from harness.hydra_setup import to_experiment

    out = Path(HydraConfig.get().runtime.output_dir)
    err_file = out / ERROR_FILE
    bar = _bar or Progress(None, "sweep", "job", enabled=False)  # a job run elsewhere draws no sweep bar
    bar.start(out.name)
    try:
        quiet_transformers()
        with open_dict(cfg):
            cfg.run.out = str(out)
        with claim_device(cfg.model.device) as device:
            with open_dict(cfg):
                cfg.model.device = device
            result = engines.run(to_experiment(cfg))
        err_file.unlink(missing_ok=True)
        bar.done()
        print(f"[sweep] job done: {result.path}", flush=True)
        return {"status": "ok", "path": str(result.path), "pid": os.getpid()}
    except Exception as exc:  # noqa: BLE001 - one line per failed job, the sweep goes on
        out.mkdir(parents=True, exist_ok=True)
        err_file.write_text(one_line(exc) + "\n")
        bar.done(f"failed: {one_line(exc)}")
        print(f"error: job {out.name}: {one_line(exc)}", file=sys.stderr, flush=True)
        return {"status": "error", "path": str(out), "error": one_line(exc)}
