"""``semlens serve`` in a real headless Chromium (Debian's, driven by Playwright): type a query, get
results, open a neuron, search by an uploaded image, run an audit, use the concept map; every
image decodes, screenshots are drawn, and the browser reports no console error, script error or
failed request. The server is the real command (``python -m semlens_fast.cli serve --port 0``),
started and stopped by the test.

Skipped when Chromium or Playwright is missing, unless SEMLENS_REQUIRE_BROWSER=1 (CI): then it fails.
Playwright's own browser download is never used (``executable_path`` is the system Chromium).
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.serve_helpers import digits_run, tree_state

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
START_TIMEOUT_S = 300  # the server loads the models first; the machine may be busy
TIMEOUT_MS = 120_000


def _need(msg: str) -> None:
    if os.environ.get("SEMLENS_REQUIRE_BROWSER") == "1":
        pytest.fail(msg + " (required because SEMLENS_REQUIRE_BROWSER=1)")
    pytest.skip(msg)


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        _need("Chromium is not installed; run `apt-get install chromium` (Debian) to run the browser test")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        _need("Playwright is not installed; `pip install playwright` (never `playwright install`: the system "
              "Chromium is used)")
    return exe


class Server:
    """``semlens serve`` as a child process in its own session; the URL is read from its first line."""

    def __init__(self, run: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "semlens_fast.cli", "serve", "--run", str(run), "--port", "0",
                                      "--no-progress"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env=env, start_new_session=True)
        self.err: list[str] = []
        threading.Thread(target=lambda: self.err.extend(self.proc.stderr), daemon=True).start()
        self.url = None
        lines: list[str] = []
        timer = threading.Timer(START_TIMEOUT_S, self.kill)
        timer.start()
        try:
            for line in self.proc.stdout:
                lines.append(line)
                m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
                if m:
                    self.url = m.group(0).rstrip("/")
                    break
        finally:
            timer.cancel()
        if self.url is None:
            self.kill()
            pytest.fail(f"semlens serve did not start (exit {self.proc.poll()}); stdout {lines[-5:]}; "
                        f"stderr tail:\n{''.join(self.err)[-3000:]}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)

    def stop(self) -> int:
        """Ctrl-C, as a user would; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.kill()
            self.proc.wait()
            pytest.fail("semlens serve did not stop within 60 s of SIGINT")


class Watch:
    """Console errors, uncaught script errors and failed or refused requests of a page."""

    def __init__(self, page):
        self.problems: list[str] = []
        page.on("console", lambda m: self.problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(f"script error: {e}"))
        page.on("requestfailed", lambda r: self.problems.append(f"request failed: {r.url} {r.failure}"))
        page.on("response", lambda r: self.problems.append(f"HTTP {r.status}: {r.url}") if r.status >= 400 else None)
        page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    exe = chromium()
    from playwright.sync_api import sync_playwright

    run = digits_run(tmp_path_factory)
    before = tree_state(run)
    root = tmp_path_factory.mktemp("serve-browser")
    server = Server(run)
    pw = sync_playwright().start()
    ctx = None
    try:
        ctx = pw.chromium.launch_persistent_context(
            str(root / "profile"), executable_path=exe, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1280, "height": 1000}, env={**os.environ, "HOME": str(root)})
        ctx.set_default_timeout(TIMEOUT_MS)
        page = ctx.pages[0] if ctx.pages else ctx.new_page()
        watch = Watch(page)
        yield {"page": page, "url": server.url, "watch": watch, "root": root, "run": run}
    finally:
        if ctx is not None:
            ctx.close()
        pw.stop()
        code = server.stop()
    assert code == 0, f"semlens serve exited with {code}; stderr tail:\n{''.join(server.err)[-3000:]}"
    assert tree_state(run) == before, "the read-only server changed the run folder"
    assert not watch.problems, watch.problems


def images_ok(page, timeout_s: float = 120) -> tuple[int, int]:
    """(images on the page, images that decoded), once every image has finished loading.

    Scrolls through the page first (thumbnails load lazily, when near the viewport). Polled with
    page.evaluate: wait_for_function evaluates its predicate with eval(), which the pages'
    Content-Security-Policy (rightly) forbids.
    """
    height = page.evaluate("document.documentElement.scrollHeight")
    for y in range(0, height + 1000, 1000):
        page.evaluate(f"window.scrollTo(0, {y})")
        time.sleep(0.05)
    page.evaluate("window.scrollTo(0, 0)")
    imgs = "Array.from(document.images)"
    t0 = time.monotonic()
    while not page.evaluate(f"{imgs}.every(i => i.complete)"):
        if time.monotonic() - t0 > timeout_s:
            n = page.evaluate(f"{imgs}.filter(i => !i.complete).length")
            pytest.fail(f"{n} images still loading after {timeout_s} s")
        time.sleep(0.1)
    return tuple(page.evaluate(f"[{imgs}.length, {imgs}.filter(i => i.naturalWidth > 0).length]"))


def shot(page, path: Path) -> int:
    """Take a screenshot; return its number of distinct colours (a blank page gives 1 or 2)."""
    page.screenshot(path=str(path))
    with Image.open(path) as im:
        assert im.size == (1280, 1000)
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    return len(colours or [])


