"""The playground page in a real browser: headless Chromium (Debian's `chromium` and `chromium-driver`,
driven by Selenium) against `editlab serve`'s app on a free local port with a tiny model. Type a fact,
apply it, see the new top token; undo, see the old one. Skipped, saying what is missing, where Chromium
or its driver is not installed (`.ci/run` installs both)."""

from __future__ import annotations

import shutil
import socket
import threading
import time

import pytest

from editlab.methods import restore_all
from editlab.methods.catalogue import METHODS
from editlab.models import load_lm
from editlab.serve import Playground, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER), reason="headless browser test needs Chromium and its driver: "
                                "apt-get install chromium chromium-driver")


@pytest.fixture
def server():
    import uvicorn

    lm = load_lm("tiny-trained-llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(Playground(lm)), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    yield f"http://127.0.0.1:{port}/", lm
    srv.should_exit = True
    thread.join(10)
    restore_all(lm)


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    yield driver
    driver.quit()


def test_apply_then_undo_in_the_page(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    url, lm = server
    fingerprint = lm.fingerprint()
    wait = WebDriverWait(browser, 300)
    browser.get(url)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#hparams input[name='layer']"))
    assert Select(browser.find_element(By.ID, "method")).first_selected_option.get_attribute("value") == "rome"

    def fill(element, value: str) -> None:
        element.clear()
        element.send_keys(value)

    for field, value in (("prompt", "The capital of France is"), ("subject", "France"), ("target", "Rome"),
                         ("target-true", "Paris")):
        fill(browser.find_element(By.ID, field), value)
    browser.find_element(By.CSS_SELECTOR, "#hparams-box summary").click()  # the tiny model's quick settings
    for name, value in METHODS.entry("rome").meta["tiny_hparams"].items():
        fill(browser.find_element(By.CSS_SELECTOR, f"#hparams input[name='{name}']"), str(value).replace("'", '"'))
    fill(browser.find_element(By.ID, "neighbours"), "The capital of Germany is")

    def top(table: str) -> str:
        cells = browser.find_elements(By.CSS_SELECTOR, f"#{table} tr:first-child td")
        return cells[0].text.strip() if cells else ""

    def idle(d) -> bool:
        return not d.find_element(By.ID, "apply").get_attribute("disabled")

    browser.find_element(By.ID, "apply").click()
    wait.until(lambda d: idle(d) and (top("after-top") or d.find_element(By.ID, "error").text))
    assert browser.find_element(By.ID, "error").text == ""
    assert top("after-top") == "Rome", top("after-top")
    old = top("before-top")
    assert old and old != "Rome"
    assert "rome: The capital of France is → Rome" in browser.find_element(By.ID, "stack").text
    kinds = [r.find_element(By.TAG_NAME, "td").text for r in browser.find_elements(By.CSS_SELECTOR, "#probes tbody tr")]
    assert kinds == ["prompt", "paraphrase", "neighbour", "free"]  # the page's default paraphrase and free prompt stay
    browser.save_screenshot(str(tmp_path / "after-edit.png"))

    browser.find_element(By.ID, "undo").click()
    wait.until(lambda d: idle(d) and "no edits" in d.find_element(By.ID, "stack").text)
    wait.until(lambda d: top("after-top") == old)
    browser.save_screenshot(str(tmp_path / "after-undo.png"))
    assert (tmp_path / "after-undo.png").stat().st_size > 10_000
    assert lm.fingerprint() == fingerprint and not lm.active_edits

    # a mistake is shown in the page and changes nothing
    fill(browser.find_element(By.ID, "subject"), "Germany")
    browser.find_element(By.ID, "apply").click()
    wait.until(lambda d: idle(d) and d.find_element(By.ID, "error").text)
    assert "does not occur in prompt" in browser.find_element(By.ID, "error").text
    assert not lm.active_edits


def test_the_api_page_renders_from_this_machine(server, browser, tmp_path):
    """/docs draws every endpoint with Swagger UI's files served by the playground itself (no CDN):
    the headless browser is kept from loading anything from elsewhere."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, _ = server
    browser.execute_cdp_cmd("Network.enable", {})
    # the server is plain http on 127.0.0.1; every CDN is https (FastAPI's default page fails this test)
    browser.execute_cdp_cmd("Network.setBlockedURLs", {"urls": ["https://*"]})
    browser.get(url + "docs")
    WebDriverWait(browser, 60).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 8)
    paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/api/edit", "/api/probe", "/api/undo"} <= paths
    browser.save_screenshot(str(tmp_path / "docs.png"))
