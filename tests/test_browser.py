"""The report and the listening page in a real browser: headless Chromium through Selenium (issue 12).

Skips with a reason where Chromium, its driver or Selenium is missing (`make sysdeps` installs Debian's
`chromium` and `chromium-driver`; `.ci/run` runs it through `make test`).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from report_run import make_run

from emotion_neurons import listening
from emotion_neurons.stages import report

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (requirements/dev.txt)")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
         "--autoplay-policy=no-user-gesture-required", "--mute-audio")


def _binary(*names: str) -> str | None:
    for n in names:
        p = shutil.which(n) or (f"/usr/bin/{n}" if Path(f"/usr/bin/{n}").exists() else None)
        if p:
            return p
    return None


@pytest.fixture
def browser(tmp_path):
    chrome, driver_bin = _binary("chromium", "chromium-browser"), _binary("chromedriver")
    if not chrome or not driver_bin:
        pytest.skip("Chromium or chromedriver not installed (apt-get install chromium chromium-driver; `make sysdeps`)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chrome
    for f in FLAGS:
        opts.add_argument(f)
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    opts.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                           "download.prompt_for_download": False})
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(options=opts, service=Service(driver_bin))
    drv.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
    drv.downloads = downloads
    yield drv
    drv.quit()


def _errors(drv) -> list[str]:
    return [e["message"] for e in drv.get_log("browser") if e["level"] == "SEVERE"]


def _media_loaded(drv) -> None:
    WebDriverWait(drv, 30).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('audio')].every(a => a.readyState >= 1 || a.error)"))
    bad_img = drv.execute_script(
        "return [...document.images].filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)")
    bad_audio = drv.execute_script(
        "return [...document.querySelectorAll('audio')].filter(a => a.error || !(a.duration > 0)).length")
    assert bad_img == [] and bad_audio == 0


def test_report_loads_every_figure_and_clip(browser, tmp_path):
    params = make_run(tmp_path)
    out = Path(params["run"]) / "report.html"
    out.write_text(report.build(params, out))
    browser.get(out.as_uri())
    n_img = browser.execute_script("return document.images.length")
    n_audio = browser.execute_script("return document.querySelectorAll('audio').length")
    assert n_img >= 8 and n_audio == 12
    _media_loaded(browser)
    assert _errors(browser) == []
    # the raw tables open and link to their TSVs, which exist
    link = browser.find_element(By.CSS_SELECTOR, "#raw details a")
    assert Path(link.get_attribute("href").removeprefix("file://")).is_file()


def test_listening_page_play_choose_download_analyse(browser, tmp_path):
    params = make_run(tmp_path)
    out = tmp_path / "listen"
    key = listening.export(params["run"], out, per_emotion=1, seed=1)
    steered = dict(zip(key["item"], key["steered"], strict=True))
    browser.get((out / "listening.html").as_uri())
    _media_loaded(browser)
    browser.find_element(By.ID, "listener").send_keys("ann")
    items = list(key["item"])
    plan = {}  # prefer the steered clip on the first 3 items, the baseline on the last
    for k, item in enumerate(items):
        div = browser.find_element(By.ID, item)
        for au in div.find_elements(By.TAG_NAME, "audio"):
            browser.execute_script("arguments[0].play()", au)
        want = steered[item] if k < 3 else ("B" if steered[item] == "A" else "A")
        plan[item] = want
        div.find_element(By.CSS_SELECTOR, f"input[name='{item}-choice'][value='{want}']").click()
        div.find_element(By.CSS_SELECTOR, f"input[name='{item}-words'][value='{'yes' if k % 2 == 0 else 'no'}']").click()
    WebDriverWait(browser, 10).until(lambda d: d.execute_script(
        "const s = JSON.parse(localStorage.getItem('listening:' + document.body.dataset.set));"
        "return Object.values(s.answers).every(a => a.played.length === 2)"))
    assert browser.find_element(By.ID, "progress").text == f"{len(items)} of {len(items)} answered"
    # a reload keeps the listener's progress
    browser.refresh()
    assert browser.find_element(By.ID, "listener").get_attribute("value") == "ann"
    for item, want in plan.items():
        assert browser.find_element(By.CSS_SELECTOR, f"input[name='{item}-choice'][value='{want}']").is_selected()
    browser.find_element(By.ID, "download").click()
    target = browser.downloads / "answers-ann.json"
    for _ in range(100):
        if target.exists() and target.stat().st_size:
            break
        time.sleep(0.1)
    doc = json.loads(target.read_text())
    assert doc["listener"] == "ann" and all(len(a["played"]) == 2 for a in doc["answers"])
    assert _errors(browser) == []
    res = listening.analyse(key, listening.load_answers([target], key))
    allrow = res["preference"].set_index("target").loc["all"]
    assert allrow["n"] == 4 and allrow["steered_preferred"] == 3 and allrow["rate"] == 0.75
    assert allrow["n_words"] == 4 and allrow["words_preserved"] == 0.5