def test_type_a_query_get_results_open_a_neuron(session):
    page, url, root = session["page"], session["url"], session["root"]
    page.goto(url + "/search")
    page.fill("#search-text input[name=q]", "a white square stamp")
    page.fill("#search-text input[name=k]", "6")
    page.click("#search-text button[type=submit]")
    page.wait_for_selector(".card.result")
    assert page.locator(".card.result").count() == 6
    assert page.locator("section.results h2").inner_text() == "“a white square stamp”"
    scores = [float(s) for s in page.locator(".card.result .score").all_inner_texts()]
    assert scores == sorted(scores, reverse=True)
    n, ok = images_ok(page)
    assert n >= 6 and ok == n, f"{n - ok} of {n} result images did not decode"
    assert shot(page, root / "search.png") > 50
    first = page.locator(".card.result .neuron-link").first
    name = first.inner_text()
    first.click()
    page.wait_for_url(re.compile(r".*/neuron/[^/]+/\d+$"))
    assert page.locator("h1").inner_text().startswith(name)
    assert page.locator("table.nearest tbody tr").count() == 10
    assert page.locator("table.scores").inner_text().count("clarity") == 1
    n, ok = images_ok(page)
    assert n >= 2 and ok == n
    assert shot(page, root / "neuron.png") > 50
    page.locator("table.nearest tbody a").first.click()  # and on to a neighbour
    page.wait_for_selector("table.nearest")
    assert page.locator("h1").inner_text() != name


def test_search_by_uploaded_image(session):
    page, url, root = session["page"], session["url"], session["root"]
    img = Image.new("L", (28, 28), 0)
    img.paste(255, (1, 1, 6, 6))
    p = root / "stamp.png"
    img.save(p)
    page.goto(url + "/search")
    page.set_input_files("#search-image input[name=image]", str(p))
    page.fill("#search-image input[name=k]", "4")
    page.click("#search-image button[type=submit]")
    page.wait_for_selector("section.results[data-kind=image]")
    assert page.locator(".card.result").count() == 4
    assert "stamp.png" in page.locator("section.results h2").inner_text()
    n, ok = images_ok(page)
    assert ok == n > 0


def test_run_an_audit(session):
    page, url, root = session["page"], session["url"], session["root"]
    page.goto(url + "/audit")
    assert page.locator("#audit-result h2").first.inner_text().startswith("Last stored audit")
    # a calibrated audit from the form with image probes (the stamped class against the others); a text
    # probe needs a trained CLIP to flag anything, which this machine does not have
    page.fill("textarea[name=valid]", "\n".join(f"class:{i}" for i in range(10) if i != 6))
    page.fill("textarea[name=spurious]", "class:6")
    page.select_option("select[name=target]", "6")
    with page.expect_navigation():
        page.click("#audit-form button[type=submit]")
    assert page.locator("#audit-result h2").first.inner_text() == "Result"
    summary = page.locator("table.summary").inner_text()
    assert "relevance_share" in summary and "class:6" in summary
    assert page.locator("#audit-result table.records.all tbody tr").count() == 80  # every component, ranked
    rows = page.locator("#audit-result table.flagged tbody tr")
    assert rows.count() > 0
    assert rows.first.locator("img").count() > 0  # the training samples behind the flag
    n, ok = images_ok(page)
    assert ok == n > 0
    assert shot(page, root / "audit.png") > 50
    rows.first.locator("a").first.click()  # the flagged component's page
    page.wait_for_url(re.compile(r".*/neuron/[^/]+/\d+$"))


def test_concept_map_describe_compare_and_the_report(session):
    page, url, root = session["page"], session["url"], session["root"]
    page.goto(url + "/map")
    assert page.locator("svg.concept-map circle.point").count() == 80
    assert shot(page, root / "map.png") > 50
    page.locator("svg.concept-map a").last.click()  # drawn last: on top of any point it overlaps
    page.wait_for_url(re.compile(r".*/neuron/[^/]+/\d+$"))
    page.goto(url + "/describe")
    page.select_option("select[name=layer]", "conv2")
    page.select_option("select[name=target]", "6")
    page.click("form.inline button[type=submit]")
    page.wait_for_selector("table.top")
    assert page.locator("table.components tbody tr").count() == 32
    page.goto(url + "/compare")
    page.select_option("select[name=layers]", ["conv1"])
    page.select_option("select[name=other_layers]", ["conv3"])
    page.click("form.compare button[type=submit]")
    page.wait_for_selector("table.coverage")
    assert page.locator("table.a-match tbody tr").count() == 16
    page.goto(url + "/report/")
    page.wait_for_selector("svg.concept-map")
    n, ok = images_ok(page)
    assert ok == n > 0


def test_a_hostile_query_is_shown_not_run(session):
    page, url = session["page"], session["url"]
    evil = '<img src=x onerror="window.__pwned=1"><script>window.__pwned=2</script>'
    page.goto(url + "/search")
    page.fill("#search-text input[name=q]", evil)
    page.click("#search-text button[type=submit]")
    page.wait_for_selector("section.results")
    assert page.locator("section.results h2").inner_text() == f"“{evil}”"
    assert page.evaluate("window.__pwned === undefined")
    assert page.locator("main img[src=x]").count() == 0
