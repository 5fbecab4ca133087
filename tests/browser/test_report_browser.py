"""The report in a real browser: Debian's headless Chromium, driven by Playwright, opens the
page from a file with every network request refused, draws every chart without a console
error or a page error, keeps the charts' x axes together on zoom, shows a fault's details on
hover; screenshots go to tests/browser/artifacts/.

Skipped, with the reason, where Chromium or Playwright is missing; under CI (CI=true) that
fails the run instead."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from emulator import report
from tests.unit.test_report import LAB_ID, synthetic_history, synthetic_meta, synthetic_verdict

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
DIRECTED_LINKS = 8  # the synthetic lab's 4 links, both ways


def _missing(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"CI: the browser test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _chromium() -> str:
    for candidate in (os.environ.get("SMSLAB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    _missing("no Chromium (apt-get install -y chromium, or SMSLAB_CHROMIUM=/path/to/chromium)")
    raise AssertionError("unreachable")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A fresh headless Chromium (its own profile directory), one page context for the module."""
    executable = _chromium()
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        _missing("Playwright is not installed (pip install playwright; no `playwright install`: it uses"
                 " Debian's chromium)")
        raise
    with sync_playwright() as pw:
        try:
            context = pw.chromium.launch_persistent_context(
                str(tmp_path_factory.mktemp("chromium-profile")), executable_path=executable, headless=True,
                args=CHROMIUM_ARGS, viewport={"width": 1440, "height": 900}, device_scale_factor=1)
        except Error as exc:
            _missing(f"{executable} did not start under Playwright: {exc.message.splitlines()[0]}")
            raise
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def report_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("report") / "report.html"
    page = report.build_report(synthetic_history(), title=f"smslab report: {LAB_ID}",
                               verdict=synthetic_verdict(), meta=synthetic_meta())
    path.write_text(page, encoding="utf-8")
    return path


@pytest.fixture
def opened(browser: Any, report_file: Path) -> Iterator[tuple[Any, list[str], list[str]]]:
    """The report loaded and drawn: (page, problems seen in the console or thrown, requests refused)."""
    page, problems, refused = _open(browser, report_file)
    try:
        yield page, problems, refused
    finally:
        page.close()


def _open(browser: Any, report_file: Path) -> tuple[Any, list[str], list[str]]:
    page = browser.new_page()
    problems: list[str] = []
    refused: list[str] = []
    page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
            if msg.type in ("error", "warning") else None)
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))

    def route(r: Any) -> None:
        url = r.request.url
        if url.startswith(("file:", "data:", "blob:", "about:")):
            r.continue_()
        else:
            refused.append(url)
            r.abort()

    page.route("**/*", route)
    page.goto(report_file.as_uri(), wait_until="load")
    page.wait_for_function("document.body.dataset.rendered === 'done'", timeout=60_000)
    return page, problems, refused


def test_the_report_of_a_real_run_draws_offline(browser: Any, tmp_path: Path) -> None:
    """Not only the synthetic history: the report `smslab sim` writes for the shipped KB-failure
    scenario (every site's real runtime and store, in one process: no broker needed)."""
    run = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "emulator", "sim", str(REPO / "scenarios" / "kb-failure-sms20.yaml"),
                           "--out", str(run)], capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    page, problems, refused = _open(browser, run / "report.html")
    try:
        status = page.evaluate("window.smslabReport")
        assert status["errors"] == [] and status["rendered"] == status["total"] == 1 + DIRECTED_LINKS + 1
        assert problems == [] and refused == []
        assert page.locator(".badge.valid").count() == 1  # it recovered: the final verdict
        assert page.locator("#fig-timeline .barlayer .point").count() >= 3  # the recovery's phases
        assert "kb-failure-sms20" in page.title()
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "report-sim-kb-failure.png"), full_page=True)
    finally:
        page.close()


def test_the_report_draws_every_chart_offline(opened: tuple[Any, list[str], list[str]]) -> None:
    page, problems, refused = opened
    status = page.evaluate("window.smslabReport")
    assert status["errors"] == [] and status["rendered"] == status["total"] == 1 + DIRECTED_LINKS + 1
    assert problems == []
    assert refused == []  # nothing fetched: plotly.js and everything else is in the file
    assert page.locator(".js-plotly-plot").count() == 1 + DIRECTED_LINKS + 1
    assert page.locator("#fig-timeline .main-svg").count() >= 1
    assert page.locator(".links .card .main-svg").count() >= DIRECTED_LINKS
    # what was drawn: fault and recovery bars and event markers on the timeline, a line in every link chart
    assert page.locator("#fig-timeline .barlayer .point").count() >= 2 + 3
    assert page.locator("#fig-timeline .scatterlayer .point").count() >= 10
    lines = page.eval_on_selector_all(".links .js-plotly-plot .scatterlayer .js-line",
                                      "ps => ps.map(p => (p.getAttribute('d') || '').length)")
    assert len(lines) >= 2 * DIRECTED_LINKS and all(n > 20 for n in lines)
    assert page.locator("#fig-drops .barlayer .point").count() >= 3
    assert LAB_ID in page.title()
    assert page.locator(".badge.invalid").count() == 1
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "report.png"), full_page=True)
    page.locator("#timeline").screenshot(path=str(ARTIFACTS / "report-timeline.png"))
    page.locator("#links .card").first.screenshot(path=str(ARTIFACTS / "report-link.png"))


def test_zooming_one_chart_zooms_them_all(opened: tuple[Any, list[str], list[str]]) -> None:
    page, problems, _ = opened
    page.evaluate("Plotly.relayout('fig-timeline', {'xaxis.range': [10, 30]})")
    page.wait_for_function("document.getElementById('fig-link-0').layout.xaxis.range[0] === 10",
                           timeout=10_000)
    ranges = page.evaluate("Array.from(document.querySelectorAll('.links .js-plotly-plot'))"
                           ".map(d => d.layout.xaxis.range)")
    assert ranges == [[10, 30]] * DIRECTED_LINKS
    page.uncheck("#sync-x")
    page.evaluate("Plotly.relayout('fig-timeline', {'xaxis.range': [0, 5]})")
    page.wait_for_timeout(300)
    assert page.evaluate("document.getElementById('fig-link-0').layout.xaxis.range") == [10, 30]
    assert problems == []


def test_hovering_a_fault_shows_what_it_was(opened: tuple[Any, list[str], list[str]]) -> None:
    page, problems, _ = opened
    page.locator("#timeline").scroll_into_view_if_needed()
    bar = page.locator("#fig-timeline .barlayer .trace").first.locator(".point path").first
    box = bar.bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    page.wait_for_selector("#fig-timeline .hoverlayer .hovertext", timeout=5_000)
    text = page.locator("#fig-timeline .hoverlayer").text_content() or ""
    assert "fault f1" in text and "partition" in text
    assert problems == []
