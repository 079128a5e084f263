"""Fixtures for the browser tests: one headless Chromium per module, test pages served from
their own origin, and a ``page`` per test that fails the test on any browser console error.

``page`` depends on ``serve_process``, so it is torn down first: the console log is checked
and the tab navigated away while the test's servers still run (a client left reconnecting to
a stopped server would log errors into the next test).
"""

from __future__ import annotations

import functools
import re
import threading
from collections.abc import Callable, Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.browser.chrome import console_errors, new_driver
from tests.conftest import ProcessFactory
from tests.support import scaled

PAGES = Path(__file__).parent / "pages"


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pages_url() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` serving tests/browser/pages (an origin of its own)."""
    handler = functools.partial(_QuietHandler, directory=str(PAGES))
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.fixture(scope="module")
def driver() -> Iterator[Any]:
    """One headless Chromium for the module."""
    drv = new_driver()
    drv.set_script_timeout(scaled(20))
    try:
        yield drv
    finally:
        drv.quit()


class Page:
    """The browser, for one test: waits, scripts, and the console errors it allows."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.allowed: list[re.Pattern[str]] = []

    def allow(self, pattern: str) -> None:
        """Console errors matching ``pattern`` are expected in this test (say why at the call)."""
        self.allowed.append(re.compile(pattern))

    def wait(self, condition: Callable[[Any], Any], what: str, timeout: float = 10.0) -> Any:
        """WebDriverWait for ``condition(driver)`` to be truthy; fail naming ``what``."""
        from selenium.common.exceptions import TimeoutException
        from selenium.webdriver.support.ui import WebDriverWait

        try:
            return WebDriverWait(self.driver, scaled(timeout)).until(condition)
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what}") from None

    def run(self, body: str, *args: Any) -> Any:
        """Run ``body`` as an async function (``args`` as ``args``) and return its value.

        A rejection fails the test with the error's code and message.
        """
        script = (
            "const done = arguments[arguments.length - 1];"
            "const args = Array.from(arguments).slice(0, -1);"
            f"(async (args) => {{ {body} }})(args).then("
            "  (value) => done({ value }),"
            "  (err) => done({ error: String(err && err.stack || err), code: err && err.code }));"
        )
        result = self.driver.execute_async_script(script, *args)
        if "error" in result:
            raise AssertionError(f"page script failed ({result.get('code')}): {result['error']}")
        return result.get("value")

    def open_client_page(self, pages_url: str, server_url: str) -> None:
        """Load pages/client.html, which imports the server's /dwsps.js as ``window.dwsps``."""
        self.driver.get(f"{pages_url}/client.html?server={server_url}")
        self.wait(lambda d: d.title == "ready", "the client page to import /dwsps.js")


@pytest.fixture
def page(driver: Any, serve_process: ProcessFactory) -> Iterator[Page]:
    """The browser for one test; any console error not allowed fails the test."""
    p = Page(driver)
    console_errors(driver, [])  # what earlier tests left is theirs
    yield p
    errors = console_errors(driver, p.allowed)
    for handle in driver.window_handles[1:]:
        driver.switch_to.window(handle)
        driver.close()
    driver.switch_to.window(driver.window_handles[0])
    driver.get("about:blank")
    assert not errors, "browser console errors:\n" + "\n".join(errors)
