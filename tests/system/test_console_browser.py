"""The web console (/console) and the API docs (/docs) in a real headless browser (Debian's chromium driven
by Selenium), against a real server with API keys: the page asks for the key, an upload through the page
(file chooser, and a drop) appears in the list, a generation streams into the page (one pane and two side
by side), inspect / make-from-text / delete work, and no request the browser makes leaves loopback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from urllib.parse import urlparse

import httpx
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.wait import WebDriverWait

from tests.paths import REPO_ROOT
from tests.server_process import ServerProcess

pytestmark = [pytest.mark.external, pytest.mark.slow]  # Chromium, a server process

KEY = "console-test-key-0123456789"
PROMPT = "Tell me about the sea"


def executable(*names: str) -> str:
    """Missing = failure, not a skip: scripts/setup-dev.sh installs them (apt-get install chromium chromium-driver)."""
    for name in names:
        if found := shutil.which(name):
            return found
    pytest.fail(
        f"none of {names} is installed: scripts/setup-dev.sh installs them (apt-get install chromium chromium-driver)"
    )


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("console")
    keys = tmp / "keys.json"
    keys.write_text(json.dumps({"keys": [{"key": KEY, "tenant": "acme"}]}))
    proc = ServerProcess(
        ["--model", "tiny", "--api-keys-file", str(keys), "--adapter-dir", str(tmp / "store")],
        tmp / "server.log",
    )
    try:
        yield proc.wait_healthy()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = executable("chromium", "chromium-browser")
    for arg in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable("chromedriver")))
    driver.set_page_load_timeout(20)
    try:
        yield driver
    finally:
        driver.quit()


def wait(driver: WebDriver, condition, timeout: float = 20.0):
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(lambda d: condition(d))


def css(driver: WebDriver, selector: str):
    return driver.find_element(By.CSS_SELECTOR, selector)


def table_ids(driver: WebDriver) -> list[str]:
    # In the page, in one go: the table is rebuilt whenever the list is refreshed.
    return driver.execute_script(
        "return [...document.querySelectorAll('#adapter-table tbody tr[data-id]')].map((row) => row.dataset.id)"
    )


def server_text(server: ServerProcess, adapter: str | None, max_new_tokens: int) -> str:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter, "max_new_tokens": max_new_tokens}}
    reply = httpx.post(
        f"{server.url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    )
    return reply.json()["generated_text"]


def count_output_changes(driver: WebDriver, pane: str) -> None:
    """Count every change the page makes to a pane's output: streaming shows up as many of them."""
    driver.execute_script(
        """const out = document.querySelector(arguments[0] + ' .output');
        window.outputChanges = 0;
        new MutationObserver((m) => { window.outputChanges += m.length; })
          .observe(out, {childList: true, characterData: true, subtree: true});""",
        f"#{pane}",
    )


