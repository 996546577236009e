"""A real headless Chromium for the explorer's tests: Debian's ``chromium`` driven by its ``chromium-driver``.

``start()`` gives a selenium driver, or raises :class:`BrowserMissing` naming what is missing (the
tests then skip with that message). No browser or driver is ever downloaded: selenium is pointed at
the system executables, so its driver manager has nothing to fetch.
"""

from __future__ import annotations

import os
import shutil

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
DRIVERS = ("chromedriver",)
INSTALL = "apt-get install -y chromium chromium-driver (as root), and pip install selenium (the 'dev' extra)"


class BrowserMissing(RuntimeError):
    pass


def _find(names, env: str) -> str | None:
    if os.environ.get(env):
        return os.environ[env]
    for name in names:
        found = shutil.which(name) or (f"/usr/lib/chromium/{name}" if os.path.exists(f"/usr/lib/chromium/{name}") else None)
        if found:
            return found
    return None


def start(width: int = 1280, height: int = 1000):
    """A headless Chromium (console messages logged, so tests can read them)."""
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise BrowserMissing(f"selenium is not installed; {INSTALL}") from None
    binary, driver = _find(BROWSERS, "MECH_VQA_CHROMIUM"), _find(DRIVERS, "MECH_VQA_CHROMEDRIVER")
    if binary is None or driver is None:
        raise BrowserMissing(f"no {'chromium' if binary is None else 'chromedriver'} on PATH; {INSTALL}")
    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1",
                 "--disable-extensions", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--metrics-recording-only"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    try:
        return webdriver.Chrome(service=Service(executable_path=driver), options=options)
    except Exception as err:  # a driver that does not match the browser, a browser that cannot start
        raise BrowserMissing(f"chromium did not start ({type(err).__name__}: {str(err).splitlines()[0]}); "
                             f"{INSTALL}") from None


def console_errors(driver) -> list[str]:
    """Console messages of level SEVERE since the last call (errors, CSP violations, failed loads)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def offline(driver) -> None:
    """Cut the page's network (Chrome DevTools): anything the page tries to fetch fails and is logged."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": True, "latency": 0,
                                                                "downloadThroughput": 0, "uploadThroughput": 0})


def online(driver) -> None:
    """Undo :func:`offline` (the app is served on 127.0.0.1, which offline emulation cuts too)."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.emulateNetworkConditions", {"offline": False, "latency": 0,
                                                                "downloadThroughput": -1, "uploadThroughput": -1})


def fetched(driver) -> list[str]:
    """Every resource the page loaded by URL (data: URIs excluded): must stay empty for a static view."""
    return driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)"
                                 ".filter(n => !n.startsWith('data:'));")


def canvas_pixels(driver, selector: str = "canvas.mv-map") -> str:
    """The map canvas' pixels as a data URL (what the reader sees there)."""
    return driver.execute_script(f"return document.querySelector({selector!r}).toDataURL('image/png');")
