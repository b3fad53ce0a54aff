"""The HTML report (harness/page.py): its content, and the page in headless Chromium (harness/browser.py)."""

from __future__ import annotations

import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from test_detail import synthetic_run

from harness.browser import check_page, find_chromium, screenshot
from harness.leaderboard import NOTE, title
from harness.page import kind, render_page
from harness.report import load_runs, metrics

CHROMIUM = find_chromium()
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on this machine (apt-get install chromium)")


def write_page(tmp_path: Path, by: str | None = None) -> Path:
    run = synthetic_run(tmp_path / "run")
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        r["category"] = {"a": "short", "b": "long"}[r["sample_id"]]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [{"sample_id": s, "turn": 0, "prompt": f"def {s}():", "pieces": [f"<t{t}>" for t in range(n)]}
             for s, n in (("a", 5), ("b", 8))]  # fmt: skip
    (run / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    runs = load_runs([run])
    page = tmp_path / "report.html"
    page.write_text(render_page(runs, metrics(runs, by=by), by, title(runs), NOTE))
    return page


def viewer(page: str, method: str, group: str = "") -> list[dict]:
    panel = page[page.index(f'id="m-{method}-jsonl' + (f"-{group}" if group else "") + '"') :]
    found = re.search(r'<script type="application/json" class="data">(.*?)</script>', panel, re.S)
    return json.loads(found.group(1))


def external_resources(page: str) -> list[str]:
    """src / href attributes of the page's tags that point outside it (script text is not parsed)."""
    found = []

    class Tags(HTMLParser):
        def handle_starttag(self, tag, attrs):
            found.extend(v for k, v in attrs if k in ("src", "href") and v and not v.startswith(("#", "data:")))

    Tags().feed(page)
    return found


def test_page_content(tmp_path):
    page = write_page(tmp_path).read_text()
    assert external_resources(page) == []  # one file: plotly.js inlined, nothing fetched
    assert page.count("Plotly.newPlot(") >= 9 and len(re.findall(r"\* plotly\.js v\d", page)) == 1
    for header in ("Speedup [95% CI]", "Tokens / step", "TTFT ms", "Best setting", "Draft · verify · host ms/step"):
        assert header in page
    assert "gamma=1" in page and "ran gamma=2" in page  # the best setting beside the one that ran
    assert 'id="m-speculative-jsonl"' in page and 'id="m-medusa-jsonl"' in page
    assert 'id="m-autoregressive-jsonl"' not in page  # the reference has a row, not a panel
    samples = {s["label"]: s for s in viewer(page, "speculative")}
    assert samples["a"]["steps"] == [1, 3, 1] and samples["a"]["prompt"] == "def a():"
    assert samples["a"]["speedup"] == pytest.approx((5 / 0.062) / (5 / 0.060))
    assert samples["b"]["pieces"] == [f"<t{t}>" for t in range(8)]


def test_panels_by_category(tmp_path):
    page = write_page(tmp_path, by="category").read_text()
    assert [s["label"] for s in viewer(page, "speculative", "short")] == ["a"]
    assert [s["label"] for s in viewer(page, "speculative", "long")] == ["b"]
    assert "speculative · long" in page


def test_kinds():
    assert kind({"method": "autoregressive"}) == "reference"
    assert kind({"method": "speculative", "lossless": "checked", "mismatches": 0}) == "lossless"
    assert kind({"method": "prompt-lookup", "lossless": "checked", "mismatches": 0}) == "copy-based"
    assert kind({"method": "speculative", "lossless": "lossy mode", "mismatches": 0}) == "lossy"
    assert kind({"method": "medusa", "lossless": "checked", "mismatches": 2}) == "lossy"
    assert kind({"method": "speculative", "lossless": "not checked", "mismatches": 0}) == "unchecked"


@needs_chromium
def test_page_in_chromium(tmp_path):
    page = write_page(tmp_path)
    for width in (1280, 1440):
        result = check_page(page, width)
        assert result.problems == [], result.problems
        assert result.width == width and result.scroll_width <= width
    # overview: speedup, tokens vs speedup; speculative: histogram, positions, time, per sample;
    # medusa (no draft positions recorded): histogram, time, per sample
    assert len(result.plots) == 9 and all(p["height"] >= 250 for p in result.plots)
    png = screenshot(page, tmp_path / "shot.png", 1280)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@needs_chromium
def test_check_fails_on_a_broken_page(tmp_path):
    """The executed control: overflow, an undrawn plot and a console error are each reported."""
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><html><head></head><body><div style="width:3000px">wide</div>'
                    '<div class="plotly-graph-div" id="empty"></div><script>console.error("boom")</script></body></html>')  # fmt: skip
    problems = check_page(page, 1280).problems
    assert any(p.startswith("horizontal overflow: the page is 30") for p in problems)
    assert any("plot empty is not drawn" in p for p in problems)
    assert "console.error: boom" in problems


def test_tokens_per_step_plot_leaves_out_methods_lossy_by_design():
    from harness.page import Figures, accepted_figure

    rows = [{"method": "speculative", "lossless": "checked", "mismatches": 0, "accepted_pooled": 1.6, "speedup": 1.1},
            {"method": "llm-to-slm", "lossless": "lossy mode", "mismatches": 0, "accepted_pooled": 66.0, "speedup": 3.3}]
    html = accepted_figure(Figures(), rows)
    assert '"name":"speculative"' in html and '"name":"llm-to-slm"' not in html