def requested_urls(driver: WebDriver) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def test_console_in_a_browser(server, browser, tmp_path):
    driver = browser
    driver.get(f"{server.url}/")  # the root sends a browser to the console
    wait(driver, lambda d: d.current_url == f"{server.url}/console/")
    wait(driver, lambda d: css(d, "#key-box").is_displayed())
    assert "API keys" in css(driver, "#status").text
    assert "model tiny" in css(driver, "#model-info").text

    css(driver, "#api-key").send_keys(KEY + "\n")
    wait(driver, lambda d: css(d, "#status").text == "key accepted")
    assert table_ids(driver) == []

    # Upload through the file chooser: both PEFT files.
    pirate = REPO_ROOT / "adapters" / "pirate"
    css(driver, "#upload-id").send_keys("pirate")
    css(driver, "#upload-files").send_keys(
        f"{pirate / 'adapter_config.json'}\n{pirate / 'adapter_model.safetensors'}"
    )
    css(driver, "#upload").click()
    wait(driver, lambda d: table_ids(d) == ["pirate"])
    assert css(driver, "#status").text.startswith("stored pirate: 20 virtual tokens (prefix-tuning)")
    assert "prefix-tuning" in css(driver, "#adapter-table tbody tr[data-id='pirate']").text

    # Upload by dropping the files on the drop zone (a drop event carrying them); the id is typed.
    support = REPO_ROOT / "adapters" / "support"
    css(driver, "#upload-files").send_keys(
        f"{support / 'adapter_config.json'}\n{support / 'adapter_model.safetensors'}"
    )
    driver.execute_script(
        """const input = document.querySelector('#upload-files');
        const dt = new DataTransfer();
        for (const f of input.files) dt.items.add(f);
        input.value = '';
        document.querySelector('#drop-zone').dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true}));"""
    )
    wait(driver, lambda d: "adapter_model.safetensors" in css(d, "#dropped").text)
    css(driver, "#upload-id").send_keys("support")
    css(driver, "#upload").click()
    wait(driver, lambda d: table_ids(d) == ["pirate", "support"])

    # One pane, streamed.
    Select(css(driver, "#pane-a select")).select_by_value("pirate")
    css(driver, "#max-new-tokens").clear()
    css(driver, "#max-new-tokens").send_keys("24")
    count_output_changes(driver, "pane-a")
    css(driver, "#run").click()
    wait(driver, lambda d: css(d, "#pane-a").get_attribute("data-finish") is not None)
    expected = server_text(server, "pirate", 24)
    assert expected.startswith(" Arr, matey!")
    assert css(driver, "#pane-a .output").get_attribute("textContent") == expected
    tokens = int(css(driver, "#pane-a").get_attribute("data-tokens"))
    assert tokens > 1 and f"{tokens} tokens" in css(driver, "#pane-a .meta").text
    assert driver.execute_script("return window.outputChanges") > 2  # token by token, not all at once

    # Two panes side by side on the same prompt: support and the base model.
    css(driver, "#compare").click()
    Select(css(driver, "#pane-a select")).select_by_value("support")
    Select(css(driver, "#pane-b select")).select_by_value("")
    css(driver, "#run").click()
    wait(driver, lambda d: all(css(d, f"#{p}").get_attribute("data-finish") for p in ("pane-a", "pane-b")))
    assert css(driver, "#pane-a .output").get_attribute("textContent") == server_text(server, "support", 24)
    assert css(driver, "#pane-b .output").get_attribute("textContent") == server_text(server, None, 24)

    # Inspect, make one from a text, delete it (two clicks).
    css(driver, "#adapter-table tr[data-id='pirate'] button").click()
    wait(driver, lambda d: '"num_virtual_tokens": 20' in css(d, "#inspect").text)
    css(driver, "#text-id").send_keys("persona")
    css(driver, "#text-body").send_keys("You are a pirate. Answer every question like a pirate would.")
    css(driver, "#make").click()
    wait(driver, lambda d: table_ids(d) == ["persona", "pirate", "support"])
    delete = "#adapter-table tr[data-id='persona'] button:nth-of-type(2)"
    css(driver, delete).click()
    assert table_ids(driver) == ["persona", "pirate", "support"]  # the first click only asks
    css(driver, delete).click()
    wait(driver, lambda d: table_ids(d) == ["pirate", "support"])
    assert (
        httpx.get(f"{server.url}/v1/adapters/persona", headers={"Authorization": f"Bearer {KEY}"}).status_code
        == 404
    )

    # A bad id is the server's message in the status line.
    css(driver, "#text-id").send_keys("bad id")
    css(driver, "#make").click()
    wait(driver, lambda d: "invalid adapter id 'bad id'" in css(d, "#status").text)

    # The API docs render offline: Swagger UI's assets come from the package.
    driver.get(f"{server.url}/docs")
    wait(driver, lambda d: "prefixserve" in css(d, ".swagger-ui .info .title").text)

    urls = requested_urls(driver)
    assert any(u.endswith("/generate_stream") for u in urls) and any(
        "swagger-ui-bundle.js" in u for u in urls
    )
    off_host = [
        u for u in urls if urlparse(u).scheme not in ("data", "blob") and urlparse(u).hostname != "127.0.0.1"
    ]
    assert off_host == [], "requests that left loopback"
    errors = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    # The only errors the page may log are the API's own refusals: the key asked for, the bad id.
    assert all(" 401 " in e or " 422 " in e for e in errors), errors
