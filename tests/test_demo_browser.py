"""`mister-e demo` in a real browser: the command serves a small trained model on localhost, headless Chromium
(Debian's `chromium` and `chromium-driver`, which `.ci/run` installs) enters a 3-turn conversation with one audio
turn, a bad input, and a good one again. The result page's screenshot is kept as `test-artifacts/demo-result.png`.

Skips, with the reason, only where Chromium or its driver is not installed.
"""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile
from helpers import EMOTIONS, REPO_ROOT


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="headless Chromium is not installed (Debian: apt-get install chromium chromium-driver; .ci/run does it)")
ARTIFACTS = Path(os.environ.get("MISTER_E_TEST_ARTIFACTS", REPO_ROOT / "test-artifacts"))
MISTER_E = str(Path(sys.executable).parent / "mister-e")
TIMEOUT = 120


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model_folder: Path, tmp_path: Path):
    """The URL of `mister-e demo` serving `model_folder`; stopped afterwards, and its log must hold no traceback
    (errors go to the page, never crash the server)."""
    port = free_port()
    log_path = tmp_path / f"demo-{port}.log"
    log = open(log_path, "w")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([MISTER_E, "demo", "--model", str(model_folder), "--port", str(port)],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + TIMEOUT
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"mister-e demo exited with {process.returncode}: {log_path.read_text()}")
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"mister-e demo did not serve within {TIMEOUT} s: {log_path.read_text()}")
                time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
    assert "Traceback" not in log_path.read_text()


@pytest.fixture
def server(trained_run, tmp_path):
    """`mister-e demo` serving the tiny model `run_erc.py` trained (conftest's `trained_run`)."""
    with serving(trained_run[0], tmp_path) as url:
        yield url


@pytest.fixture
def browser(tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                     "--window-size=1400,1900", f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # never a downloaded driver
    yield driver
    driver.quit()


def test_the_demo_page_recognises_a_conversation_and_reports_bad_input(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as expected
    from selenium.webdriver.support.ui import WebDriverWait

    wait = WebDriverWait(browser, TIMEOUT)
    good, bad = tmp_path / "turn.wav", tmp_path / "notes.wav"
    t = np.arange(8000) / 16000
    soundfile.write(good, (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 16000)
    bad.write_text("these are notes, not audio")

    browser.get(server)
    for turn, text in enumerate(["oh great today", "oh terrible today", "oh fine today"]):
        box = wait.until(expected.element_to_be_clickable((By.CSS_SELECTOR, f"#turn-{turn}-text textarea")))
        box.send_keys(text)

    def upload(path):
        audio = browser.find_element(By.ID, "turn-1-audio")
        audio.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(path))
        wait.until(lambda _: audio.find_elements(By.CSS_SELECTOR, "a[data-testid=download-link]"))  # uploaded

    def error_text() -> str:
        lines = browser.find_elements(By.CSS_SELECTOR, "#error-box .error-line")
        return lines[0].text.strip() if lines and lines[0].is_displayed() else ""

    def predictions():
        return browser.find_elements(By.CSS_SELECTOR, "#predictions tr.prediction")

    # a bad input: one line in the page, the CLI's words, no prediction
    upload(bad)
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda _: error_text())
    message = error_text()
    assert message.startswith("mister-e: error: typed conversation (conversation 'typed', utterance 1): "), message
    assert "\n" not in message and "Traceback" not in message
    assert not predictions()

    # the app keeps serving: the same conversation with real audio on turn 1
    browser.find_element(By.CSS_SELECTOR, "#turn-1-audio button[aria-label=Clear]").click()
    upload(good)
    browser.find_element(By.ID, "submit").click()
    wait.until(lambda _: len(predictions()) == 3)
    assert error_text() == ""
    rows = predictions()
    assert {row.get_attribute("data-label") for row in rows} <= set(EMOTIONS)
    cells = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]
    assert [c[0] for c in cells] == ["0", "1", "2"] and cells[1][1] == "oh terrible today"
    assert [c[2] for c in cells] == ["no audio", "yes", "no audio"]
    assert "speech 0.00 (no audio)" in cells[0][5] and "(no audio)" not in cells[1][5]
    chart = wait.until(lambda _: browser.find_elements(By.CSS_SELECTOR, "#gate-chart img"))
    assert chart[0].size["width"] > 200 and chart[0].size["height"] > 200

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.execute_script("arguments[0].scrollIntoView()", browser.find_element(By.ID, "submit"))
    assert browser.save_screenshot(str(ARTIFACTS / "demo-result.png"))


def test_the_live_tab_adds_turns_one_at_a_time(build, tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as expected
    from selenium.webdriver.support.ui import WebDriverWait

    model, processor = build("wav2vec2", "bert", id2label=dict(enumerate(EMOTIONS)), num_labels=3,
                             context_bidirectional=False)
    model.save_pretrained(tmp_path / "causal")
    processor.save_pretrained(tmp_path / "causal")
    wait = WebDriverWait(browser, TIMEOUT)
    with serving(tmp_path / "causal", tmp_path) as url:
        browser.get(url)
        wait.until(lambda _: [t for t in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]")
                              if t.text.strip() == "Live"])[0].click()
        shown = []
        for turn, text in enumerate(["hello there", "oh no really", "sorry about this"]):
            box = wait.until(expected.element_to_be_clickable((By.CSS_SELECTOR, "#live-text textarea")))
            box.send_keys(text)
            browser.find_element(By.ID, "live-push").click()
            wait.until(lambda _: len(browser.find_elements(By.CSS_SELECTOR, "#live-predictions tr.prediction"))
                       == turn + 1)
            rows = browser.find_elements(By.CSS_SELECTOR, "#live-predictions tr.prediction")
            cells = [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]
            assert [c[:-1] for c in cells[:-1]] == shown  # earlier turns as they were (but for their latency)
            assert cells[-1][1] == text and cells[-1][-1].endswith(" ms") and rows[-1].get_attribute(
                "data-label") in EMOTIONS
            shown = [c[:-1] for c in cells]
