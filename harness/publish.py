"""Publishing the figures: a clean-tree guard, and the tables of README.md and docs/*.md generated
from results/.

    python -m harness.publish clean-tree     # exit 2 unless the tree is clean (ALLOW_DIRTY=1: warn only)
    python -m harness.publish readme         # rewrite the generated blocks of README.md and docs/*.md
    python -m harness.publish readme --check # exit 1 when a block differs from what results/ holds

Every table of measured figures in README.md and docs/*.md sits between two markers,

    <!-- results-table: leaderboard -->  ...  <!-- /results-table -->

and is rendered here from the published leaderboards in ``results/`` (``make leaderboard``
and ``make tables`` write those, then run ``make readme``). A block is never edited by
hand: tests/test_readme.py fails when a block differs from its files, and when a table
outside the blocks quotes a measured figure.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path

from harness.paths import REPO_ROOT
from harness.results import commit_of, git_changes

REFERENCE = "autoregressive"
BEGIN = re.compile(r"<!-- results-table: ([\w-]+) -->\n")
END = "<!-- /results-table -->"


class PublishError(Exception):
    """The tables cannot be published as asked; the message says what to do."""


# ---- the clean-tree guard ---------------------------------------------------------------
def clean_tree(allow_dirty: bool, root: Path = REPO_ROOT) -> str:
    """'' on a clean tree; a warning when dirty and ``allow_dirty``; else ``PublishError``.

    Dirty means what runs record in their manifests (``results.git_changes``: uncommitted
    or untracked files outside results/ and README.md), so tables made with
    ``ALLOW_DIRTY=1`` say "DIRTY tree" in their title and header.
    """
    try:
        changes = git_changes(root)
    except (OSError, subprocess.SubprocessError) as exc:
        raise PublishError(f"cannot tell whether {root} is clean ({exc}); publish from a git checkout") from exc
    if not changes:
        return ""
    listed = ", ".join(line[3:] for line in changes[:3]) + (", ..." if len(changes) > 3 else "")
    if allow_dirty:
        return f"warning: publishing from a dirty tree ({listed}); every table will be marked DIRTY"
    raise PublishError(f"the working tree has uncommitted changes ({listed}); commit them first, "
                       "or rerun with ALLOW_DIRTY=1 to publish tables marked DIRTY")  # fmt: skip


# ---- reading a published leaderboard --------------------------------------------------------
@dataclass
class Published:
    """One leaderboard file of results/: its header line (model, device, commit) and its rows."""

    path: Path
    header: str  # "model: ... | device: ... | commit: ..."
    rows: list[dict[str, str]]  # one dict per table row, cells as written

    @property
    def model(self) -> str:
        """The model the header names (its first field)."""
        return self.header.split("|")[0].split(":", 1)[1].strip()


def read_leaderboard(path: Path) -> Published:
    """Parse a markdown leaderboard written by ``harness leaderboard``: its first table (the ranked,
    lossless one; a "Lossy methods" section's table, with other columns, follows it)."""
    if not path.exists():
        raise PublishError(f"{path} is missing; regenerate it with make leaderboard / make tables")
    lines = path.read_text().splitlines()
    header = next((line for line in lines if line.startswith("model: ")), "")
    start = next((i for i, line in enumerate(lines) if line.startswith("|")), len(lines))
    table = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    if len(table) < 2 or not header:
        raise PublishError(f"{path} holds no leaderboard table; regenerate it with harness leaderboard")
    names = [c.strip() for c in table[0].strip("|").split("|")]
    rows = [dict(zip(names, (c.strip() for c in line.strip("|").split("|")))) for line in table[2:]]
    return Published(path, header, rows)


def two_decimals(cell: str | None) -> str:
    """A figure as the README shows it: two decimals (half up); '-' for nan or a missing column."""
    try:
        value = Decimal(cell or "nan")
    except InvalidOperation:
        return cell or "-"
    if not value.is_finite():
        return "-"
    return str(value.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def job_label(run_dir: str) -> tuple[str, str]:
    """(column name, value) of a sweep job's directory: ``method.medusa.tree-chain`` -> ('tree', 'chain')."""
    keys, values = [], []
    for part in run_dir.split("+"):
        key, _, value = part.rpartition("-")
        keys.append(key.rsplit(".", 1)[-1])
        values.append(value)
    return ", ".join(keys), ", ".join(values)


HEAD = ["samples", "exact match", "mean accepted tokens", "speedup [95% CI]", "step cost", "efficiency", "repetition", "stop reasons"]


def figures(row: dict[str, str]) -> list[str]:
    """A leaderboard row's cells for the ``HEAD`` columns."""
    speedup = f"{two_decimals(row.get('speedup'))} {row.get('speedup_ci', '')}".strip()
    return [row.get("samples") or "-", two_decimals(row.get("exact_match")),
            two_decimals(row.get("mean_accepted_tokens")), speedup, two_decimals(row.get("step_cost")),
            two_decimals(row.get("efficiency")), two_decimals(row.get("repetition")),
            row.get("stop_reasons") or "-"]  # fmt: skip


def markdown_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def sources(files: list[Published]) -> str:
    """Where a block's figures come from: each file with its header (commit, tree, model, device)."""
    return "<br>\n".join(f"From `results/{f.path.name}`: {f.header}" for f in files)


# the lossless leaderboards of make leaderboard, one per model (each method against autoregressive of its own model)
LEADERBOARDS = ("leaderboard.md", "leaderboard-space.md", "leaderboard-coral.md")


def per_model_leaderboards(results: Path) -> list[Published]:
    return [read_leaderboard(results / name) for name in LEADERBOARDS]


def methods_block(results: Path) -> str:
    """Every non-reference method of the published leaderboards, one row each."""
    files = per_model_leaderboards(results)
    rows = []
    for f in files:
        for row in f.rows:
            if row["method"] != REFERENCE:
                rows.append([f"{row['method']} (`{f.model}`)"] + figures(row))
    return sources(files) + "\n\n" + markdown_table(["method"] + HEAD, rows)


def category_block(results: Path, name: str) -> str:
    """Every non-reference method of a leaderboard made with ``--by category``, one row per category."""
    f = read_leaderboard(results / name)
    rows = [[row["category"], row["method"]] + figures(row) for row in f.rows if row["method"] != REFERENCE]
    return sources([f]) + "\n\n" + markdown_table(["category", "method"] + HEAD, rows)


def sweep_block(results: Path, name: str, method: str, *others: str) -> str:
    """One row per sweep job (``--by run_dir``): the swept value and ``method``'s figures; with
    ``others``, one row per job and method (methods compared in the same runs)."""
    f = read_leaderboard(results / name)
    rows, column = [], "job"
    for row in f.rows:
        if row["method"] in (method, *others):
            column, value = job_label(row["run_dir"])
            rows.append([value] + ([row["method"]] if others else []) + figures(row))
    head = [f"{column}", "method"] if others else [f"{method} {column}"]
    return sources([f]) + "\n\n" + markdown_table(head + HEAD, rows)


def modes_block(results: Path) -> str:
    """The same methods in an eager and a compiled run (model.compile), side by side: each
    speedup is over ``autoregressive`` of its own run."""
    files = [read_leaderboard(results / name) for name in ("leaderboard.md", "leaderboard-compiled.md")]
    eager, compiled = ({row["method"]: row for row in f.rows} for f in files)
    rows = []
    for method, fast in compiled.items():
        slow = eager.get(method, {})
        rows.append([method, fast.get("samples") or "-", two_decimals(slow.get("tokens_per_s")),
                     f"{two_decimals(slow.get('speedup'))} {slow.get('speedup_ci', '')}".strip(),
                     two_decimals(fast.get("tokens_per_s")),
                     f"{two_decimals(fast.get('speedup'))} {fast.get('speedup_ci', '')}".strip(),
                     two_decimals(fast.get("exact_match"))])  # fmt: skip
    head = ["method", "samples", "eager tokens/s", "speedup over eager autoregressive", "compiled tokens/s",
            "speedup over compiled autoregressive", "exact match (compiled)"]  # fmt: skip
    return sources(files) + "\n\n" + markdown_table(head, rows)


HEADLINE_ROWS = 12  # the README's excerpt fits a screen; the rest are one link away


def headline_block(results: Path) -> str:
    """The README's excerpt: the ``HEADLINE_ROWS`` fastest methods of the published leaderboards,
    few columns (each speedup is over ``autoregressive`` of the same model), then how many more
    there are and where."""
    files = per_model_leaderboards(results)
    rows = [dict(row, model=f.model) for f in files for row in f.rows if row["method"] != REFERENCE]
    def fastest_first(row: dict[str, str]) -> tuple[bool, float]:
        speedup = float(row.get("speedup") or "nan")
        return (speedup != speedup, -speedup)  # a missing or nan speedup last

    rows.sort(key=fastest_first)
    shown, rest = rows[:HEADLINE_ROWS], rows[HEADLINE_ROWS:]
    cells = [[row["method"], f"`{row['model']}`", two_decimals(row.get("exact_match")), two_decimals(row.get("mean_accepted_tokens")),
              f"{two_decimals(row.get('speedup'))} {row.get('speedup_ci', '')}".strip()] for row in shown]
    head = ["method", "model", "exact match", "tokens per step", "speedup [95% CI]"]
    more = (f"\n\nand {len(rest)} more, slowest last: {', '.join(row['method'] for row in rest)} "
            f"({', '.join(f'[{f.path.name}](results/{f.path.name})' for f in files)})") if rest else ""
    return sources(files) + "\n\n" + markdown_table(head, cells) + more


def profile_forward_mode(data: dict) -> str:
    """A stored profile's eager / compiled mode (older profiles, as an older commit writes them, name it ``execution``)."""
    return data.get("forward_mode") or data.get("execution") or "eager"


def read_profile(results: Path, name: str) -> dict:
    """A stored per-phase profile (``harness profile --phases --json``) of results/."""
    path = results / name
    if not path.is_file():
        raise PublishError(f"results/{name} is missing; run make profile-phases (PHASES_OUT=results/{name})")
    return json.loads(path.read_text())


def phases_block(results: Path, name: str) -> str:
    """A per-phase profile (``harness profile --phases``, make profile-phases): ms per decode step
    of each phase, per method, with where and from which commit it was measured."""
    data = read_profile(results, name)
    load = data.get("load_average_1min") or {}
    header = (f"From `results/{name}`: model: {data['model']} | device: {data['device']} ({data['device_name']}) | "
              f"forwards: {profile_forward_mode(data)} | threads: {data['threads']} | {data['samples']} samples x "
              f"{data['max_new_tokens']} tokens | load average {load.get('before', float('nan')):.1f} -> "
              f"{load.get('after', float('nan')):.1f} | commit: {commit_of(data)}")  # fmt: skip
    columns = ["draft", "verify", "tree", "accept", "cache", "other"]
    rows = [[r["method"], f"{r['tokens_per_step']:.2f}", *(f"{r['ms_per_step'][c]:.2f}" for c in columns),
             f"{r['wall_ms_per_step']:.2f}"] for r in data["rows"]]  # fmt: skip
    head = ["method", "tokens per step", *(f"{c} ms" for c in columns), "wall ms per step"]
    return header + "\n\n" + markdown_table(head, rows)


def phases_compare_block(results: Path, before: str = "profile-phases-before.json",
                         after: str = "profile-phases.json") -> str:
    """The README's per-phase table: each method's ms per decode step by phase, ``before -> after``,
    from two stored profiles (a method profiled only after shows ``-`` before)."""
    files = {name: read_profile(results, name) for name in (before, after)}
    lines = []
    for label, name in (("before", before), ("after", after)):
        data = files[name]
        load = data.get("load_average_1min") or {}
        lines.append(f"{label.capitalize()}: `results/{name}`, commit {commit_of(data)}, "
                     f"{data['device']} ({data['device_name']}), {profile_forward_mode(data)}, {data['threads']} thread, "
                     f"{data['samples']} samples x {data['max_new_tokens']} tokens, load average "
                     f"{load.get('before', float('nan')):.1f} -> {load.get('after', float('nan')):.1f}")  # fmt: skip
    columns = ["draft", "verify", "tree", "accept", "cache", "other"]
    old_rows = {r["method"]: r for r in files[before]["rows"]}

    def cell(row: dict | None, value, digits: int) -> str:
        return "-" if row is None else f"{value(row):.{digits}f}"

    def outside(row: dict) -> float:  # per cent of the step's wall time outside the forwards
        host = sum(row["ms_per_step"][c] for c in ("tree", "accept", "cache", "other"))
        return 100 * host / row["wall_ms_per_step"] if row["wall_ms_per_step"] else float("nan")

    rows = []
    for r in files[after]["rows"]:
        b = old_rows.get(r["method"])
        # milliseconds to 2 decimals (a host phase is a few tenths of a ms), the share to 1
        figures = [(lambda x, c=c: x["ms_per_step"][c], 2) for c in columns]
        figures += [(lambda x: x["wall_ms_per_step"], 2), (outside, 1)]
        tokens = "-" if b is None else f"{b['tokens_per_step']:.2f}"
        rows.append([r["method"], f"{tokens} → {r['tokens_per_step']:.2f}",
                     *(f"{cell(b, f, d)} → {cell(r, f, d)}" for f, d in figures)])  # fmt: skip
    head = ["method", "tokens per step", *(f"{c} ms" for c in columns), "wall ms per step", "% outside forwards"]
    return "<br>\n".join(lines) + "\n\n" + markdown_table(head, rows)


BLOCKS = {  # block name -> its table, from the results directory
    "headline": headline_block,  # the README's excerpt
    "leaderboard": methods_block,
    "speculative-gamma": lambda results: sweep_block(results, "speculative-gamma.md", "speculative"),
    "medusa-trees": lambda results: sweep_block(results, "medusa-trees.md", "medusa"),
    "space-k": lambda results: sweep_block(results, "space-k.md", "space"),
    "lookahead-wng": lambda results: sweep_block(results, "lookahead-wng.md", "lookahead"),
    "eagle2-trees": lambda results: sweep_block(results, "eagle2-trees.md", "eagle2"),
    "speculative-tree": lambda results: sweep_block(results, "speculative-tree.md", "speculative", "speculative-tree"),
    "spec-bench-docs": lambda results: category_block(results, "leaderboard-docs.md"),
    "modes": modes_block,  # eager vs compiled forwards (make bench MODE=compiled)
    "profile-phases": lambda results: phases_block(results, "profile-phases.json"),  # make profile-phases
    "profile-phases-before": lambda results: phases_block(results, "profile-phases-before.json"),
    "phases": phases_compare_block,  # the README's before -> after table
    # the transformers wrappers beside their counterparts (make profile-phases PHASE_METHODS=... PHASES_OUT=...)
    "profile-phases-hf": lambda results: phases_block(results, "profile-phases-hf.json"),
}


def render_readme(text: str, results: Path) -> str:
    """``text`` with every generated block re-rendered from the files in ``results``."""
    out, pos = [], 0
    for match in BEGIN.finditer(text):
        name = match.group(1)
        if name not in BLOCKS:
            raise PublishError(f"README block '{name}' is unknown; known blocks: {', '.join(BLOCKS)}")
        end = text.find(END, match.end())
        if end < 0:
            raise PublishError(f"README block '{name}' has no closing {END}")
        out += [text[pos : match.end()], BLOCKS[name](results), "\n"]
        pos = end
    return "".join(out) + text[pos:]


def documents(root: Path = REPO_ROOT) -> list[Path]:
    """The markdown files whose tables are generated: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def readme(check: bool, root: Path = REPO_ROOT) -> int:
    stale = []
    for path in documents(root):
        text = path.read_text()
        try:
            new = render_readme(text, root / "results")
        except PublishError as exc:
            raise PublishError(f"{path.relative_to(root)}: {exc}") from None
        if new == text:
            continue
        stale.append(path.relative_to(root))
        if not check:
            path.write_text(new)
            print(f"updated the result tables of {path}", file=sys.stderr)
    if check and stale:
        print(f"result tables differ from results/ in {', '.join(map(str, stale))}; run make readme", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.publish", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("clean-tree", help="exit 2 when the tree has uncommitted changes (unless ALLOW_DIRTY=1)")
    r = sub.add_parser("readme", help="regenerate the README's result tables from results/")
    r.add_argument("--check", action="store_true", help="only compare; exit 1 when they differ")
    args = p.parse_args(argv)
    try:
        if args.command == "clean-tree":
            warning = clean_tree(os.environ.get("ALLOW_DIRTY", "") == "1")
            if warning:
                print(warning, file=sys.stderr)
            return 0
        return readme(args.check)
    except PublishError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
