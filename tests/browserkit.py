"""Headless Chromium for the page tests: the skip marker and a driver that never downloads one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest

CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

needs_chromium = pytest.mark.skipif(
    not (Path(CHROMEDRIVER).is_file() and CHROMIUM),
    reason="headless Chromium not installed (apt-get install chromium chromium-driver, or `make sysdeps`)",
)


def chrome(profile: Path, width: int, height: int) -> Any:
    """A headless Chromium driver with its own profile folder and a window of width x height."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--window-size={width},{height}", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def keep_screenshot(driver: Any, name: str, tmp_path: Path) -> None:
    """A screenshot of the page into tmp_path/name (asserting it was taken), copied to docs/name (the
    README's image) when that is missing or UPDATE_SCREENSHOTS=1."""
    shot = tmp_path / name
    assert driver.save_screenshot(str(shot))
    docs = Path(__file__).resolve().parents[1] / "docs" / name
    if not docs.exists() or os.environ.get("UPDATE_SCREENSHOTS") == "1":
        docs.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, docs)
