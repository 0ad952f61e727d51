"""A headless chromium driven through WebDriver: what the explore page's browser tests, `bench/explore.py` and
the README's screenshot use. Needs Debian's `chromium` and `chromium-driver` and the `selenium` package (the
`test` extra); nothing is downloaded (selenium's driver manager is never asked: both paths are given)."""

from __future__ import annotations

import shutil
from pathlib import Path

from isda_viz.errors import IsdaVizError


def headless_chromium(profile: Path, width: int = 1400, height: int = 1000):
    """A selenium Chrome driver on the machine's chromium and chromedriver, headless, its browser log kept
    (`driver.get_log("browser")`), its profile in `profile`."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    chromedriver = shutil.which("chromedriver")
    if chromium is None or chromedriver is None:
        raise IsdaVizError("a headless browser needs Debian's chromium and chromium-driver "
                           "(apt-get install chromium chromium-driver)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        raise IsdaVizError("a headless browser needs the selenium package (pip install 'isda-viz[test]')") from None
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-extensions", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--metrics-recording-only",
                     f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(chromedriver), options=options)
