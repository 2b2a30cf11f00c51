"""The dashboard (`GET /ui/`) in a real browser: headless Chromium driven by Selenium.

A live server with API keys; a session trained in a background thread (a step with its
loss every ~50 ms). The browser opens `/` (redirected to `/ui/`), is asked for the API
key (its listing of the tenant's sessions, `GET /v1/sessions`, was answered 401) and
gets it; the session then appears in the table without its id being typed anywhere; the
browser clicks it, and the three
uPlot charts (lr, loss, gradient norm per step) fill from `.../history`; a few seconds
later they hold more points (the page refreshes itself). The schedule image loads too.
A screenshot is saved in the test's tmp dir (its path is printed).

Chromium and its driver are the Debian packages (`chromium`, `chromium-driver`;
scripts/test installs them when missing); Selenium uses /usr/bin/chromedriver, so
nothing is downloaded at test time. Without them the test is skipped, saying so.
"""

from __future__ import annotations

import json
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.e2e.support import LiveServer, start_server
from tests.e2e.training_support import create_session, push

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
API_KEY = "dashboard-test-key"
STEP_EVERY = 0.05
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed")
from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

if not Path(CHROMIUM).exists() or not Path(CHROMEDRIVER).exists():
    pytest.skip(
        f"headless Chromium is not installed ({CHROMIUM}, {CHROMEDRIVER}): "
        "apt-get install -y chromium chromium-driver (scripts/test does it)",
        allow_module_level=True,
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    log_dir = tmp_path_factory.mktemp("dashboard-server")
    live = start_server(
        "dashboard", log_dir, env={"OPTSERVE_API_KEYS": json.dumps({API_KEY: "ui"})}
    )
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture
def browser() -> Iterator[Any]:
    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


class Trainer(threading.Thread):
    """Steps the session (with a loss) every STEP_EVERY seconds until stopped."""

    def __init__(self, server: LiveServer, sid: str) -> None:
        super().__init__(daemon=True)
        self.server, self.sid = server, sid
        self.stop = threading.Event()
        self.steps = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        rng = np.random.default_rng(8)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        try:
            with self.server.client(headers=headers) as client:
                while not self.stop.is_set():
                    grad = rng.normal(size=(4, 3)).astype(np.float32)
                    loss = 2.0 * 0.98**self.steps + 0.05 * rng.random()
                    r = push(client, self.sid, {"w": grad}, loss=loss, ret="none")
                    assert r.status_code == 200, r.text
                    self.steps += 1
                    self.stop.wait(STEP_EVERY)
        except BaseException as exc:
            self.error = exc


def chart_points(driver: Any) -> dict[str, int]:
    """The number of x values each uPlot chart of the page holds (0 before it exists)."""
    points: dict[str, int] = driver.execute_script(
        "const c = window.optserveCharts || {};"
        "const n = (u) => (u && u.data && u.data[0]) ? u.data[0].length : 0;"
        "return {lr: n(c.lr), loss: n(c.loss), grad: n(c.grad)};"
    )
    return points


def test_dashboard_renders_and_updates_live(
    server: LiveServer, browser: Any, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with server.client(headers=headers) as client:
        doc = create_session(
            client,
            {"w": np.zeros((4, 3), np.float32)},
            optimizer={"name": "adam", "lr": 0.01},
            schedule={
                "name": "cosine",
                "T_max": 2000,
                "eta_min": 1e-4,
                "warmup": {"steps": 20, "start_factor": 0.1},
            },
        )
    sid = doc["id"]
    trainer = Trainer(server, sid)
    trainer.start()
    try:
        wait = WebDriverWait(browser, 20, poll_frequency=0.1)
        browser.get(server.base_url + "/")
        assert browser.current_url.endswith("/ui/"), browser.current_url
        # the page lists the tenant's sessions: without a key the API answers 401, the
        # page asks for one
        key_form = browser.find_element(By.ID, "key-form")
        wait.until(lambda d: key_form.is_displayed())
        browser.find_element(By.ID, "key-input").send_keys(API_KEY + "\n")
        wait.until(lambda d: not key_form.is_displayed())
        # the table lists the session (nobody added its id): choose it
        row = f"#sessions tbody tr[data-id='{sid}']"
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, row))
        wait.until(lambda d: "adam" in d.find_element(By.CSS_SELECTOR, row).text)
        assert not browser.find_elements(By.CSS_SELECTOR, f"{row} button")  # listed, not added
        browser.find_element(By.CSS_SELECTOR, row).click()
        assert browser.find_element(By.ID, "detail").is_displayed()

        wait.until(lambda d: min(chart_points(d).values()) >= 5)
        first = chart_points(browser)
        canvases = browser.find_elements(By.CSS_SELECTOR, "#detail .chart canvas")
        assert len(canvases) == 3
        assert all(c.size["width"] >= 300 and c.size["height"] > 100 for c in canvases)
        wait.until(
            lambda d: d.execute_script(
                "const i = document.getElementById('schedule-img');"
                "return i.complete && i.naturalWidth > 0;"
            )
        )
        time.sleep(2.5)
        # the page refreshed itself: more points, while the trainer kept stepping
        wait.until(lambda d: all(chart_points(d)[k] > first[k] for k in first))
        later = chart_points(browser)
        assert trainer.error is None, trainer.error
        assert trainer.steps >= later["lr"] - 1, (trainer.steps, later)
        # the table shows the current step too
        step_cell = browser.find_element(By.CSS_SELECTOR, f"{row} td:nth-child(3)").text
        assert int(step_cell) >= later["lr"] - 1

        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        print(f"\ndashboard screenshot: {shot} (points {first} -> {later})")
    finally:
        trainer.stop.set()
        trainer.join(timeout=10)
    png = shot.read_bytes()
    assert png[:8] == PNG_SIGNATURE
    width, height = struct.unpack(">II", png[16:24])
    assert width >= 800, (width, height)
    assert height >= 600, (width, height)
    assert len(png) > 20_000, len(png)  # a drawn page, not a blank one


def test_ui_routes(server: LiveServer) -> None:
    with server.client() as client:
        r = client.get("/", follow_redirects=False)
        assert r.status_code == 307
        assert r.headers["location"] == "/ui/"
        r = client.get("/ui/")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/html")
        assert "uPlot.iife.min.js" in r.text
        for name in ("app.js", "app.css", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
            assert client.get(f"/ui/static/{name}").status_code == 200, name
        assert client.get("/ui/static/../app.py").status_code == 404
        assert client.get("/ui/static/nothing.js").status_code == 404
