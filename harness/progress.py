"""Progress of the long commands (runs, sweeps, zoo stages, datastore builds, training), one way for all.

A ``Progress`` draws one line on stderr, redrawn in place: what it counts, how far, the item in
flight and an ETA (tqdm's meter text)::

    zoo build:  40%|####      | 2/5 [01:10<01:45, 35.00s/stage, target]

and ends with a short summary (at most ``SUMMARY_LINES`` lines). It draws nothing at all under
``--quiet`` (``quiet()``), when its stream is not a terminal (a log file, a pipe) or when ``$CI``
is set: the commands' own result lines are what a log keeps.

Bars nest: a bar opened while another draws (a training loop inside a zoo stage) leaves the outer
line as it stands and draws below it; the outer one draws again, on a new line, when it closes.
The clock and the width are arguments, so a test renders the exact text on a fake clock.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Callable, Optional, TextIO

from tqdm import tqdm

SUMMARY_LINES = 20  # a summary longer than this is cut, with a line saying how many more there were
_QUIET = False  # set once by the command line's --quiet
_drawing: list["Progress"] = []  # the bars open and drawing, outermost first


def quiet(on: bool = True) -> None:
    """No bar and no summary from any ``Progress`` in this process (``--quiet``)."""
    global _QUIET
    _QUIET = on


def interactive(stream: TextIO) -> bool:
    """True when a bar may draw on ``stream``: not quiet, not CI, a terminal."""
    isatty = getattr(stream, "isatty", None)
    return not _QUIET and not os.environ.get("CI") and bool(isatty and isatty())


class Progress:
    """One long job's bar. ``advance`` after each item and ``item`` names the one in flight, or
    ``start`` each stage (timed for the summary) and ``done`` after the last; ``close`` (or
    leaving a ``with`` block) ends the line and prints the summary."""

    def __init__(
        self,
        total: Optional[int],
        desc: str,
        unit: str = "it",
        *,
        initial: int = 0,
        enabled: bool = True,
        stream: Optional[TextIO] = None,
        clock: Callable[[], float] = time.monotonic,
        width: Optional[int] = None,
        min_interval: float = 0.5,
    ):
        self.total = total or None  # None or 0: unknown, the bar counts without an ETA
        self.desc = desc  # what is counted, at the start of the line
        self.unit = unit  # one item's name (gen, job, stage, step, window)
        self.n = initial  # items done (a resumed job starts past 0)
        self.current = ""  # the item in flight
        self.stream = stream if stream is not None else sys.stderr
        self.shown = enabled and interactive(self.stream)
        self._clock = clock
        self._width = width
        self._min_interval = min_interval
        self._start = clock()
        self._initial = initial
        self._drawn_at: Optional[float] = None
        self._item_start: Optional[float] = None  # when the item ``start`` began started
        self.timings: list[str] = []  # "<item>: <time>" of each started item, for the summary
        self._closed = False
        if self.shown:
            if _drawing:
                _drawing[-1]._freeze()
            _drawing.append(self)
            self._draw(force=True)

    # --------------------------------------------------------------- what the job reports
    def item(self, text: str) -> None:
        """Name the item in flight (a method on a sample, a stage, a job)."""
        self.current = text
        self._draw(force=False)

    def advance(self, n: int = 1) -> None:
        """``n`` more items done."""
        self.n += n
        self._draw(force=False)

    def start(self, name: str) -> None:
        """Begin the item ``name`` (a stage); the one ``start`` began before it counts as done.
        Each started item's time goes in the summary."""
        self.done()
        self.current, self._item_start = name, self._clock()
        self._draw(force=True)

    def done(self, note: str = "") -> None:
        """The item ``start`` began is done (nothing when none is in flight); ``note`` follows its
        time in the summary (``failed: ...``)."""
        if self._item_start is None:
            return
        took = tqdm.format_interval(self._clock() - self._item_start)
        self.timings.append(f"{self.current}: {took}" + (f" ({note})" if note else ""))
        self._item_start = None
        self.advance()

    def set_total(self, total: Optional[int]) -> None:
        """A new estimate of the total (a training budget turned into steps)."""
        self.total = total or None
        self._draw(force=False)

    def close(self, summary: Optional[list[str]] = None) -> None:
        """End the bar's line and print the summary: one line of counts and time, then ``summary``."""
        if self._closed:
            return
        if self._item_start is not None:
            self.timings.append(f"{self.current}: stopped after {tqdm.format_interval(self._clock() - self._item_start)}")
        self._draw(force=True)
        self._closed = True
        if not self.shown:
            return
        self.stream.write("\n")
        lines = [f"{self.desc}: {self.n}{f' of {self.total}' if self.total else ''} done "
                 f"in {tqdm.format_interval(self._clock() - self._start)}", *self.timings, *(summary or [])]  # fmt: skip
        if len(lines) > SUMMARY_LINES:
            lines = lines[: SUMMARY_LINES - 1] + [f"... and {len(lines) - SUMMARY_LINES + 1} more lines"]
        self.stream.write("".join(line + "\n" for line in lines))
        self.stream.flush()
        if self in _drawing:
            _drawing.remove(self)
        if _drawing:
            _drawing[-1]._drawn_at = None  # the outer bar draws again, on a new line
            _drawing[-1]._draw(force=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- drawing
    def text(self) -> str:
        """The bar's line as it would be drawn now (tqdm's meter: percent, count, elapsed<ETA, rate)."""
        width = self._width or shutil.get_terminal_size((100, 24)).columns
        return tqdm.format_meter(self.n, self.total, self._clock() - self._start, ncols=width - 1, prefix=self.desc,
                                 unit=self.unit, postfix=self.current or None, initial=self._initial)  # fmt: skip

    def _draw(self, force: bool) -> None:
        if not self.shown or self._closed or (_drawing and _drawing[-1] is not self):
            return
        now = self._clock()
        if not force and self._drawn_at is not None and now - self._drawn_at < self._min_interval:
            return
        self._drawn_at = now
        self.stream.write("\r" + self.text() + "\x1b[K")
        self.stream.flush()

    def _freeze(self) -> None:
        """Leave this line as it stands (a nested bar draws below it)."""
        self._draw(force=True)
        self.stream.write("\n")
        self.stream.flush()
