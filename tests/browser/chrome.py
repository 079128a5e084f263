"""Headless Chromium for the browser tests and the screenshot script.

Debian's ``chromium`` driven through its ``chromedriver`` (both installed by
scripts/install-system-deps.sh): nothing is downloaded. The browser's console
log is collected (``goog:loggingPrefs``) so tests can assert that no page
logged an error.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def missing() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if not Path(path).exists():
            return (
                f"{name} is not installed (make test installs it: scripts/install-system-deps.sh)"
            )
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[dev]')"
    return None


def new_driver(width: int = 1280, height: int = 900, dark: bool = False) -> Any:
    """A headless Chromium session that keeps every browser console entry."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        # background tabs keep their timers: the two-tab test runs both at once
        "--disable-background-timer-throttling",
        "--disable-renderer-backgrounding",
        f"--window-size={width},{height}",
        f"--blink-settings=preferredColorScheme={0 if dark else 1}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def console_errors(driver: Any, allowed: list[re.Pattern[str]]) -> list[str]:
    """The SEVERE console entries of every open window since the last call, minus ``allowed``."""
    errors: list[str] = []
    current = driver.current_window_handle
    for handle in driver.window_handles:
        driver.switch_to.window(handle)
        for entry in driver.get_log("browser"):
            message = str(entry.get("message", ""))
            if entry.get("level") == "SEVERE" and not any(p.search(message) for p in allowed):
                errors.append(message)
    driver.switch_to.window(current)
    return errors
