"""Makes README's screenshot of `mister-e demo` (docs/images/demo.png) in headless Chromium.

    python docs/screenshot_demo.py --model runs/emodb-fold0 --conversation conversation.json -o docs/images/demo.png

`conversation.json`: a list of turns `{"text": ..., "audio": path}` (either may be left out), typed and uploaded
into the page's turn rows as a user would. Needs Debian's `chromium` and `chromium-driver` and `pip install
selenium`; the screenshot in README was made this way on an EmoDB model (the README caption says which).
"""

import argparse
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--conversation", required=True, type=Path)
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/images/demo.png"))
    parser.add_argument("--width", type=int, default=1300)
    args = parser.parse_args()
    turns = json.loads(args.conversation.read_text())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "mister-e"), "demo", "--model", args.model,
                               "--port", str(port)])
    profile = tempfile.mkdtemp(prefix="chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                     f"--window-size={args.width},2400", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    driver = None
    try:
        url = f"http://127.0.0.1:{port}/"
        for _ in range(240):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        wait = WebDriverWait(driver, 120)
        driver.get(url)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#turn-0-text textarea"))
        for turn, utterance in enumerate(turns):
            if turn >= 3:
                driver.find_element(By.ID, "add-turn").click()
            box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, f"#turn-{turn}-text textarea"))
            if utterance.get("text"):
                box.send_keys(utterance["text"])
            if utterance.get("audio"):
                audio = driver.find_element(By.ID, f"turn-{turn}-audio")
                audio.find_element(By.CSS_SELECTOR, "input[type=file]").send_keys(str(Path(utterance["audio"]).resolve()))
                wait.until(lambda _: audio.find_elements(By.CSS_SELECTOR, "a[data-testid=download-link]"))
        driver.find_element(By.ID, "submit").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#predictions tr.prediction")) == len(turns))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#gate-chart img"))
        time.sleep(1)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(args.width, height + 40)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(args.output))
        print(f"wrote {args.output}")
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=20)


if __name__ == "__main__":
    main()
