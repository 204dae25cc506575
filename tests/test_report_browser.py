"""The written report opened in a real headless Chromium: no script errors, every image decodes, it draws.

Skipped when Chromium is not installed, unless SEMLENS_REQUIRE_BROWSER=1 (then it fails).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from semlens_fast.report import write_report
from tests.test_report import N_POINTS, Page, make_data

WINDOW = (1280, 2000)
TIMEOUT_S = 60


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        msg = "Chromium is not installed; run `apt-get install chromium` (Debian) to run the browser test"
        if os.environ.get("SEMLENS_REQUIRE_BROWSER") == "1":
            pytest.fail(msg + " (required because SEMLENS_REQUIRE_BROWSER=1)")
        pytest.skip(msg)
    return exe


def run_chromium(exe: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless Chromium with a fresh profile; kill its whole process group on timeout."""
    cmd = [
        exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-extensions", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--virtual-time-budget=5000", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args,
    ]
    env = {**os.environ, "HOME": str(profile)}  # keep ~/.config, caches, crash dumps out of the real home
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"chromium did not finish within {TIMEOUT_S} s; stderr tail:\n{err[-2000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    exe = chromium()
    root = tmp_path_factory.mktemp("browser")
    index = write_report(root / "report", make_data())
    return exe, root, index


def test_dom_has_no_errors_and_all_images_load(report):
    exe, root, index = report
    res = run_chromium(exe, root / "profile-dom", "--dump-dom", index.as_uri())
    assert res.returncode == 0, f"chromium failed ({res.returncode}); stderr tail:\n{res.stderr[-2000:]}"
    page = Page()
    page.feed(res.stdout)
    page.close()
    bodies = page.find("body")
    assert len(bodies) == 1, res.stdout[:2000]
    body = bodies[0]
    assert body.get("data-ready") == "1", f"the load handler did not run: {body}"
    assert body.get("data-errors") == "0", body.get("data-error-text")
    assert body.get("data-resource-errors") == "0", body.get("data-error-text")
    n_img = len(page.find("img"))
    assert n_img == 7
    assert int(body["data-images-total"]) == n_img
    assert int(body["data-images-loaded"]) == n_img
    # the expected structure, as the browser built it
    assert len(page.find("section", "layer")) == 2
    assert len(page.find("div", "card")) == 4
    assert len(page.find("img", "example")) == 6
    assert len(page.find("table", "audit")) == 1
    assert len(page.find("svg", "concept-map")) == 1
    assert len(page.find("circle", "point")) == N_POINTS
    assert "alert" not in "".join(page.scripts)


def test_screenshot_is_drawn(report):
    exe, root, index = report
    shot = root / "shot.png"
    res = run_chromium(exe, root / "profile-shot", f"--screenshot={shot}", index.as_uri())
    assert res.returncode == 0 and shot.is_file(), f"no screenshot ({res.returncode}); stderr tail:\n{res.stderr[-2000:]}"
    with Image.open(shot) as im:
        assert im.format == "PNG"
        assert im.size == WINDOW
        colours = im.convert("RGB").getcolors(maxcolors=1 << 24)
    # text, badges, the map's palette and the noise thumbnails give thousands; a blank page gives 1
    assert colours is not None and len(colours) > 50, f"screenshot looks blank: {len(colours or [])} colours"
