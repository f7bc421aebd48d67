"""The search page in a real headless Chromium: choose an image, see the grid of neighbours.

Needs the Debian packages `chromium` and `chromium-driver` (`make sysdeps` installs them); skips,
saying so, where they are missing. The screenshot goes to the test's temporary folder, and to
docs/search-page.png (the README's) when that is missing or UPDATE_SCREENSHOTS=1; set
SCREENSHOT_MODEL_DIR to a trained model directory (e.g. the demo's) for a screenshot whose
neighbours mean something — the fixture's model is untrained.
"""

from __future__ import annotations

import os
from pathlib import Path

import httpx
from browserkit import chrome, keep_screenshot, needs_chromium
from serverkit import CIFAR_TEST, CIFAR_TRAIN, LiveServer

pytestmark = needs_chromium


def test_pick_an_image_and_see_neighbours(model_dir: Path, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    model = Path(os.environ.get("SCREENSHOT_MODEL_DIR") or model_dir)
    with LiveServer(model, tmp_path / "index", tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for p in CIFAR_TRAIN[::12]:
                r = c.post("/v1/items", files={"file": (f"{p.parent.name}/{p.name}", p.read_bytes())})
                assert r.status_code == 201
        driver = chrome(tmp_path / "chrome", 1100, 760)  # an explicit driver: nothing is downloaded
        try:
            driver.get(server.url + "/")
            WebDriverWait(driver, 20).until(lambda d: "items" in d.find_element(By.ID, "status").text)
            driver.find_element(By.ID, "k").clear()
            driver.find_element(By.ID, "k").send_keys("12")
            query = CIFAR_TEST[0]
            driver.find_element(By.ID, "file").send_keys(str(query))
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 12)
            # every thumbnail actually loaded (naturalWidth > 0), scores are sorted best first
            WebDriverWait(driver, 30).until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
            ))
            scores = [float(e.text) for e in driver.find_elements(By.CSS_SELECTOR, "#results .score")]
            assert scores == sorted(scores, reverse=True) and -1.0 <= scores[-1] <= scores[0] <= 1.0001
            assert "neighbours in" in driver.find_element(By.ID, "message").text
            keep_screenshot(driver, "search-page.png", tmp_path)
        finally:
            driver.quit()
