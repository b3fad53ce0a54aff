"""The HTML report in a real browser: headless Chromium checks the layout and takes the screenshot.

    python -m harness.browser check results/report.html [--width 1280]
    python -m harness.browser screenshot results/report.html results/report.png [--width 1400]

``check`` loads a copy of the page with a small probe script put first in its ``<head>``: it
records console errors and uncaught exceptions, and once the page has loaded it writes what it
measured (horizontal overflow at the window's width, every plot's size) into the DOM, which
``chromium --dump-dom`` prints. No driver or network is needed, only Debian's ``chromium``.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional
from harness.errors import HarnessError

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--mute-audio", "--no-first-run"]
TIMEOUT_S = 180  # one browser run; a report of many methods renders in a few seconds

# put first in <head>: errors from anything after it are recorded; after load, the measurements
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push('uncaught: ' + e.message));
const __console_error = console.error;
console.error = (...a) => { window.__errors.push('console.error: ' + a.join(' ')); __console_error(...a); };
window.addEventListener('load', () => setTimeout(() => {
  const plots = [...document.querySelectorAll('.plotly-graph-div')].map(d => {
    const r = d.getBoundingClientRect();
    return {id: d.id, width: Math.round(r.width), height: Math.round(r.height), drawn: !!d.querySelector('svg.main-svg')};
  });
  const page = document.documentElement;
  const out = {viewport: window.innerWidth, scroll_width: page.scrollWidth, height: page.scrollHeight,
               plots: plots, errors: window.__errors};
  const pre = document.createElement('pre'); pre.id = '__probe'; pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
}, 500));
</script>"""


class BrowserError(HarnessError):
    """No browser, or the browser failed; the message says what to do."""


@dataclass
class PageCheck:
    """What Chromium measured on the page at one window width."""

    width: int  # the window's width (CSS px)
    scroll_width: int  # the page's full width: more than ``width`` means a horizontal scrollbar
    height: int  # the page's full height
    plots: list[dict] = field(default_factory=list)  # id, width, height, drawn (an SVG inside) per plot
    errors: list[str] = field(default_factory=list)  # console errors and uncaught exceptions

    @property
    def problems(self) -> list[str]:
        """Each failed expectation in one line; empty when the page is fine."""
        found = [f"horizontal overflow: the page is {self.scroll_width} px wide in a {self.width} px window"
                 ] if self.scroll_width > self.width else []  # fmt: skip
        found += [f"plot {p['id']} is not drawn or has no size ({p['width']} x {p['height']})"
                  for p in self.plots if not (p["drawn"] and p["width"] > 0 and p["height"] > 0)]  # fmt: skip
        return found + self.errors


def find_chromium() -> Optional[str]:
    """The path of a Chromium (or Chrome) executable, or None."""
    return next((path for name in CANDIDATES if (path := shutil.which(name))), None)


def _chromium(args: list[str]) -> str:
    exe = find_chromium()
    if exe is None:
        raise BrowserError("no Chromium found; install Debian's chromium (apt-get install chromium)")
    try:
        done = subprocess.run([exe, *FLAGS, *args], capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BrowserError(f"chromium did not finish in {TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise BrowserError(f"chromium failed ({done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return done.stdout


def check_page(page: Path, width: int = 1280) -> PageCheck:
    """Load ``page`` at ``width`` px in headless Chromium and measure it (see the module docstring)."""
    text = Path(page).read_text(encoding="utf-8")
    probed = re.sub(r"<head>", "<head>" + PROBE, text, count=1)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "page.html"
        copy.write_text(probed, encoding="utf-8")
        dom = _chromium([f"--window-size={width},900", "--virtual-time-budget=20000", "--dump-dom", copy.as_uri()])
    found = re.search(r'<pre id="__probe">(.*?)</pre>', dom, re.S)
    if found is None:
        raise BrowserError(f"the page never finished loading in chromium ({page}); open it in a browser to see why")
    data = json.loads(html.unescape(found.group(1)))
    return PageCheck(data["viewport"], data["scroll_width"], data["height"], data["plots"], data["errors"])


def screenshot(page: Path, png: Path, width: int = 1400, max_height: int = 4000) -> Path:
    """A PNG of the page's top ``max_height`` px (the whole page if shorter) at ``width`` px."""
    height = min(check_page(page, width).height, max_height)
    png = Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    _chromium([f"--window-size={width},{height}", "--virtual-time-budget=20000", f"--screenshot={png}",
               Path(page).resolve().as_uri()])  # fmt: skip
    if not png.exists():
        raise BrowserError(f"chromium wrote no screenshot to {png}")
    return png


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m harness.browser", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("check", help="no horizontal overflow, every plot drawn, no console errors")
    c.add_argument("page")
    c.add_argument("--width", type=int, default=1280)
    s = sub.add_parser("screenshot", help="a PNG of the page")
    s.add_argument("page")
    s.add_argument("png")
    s.add_argument("--width", type=int, default=1400)
    args = p.parse_args(argv)
    try:
        if args.cmd == "screenshot":
            print(f"wrote {screenshot(Path(args.page), Path(args.png), args.width)}")
            return 0
        result = check_page(Path(args.page), args.width)
    except (BrowserError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in result.problems:
        print(f"FAIL {args.page} at {args.width} px: {problem}")
    if not result.problems:
        print(f"ok {args.page} at {args.width} px: no horizontal overflow, {len(result.plots)} plots drawn, "
              "no console errors")  # fmt: skip
    return 1 if result.problems else 0


if __name__ == "__main__":
    sys.exit(main())
