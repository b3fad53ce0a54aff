"""The progress bar every long command shares (harness/progress.py): its text on a fake clock and a
fake terminal, nesting, the closing summary, and silence under --quiet, $CI and a non-terminal."""

from __future__ import annotations

import io
import re
import sys

import pytest
import torch
from test_medusa import Repeat

from harness import progress
from harness.progress import SUMMARY_LINES, Progress


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _interactive(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    progress.quiet(False)
    yield
    progress.quiet(False)


def lines(stream: io.StringIO) -> list[str]:
    """What a terminal shows: each line as last redrawn (``\\r`` restarts it, ``\\x1b[K`` clears its rest)."""
    return [part.split("\r")[-1].replace("\x1b[K", "") for part in stream.getvalue().split("\n")]


def test_the_bar_names_the_item_in_flight_with_count_and_eta():
    out, clock = Terminal(), Clock()
    bar = Progress(5, "zoo build", "stage", stream=out, clock=clock, width=72, min_interval=0.0)
    bar.item("draft")
    clock.now = 10.0
    bar.advance()
    bar.item("target")
    clock.now = 20.0
    bar.advance()
    assert lines(out) == ["zoo build:  40%|█████▌        | 2/5 [00:20<00:30, 10.00s/stage, target]"]
    clock.now = 50.0
    bar.close(["written to zoo/"])
    assert lines(out) == ["zoo build:  40%|█████▌        | 2/5 [00:50<01:15, 25.00s/stage, target]",
                          "zoo build: 2 of 5 done in 00:50", "written to zoo/", ""]  # fmt: skip


def test_redraws_wait_min_interval_and_a_resumed_count_times_only_the_new_items():
    out, clock = Terminal(), Clock()
    bar = Progress(10, "decoding", "gen", initial=6, stream=out, clock=clock, width=72, min_interval=1.0)
    clock.now = 0.5
    bar.advance()  # too soon after the first draw: not drawn
    assert out.getvalue().count("\r") == 1
    clock.now = 2.0
    bar.advance()  # 2 new items in 2 s: 1 s each, 2 to go
    assert lines(out)[-1] == "decoding:  80%|███████████████████▏    | 8/10 [00:02<00:02,  1.00gen/s]"


def test_stages_are_timed_and_an_unfinished_one_says_so():
    out, clock = Terminal(), Clock()
    with Progress(3, "datastore build", "stage", stream=out, clock=clock, width=72) as bar:
        bar.start("tokenising")
        clock.now = 4.0
        bar.start("suffix array")
        clock.now = 64.0
        bar.done()
        bar.start("keys")
        clock.now = 65.0
    assert lines(out)[-5:] == ["datastore build: 2 of 3 done in 01:05", "tokenising: 00:04", "suffix array: 01:00",
                               "keys: stopped after 00:01", ""]  # fmt: skip


def test_a_failed_item_carries_its_note_and_a_long_summary_is_cut():
    out, clock = Terminal(), Clock()
    bar = Progress(None, "sweep", "job", stream=out, clock=clock, width=72)
    bar.start("seed-0")
    bar.done("failed: no such model")
    bar.close([f"line {i}" for i in range(2 * SUMMARY_LINES)])
    summary = lines(out)[1:-1]
    assert summary[:3] == ["sweep: 1 done in 00:00", "seed-0: 00:00 (failed: no such model)", "line 0"]
    assert len(summary) == SUMMARY_LINES and summary[-1] == f"... and {2 * SUMMARY_LINES + 3 - SUMMARY_LINES} more lines"


def test_a_nested_bar_draws_below_the_outer_one_which_draws_again_when_it_closes():
    out, clock = Terminal(), Clock()
    outer = Progress(2, "zoo build", "stage", stream=out, clock=clock, width=60)
    outer.start("target")
    inner = Progress(4, "train", "step", stream=out, clock=clock, width=60, min_interval=0.0)
    outer.advance()  # the inner bar draws now: the outer one waits
    clock.now = 4.0
    inner.advance(4)
    inner.close()
    clock.now = 5.0
    outer.done()
    outer.close()
    shown = lines(out)
    assert shown == ["zoo build:   0%|          | 0/2 [00:00<?, ?stage/s, target]",  # left as it stood
                     "train: 100%|███████████████| 4/4 [00:04<00:00,  1.00step/s]",
                     "train: 4 of 4 done in 00:04",
                     "zoo build: 100%|██| 2/2 [00:05<00:00,  2.50s/stage, target]",  # drawn again below
                     "zoo build: 2 of 2 done in 00:05", "target: 00:05", ""]  # fmt: skip


@pytest.mark.parametrize("why", ["not a terminal", "--quiet", "CI", "disabled"])
def test_silent_off_a_terminal_under_quiet_in_ci_or_disabled(why, monkeypatch):
    out = io.StringIO() if why == "not a terminal" else Terminal()
    if why == "--quiet":
        progress.quiet()
    if why == "CI":
        monkeypatch.setenv("CI", "true")
    bar = Progress(3, "decoding", "gen", stream=out, enabled=why != "disabled")
    bar.start("a")
    bar.advance()
    bar.close(["summary"])
    assert out.getvalue() == ""
    control = Terminal()  # the same calls on a terminal do draw (what the silence is measured against)
    monkeypatch.delenv("CI", raising=False)
    progress.quiet(False)
    Progress(3, "decoding", "gen", stream=control).close()
    assert control.getvalue()


def test_the_training_loop_reports_steps_and_ends_with_its_summary(tmp_path, monkeypatch):
    from harness.train.loop import TrainLoopConfig, train

    out = Terminal()
    monkeypatch.setattr(sys, "stderr", out)
    monkeypatch.setenv("COLUMNS", "160")  # the loop's bar takes the terminal's width: wide enough for the whole line
    module = torch.nn.Linear(4, 4)
    batch = torch.ones(2, 4)
    loop = TrainLoopConfig(lr=1e-2, warmup_steps=0, max_steps=3, weight_decay=0.0)
    train(module, lambda m, b: (((m(b) - b) ** 2).mean(), 8), Repeat(batch), loop, tmp_path / "fit", log=lambda s: None)
    shown = lines(out)
    assert re.fullmatch(r"train: 100%\|.*\| 3/3 \[.*step.*, loss \d\.\d{3}, \d+ tok/s, lr \d\.\d\de-0\d\]", shown[0])
    assert re.fullmatch(r"train: 3 of 3 done in 00:0\d", shown[1])
    assert re.fullmatch(r"loss \(EMA\) \d\.\d+, 24 tokens, finished", shown[2])


def test_train_zoo_and_datastore_commands_take_quiet(monkeypatch):
    from harness import cli_zoo

    seen = []
    monkeypatch.setattr(cli_zoo, "_prepare", lambda cmd: seen.append(progress._QUIET) or 0)
    assert cli_zoo.main(["prepare"]) == 0 and cli_zoo.main(["prepare", "--quiet"]) == 0
    assert seen == [False, True]
