"""The search page's options in a real headless Chromium: "more" loads the next page (disjoint from
the first, the same items a bigger search returns), and a min score leaves out what is under it."""

from __future__ import annotations

from pathlib import Path

import httpx
from browserkit import chrome, needs_chromium
from serverkit import CIFAR_TEST, CIFAR_TRAIN, DATA, LiveServer

MODEL = DATA / "models" / "cifar10-smallcnn2"

pytestmark = needs_chromium


def test_more_and_min_score(tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    query, second = CIFAR_TEST[3], CIFAR_TEST[4]  # another file: choosing the same one again fires no change
    with LiveServer(MODEL, tmp_path / "index", tmp_path / "server.log") as server:
        with httpx.Client(base_url=server.url, timeout=30) as c:
            for p in CIFAR_TRAIN[::10]:
                assert c.post("/v1/items", files={"file": (p.name, p.read_bytes())}).status_code == 201
            want = [h["id"] for h in c.post("/v1/search", files={"file": (query.name, query.read_bytes())},
                                             data={"k": "16"}).json()["neighbours"]]
            scores = [h["score"] for h in c.post("/v1/search", files={"file": (second.name, second.read_bytes())},
                                                 data={"k": "50"}).json()["neighbours"]]
        driver = chrome(tmp_path / "chrome", 1100, 760)  # an explicit driver: nothing is downloaded

        def shown() -> list[int]:
            return [int(img.get_attribute("src").split("/")[-2])
                    for img in driver.find_elements(By.CSS_SELECTOR, "#results .hit img")]

        try:
            driver.get(server.url + "/")
            WebDriverWait(driver, 20).until(lambda d: "items" in d.find_element(By.ID, "status").text)
            driver.find_element(By.ID, "k").clear()
            driver.find_element(By.ID, "k").send_keys("8")
            driver.find_element(By.ID, "file").send_keys(str(query))
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 8)
            more = driver.find_element(By.ID, "more-results")
            assert more.is_displayed()
            more.click()
            WebDriverWait(driver, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) == 16)
            assert shown() == want  # two pages of 8 = one search of 16, in order, no repeats

            cut = scores[20]  # a min score that keeps about 20
            driver.find_element(By.ID, "k").clear()
            driver.find_element(By.ID, "k").send_keys("50")
            driver.find_element(By.ID, "min-score").send_keys(f"{cut:.4f}")
            driver.find_element(By.ID, "file").send_keys(str(second))
            WebDriverWait(driver, 30).until(lambda d: "neighbours in" in d.find_element(By.ID, "message").text
                                            and len(d.find_elements(By.CSS_SELECTOR, "#results .hit")) < 50)
            got = [float(e.text) for e in driver.find_elements(By.CSS_SELECTOR, "#results .score")]
            assert got and min(got) >= round(cut, 4) - 1e-4 and len(got) == sum(s >= round(cut, 4) for s in scores)
            assert not more.is_displayed()  # a short page: nothing more
        finally:
            driver.quit()
