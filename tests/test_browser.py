"""The page at `/`, driven end to end by Debian's chromium (headless) through Selenium.

Needs `chromium` and `chromium-driver` (scripts/install-browser.sh) and the `selenium` package;
skips with the reason printed only where they cannot be found.
"""
import os
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from test_serve import ServerProcess, build_tiny_index, photo_of

# No network but this machine: every host name other than the test server's fails to resolve, so a page that
# reached for a CDN (Swagger UI's default) would show it here as it would offline.
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=1500,1150",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1")
SCREENSHOT_DIR = Path(os.environ.get("GEOINDEX_SCREENSHOT_DIR") or tempfile.gettempdir())


def find_browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        return None, "chromium / chromedriver not found: run scripts/install-browser.sh (Debian: chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return None, "selenium is not installed: pip install -e '.[test]'"
    return (chromium, driver), ""


@pytest.fixture
def browser(tmp_path):
    found, reason = find_browser()
    if found is None:
        print(f"SKIP reason: {reason}")
        pytest.skip(reason)
    from selenium import webdriver
    chromium, driver_path = found
    options = webdriver.ChromeOptions()
    for flag in (*CHROME_FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}"):
        options.add_argument(flag)
    options.binary_location = chromium
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(driver_path))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def page_state(driver):
    return driver.execute_script("return document.body.dataset.state")


def upload_and_wait(driver, url, photo: Path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: page_state(d) in ("ready", "error"))
    assert page_state(driver) == "ready", driver.find_element(By.ID, "status").text
    driver.find_element(By.ID, "file").send_keys(str(photo))
    WebDriverWait(driver, 120).until(lambda d: page_state(d) in ("done", "error"))
    assert page_state(driver) == "done", driver.find_element(By.ID, "status").text
    # thumbnails are lazy images: wait until every one has arrived and decoded
    WebDriverWait(driver, 60).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#neighbours img')].every(i => i.complete && i.naturalWidth > 0)"))


def full_page_screenshot(driver, path: Path) -> Path:
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1500, height + 8)
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")
    return path


def check_answer_on_page(driver, expected: dict):
    from selenium.webdriver.common.by import By

    assert driver.find_element(By.ID, "city").get_attribute("data-city") == expected["city"]
    assert driver.find_element(By.ID, "city").text == expected["name"]
    assert driver.find_element(By.ID, "city").get_attribute("data-method") == expected["method"]
    methods = [m.get_attribute("data-method") for m in driver.find_elements(By.CSS_SELECTOR, "#methods .method")]
    offered = [m for key, m in (("top5", "knn"), ("classifier_top5", "classifier"), ("hybrid_top5", "hybrid"))
               if key in expected]
    # the method the answer leads with first, the others beside it
    assert methods == [expected["method"]] + [m for m in offered if m != expected["method"]]
    # full names, never cut: every label is as wide as its text
    for label in driver.find_elements(By.CSS_SELECTOR, "#methods .bar-row .label"):
        assert driver.execute_script("return arguments[0].scrollWidth <= arguments[0].clientWidth + 1", label), label.text
    assert (driver.find_element(By.ID, "caveat").is_displayed()) == expected["unlike_indexed"]
    located = [n for n in expected["neighbours"] if n["lat"] is not None]
    markers = driver.find_elements(By.CSS_SELECTOR, "#markers .marker.neighbour")
    assert len(markers) == len(located)
    assert [m.get_attribute("data-city") for m in markers] == [n["city"] for n in located]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#markers .marker.estimate")) == (expected["gps"]["lat"] is not None)
    if expected["gps"]["lat"] is not None:  # the page says at which level the GPS answer is, as query does
        assert f"({expected['gps']['level']} level" in driver.find_element(By.ID, "gps").text
    # the photos a street-level answer stands on are marked, on the map and in the list (none at city level)
    spot = {c["row"] for c in expected["gps"].get("cluster") or []} if expected["gps"]["level"] == "street" else set()
    assert [m.get_attribute("data-rank") for m in driver.find_elements(By.CSS_SELECTOR, "#markers .marker.at-spot")] \
        == [str(i + 1) for i, n in enumerate(expected["neighbours"]) if n["lat"] is not None and n.get("row") in spot]
    assert len(driver.find_elements(By.CSS_SELECTOR, "#neighbours li.at-spot")) == \
        sum(n.get("row") in spot for n in expected["neighbours"])
    assert len(driver.find_elements(By.CSS_SELECTOR, "#land path")) >= 1  # the coast around the points was drawn
    cards = driver.find_elements(By.CSS_SELECTOR, "#neighbours li")
    assert [c.get_attribute("data-city") for c in cards] == [n["city"] for n in expected["neighbours"]]
    for card, n in zip(cards, expected["neighbours"]):
        assert f"{n['similarity']:.3f}" in card.text
    # the map's markers sit inside the drawing, not off its edge
    for marker in markers:
        transform = marker.get_attribute("transform")
        x, y = (float(v) for v in transform[len("translate("):-1].split(","))
        assert 0 <= x <= 800 and 0 <= y <= 460
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe


def test_page_locates_a_dropped_photo(browser, gsv_tree, tmp_path):
    build_tiny_index(gsv_tree, tmp_path / "indexes")
    server = ServerProcess("--index", "tiny", "--index-dir", tmp_path / "indexes")
    try:
        photo = photo_of(gsv_tree, "PRS", 2)
        with open(photo, "rb") as fh:
            expected = httpx.post(server.url + "/v1/locate", files={"image": (photo.name, fh, "image/jpeg")}).json()["results"][0]
        upload_and_wait(browser, server.url + "/", photo)
        check_answer_on_page(browser, expected)
        full_page_screenshot(browser, SCREENSHOT_DIR / "geoindex-serve-synthetic.png")
    finally:
        server.stop()


