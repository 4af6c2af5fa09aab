"""The pages in a real headless Chromium (the distribution's chromium and chromedriver, driven by
selenium): the service's search page and the static report opened from disk. Screenshots go to
the session's ``screenshots/`` folder under pytest's temporary directory (each path printed and
recorded as a test property)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from support.console import ok, run_avr
from support.service import running_service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
    reason="needs the distribution's chromium and chromedriver "
           "(apt-get install chromium chromium-driver; .ci/run installs them)")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1280,1600")
WAIT = 60  # seconds: a loaded machine runs the tiny heads slowly


@pytest.fixture
def browser():
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="avr-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="session")
def screenshots(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "screenshots"


def screenshot(driver, folder: Path, name: str, record_property) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    record_property("screenshot", str(path))
    return path


def wait_for(driver, condition):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, WAIT).until(condition)


def test_the_search_page_shows_cards_with_thumbnails_and_a_detail_view(
        demo_runs, browser, screenshots, tmp_path, record_property):
    from selenium.webdriver.common.by import By

    with running_service(demo_runs["tefal"], tmp_path / "serve.log") as base:
        browser.get(base + "/")
        wait_for(browser, lambda d: "tefal" in d.find_element(By.ID, "run").text)
        box = browser.find_element(By.ID, "query")
        box.send_keys("a red circle moves while a drum beats")
        box.submit()
        cards = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .card"))
        assert len(cards) == 12
        loaded = wait_for(browser, lambda d: d.execute_script(
            "const images = [...document.querySelectorAll('#results .card img.thumb')];"
            "return images.length === 12 && images.every(i => i.complete && i.naturalWidth > 0)"
            " ? images.map(i => i.naturalWidth) : null;"))
        assert all(width > 0 for width in loaded)
        screenshot(browser, screenshots, "search-results", record_property)
        cards[0].click()
        wait_for(browser, lambda d: d.find_element(By.ID, "detail").is_displayed())
        bars = wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#frame-bars div"))
        assert len(bars) == 12
        assert "without audio" in browser.find_element(By.ID, "detail-values").text
        assert browser.find_elements(By.CSS_SELECTOR, "#frame-tiles .tile")
        screenshot(browser, screenshots, "search-detail", record_property)


def test_the_static_report_opens_from_disk_with_its_failure_cards(
        demo_runs, browser, screenshots, tmp_path, record_property):
    from selenium.webdriver.common.by import By

    out = tmp_path / "report"
    ok(run_avr("report", demo_runs["tefal"], "--against", demo_runs["xpool"], "--out", out,
               "--device", "cpu", "--failures", "3", "--moved", "2"))
    browser.get((out / "index.html").as_uri())
    cards = browser.find_elements(By.CSS_SELECTOR, "article.card.failure")
    assert len(cards) == 3
    assert cards[0].find_element(By.CSS_SELECTOR, "h3.query").text
    images = browser.execute_script(
        "return [...document.querySelectorAll('img')].map(i => [i.src, i.naturalWidth]);")
    assert images and all(width > 0 for _, width in images), images
    screenshot(browser, screenshots, "report", record_property)