def test_page_says_a_photo_unlike_anything_indexed_is_a_guess(browser, gsv_tree, tmp_path):
    """A photo the API flags `unlike_indexed` (noise, beside synthetic streets) gets the CLI's caveat on the page."""
    import numpy as np
    from PIL import Image

    import geoindex
    from selenium.webdriver.common.by import By

    index = build_tiny_index(gsv_tree, tmp_path / "indexes")
    geoindex.tune_knn(index, log=lambda m: None)  # sets the threshold that 99% of val photos exceed
    noise = tmp_path / "-unlike anything.png"  # a name starting with "-": kept on one line in the status
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(noise)
    server = ServerProcess("--index", "tiny", "--index-dir", tmp_path / "indexes")
    try:
        def api(photo):
            with open(photo, "rb") as fh:
                return httpx.post(server.url + "/v1/locate", files={"image": (photo.name, fh, "image/png")}).json()["results"][0]
        expected = api(noise)
        assert expected["unlike_indexed"] is True, expected  # the premise: the API flags it
        upload_and_wait(browser, server.url + "/", noise)
        check_answer_on_page(browser, expected)
        caveat = browser.find_element(By.ID, "caveat")
        assert caveat.is_displayed()
        assert "unlike anything indexed" in caveat.text.lower() and "guess" in caveat.text
        assert f"{expected['unlike_threshold']:.3f}" in caveat.text and f"{expected['top_similarity']:.3f}" in caveat.text
        assert "guess" in browser.find_element(By.ID, "kicker").text.lower()
        assert "guess" in browser.find_element(By.ID, "status").text
        name = browser.find_element(By.CSS_SELECTOR, "#status .filename")
        assert name.text == noise.name and name.size["height"] < 1.6 * float(name.value_of_css_property("font-size")[:-2])
        full_page_screenshot(browser, SCREENSHOT_DIR / "geoindex-serve-unlike.png")

        # then a photo like the indexed ones: the caveat goes away
        photo = photo_of(gsv_tree, "PRS", 2)
        expected = api(photo)
        assert expected["unlike_indexed"] is False, expected
        browser.find_element(By.ID, "file").send_keys(str(photo))
        from selenium.webdriver.support.ui import WebDriverWait
        WebDriverWait(browser, 60).until(lambda d: d.execute_script("return document.body.dataset.unlike") == "false")
        check_answer_on_page(browser, expected)
    finally:
        server.stop()


def test_empty_drop_zone_is_centred(browser, gsv_tree, tmp_path):
    """Before any photo, the prompt sits in the middle of the drop zone (the hidden preview takes no room)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    build_tiny_index(gsv_tree, tmp_path / "indexes")
    server = ServerProcess("--index", "tiny", "--index-dir", tmp_path / "indexes")
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 60).until(lambda d: page_state(d) == "ready")
        assert not browser.find_element(By.ID, "photo").is_displayed()
        zone, text = browser.find_element(By.ID, "drop").rect, browser.find_element(By.ID, "drop-text").rect
        for axis, size in (("x", "width"), ("y", "height")):
            zone_middle, text_middle = zone[axis] + zone[size] / 2, text[axis] + text[size] / 2
            assert abs(zone_middle - text_middle) < 4, (axis, zone, text)
    finally:
        server.stop()


def test_api_docs_render_with_no_network(browser, gsv_tree, tmp_path):
    """/docs is Swagger UI served by the server itself: with every other host unreachable it still shows the
    operations, and the page's footer links to it."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    build_tiny_index(gsv_tree, tmp_path / "indexes")
    server = ServerProcess("--index", "tiny", "--index-dir", tmp_path / "indexes")
    try:
        browser.get(server.url + "/")
        WebDriverWait(browser, 60).until(lambda d: page_state(d) == "ready")
        browser.find_element(By.LINK_TEXT, "API (OpenAPI, served by this server)").click()
        WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock"))
        paths = {e.text for e in browser.find_elements(By.CSS_SELECTOR, ".swagger-ui .opblock-summary-path")}
        assert {"/v1/locate", "/v1/locate/batch", "/v1/index"} <= {p.replace("\u200b", "") for p in paths}, paths
        html = browser.page_source
        assert "cdn." not in html and "https://" not in html.split("<body")[0]
        severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
        assert severe == [], severe
    finally:
        server.stop()


def test_page_on_real_photos(browser, tmp_path):
    """Over a small effnet index of real street photos from ../shared (never committed): the screenshot in docs/."""
    from conftest import london_csvs
    root, _, reason = london_csvs(tmp_path, n_index=40, n_external=1)
    if root is None:
        print(f"SKIP reason: {reason}")
        pytest.skip(reason)
    import geoindex
    geoindex.build_index(root, name="london-or-london", index_dir=tmp_path / "indexes", backbone="effnet",
                         batch_size=32, num_workers=0, device="cpu", progress=False, log=lambda m: None)
    index = geoindex.load_index("london-or-london", tmp_path / "indexes", device="cpu")
    geoindex.train_probe(index, progress=False, log=lambda m: None)
    query = index.store.metadata("test")
    photo = Path(query[query["city"] == "London"]["path"].iloc[0]).resolve()
    server = ServerProcess("--index", "london-or-london", "--index-dir", tmp_path / "indexes")
    try:
        with open(photo, "rb") as fh:
            expected = httpx.post(server.url + "/v1/locate", files={"image": ("street.jpg", fh, "image/jpeg")}).json()["results"][0]
        upload_and_wait(browser, server.url + "/", photo)
        check_answer_on_page(browser, expected)
        full_page_screenshot(browser, SCREENSHOT_DIR / "geoindex-serve-real.png")
    finally:
        server.stop()
