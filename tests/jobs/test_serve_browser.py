"""`zsl serve` for real: uvicorn on a free loopback port, and the web page driven by headless Chromium
(Debian's `chromium` + `chromium-driver`; skipped where they are not installed)."""

from __future__ import annotations

import json
import shutil
import threading
import time
import urllib.request

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")


@pytest.fixture(scope="module")
def server(serve_world, free_port):
    import uvicorn

    from pipeline.config import ServeConfig
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    port = free_port()
    cfg = ServeConfig(indexes={}, port=port, thumbnail_cache=str(root / "thumbs-live"))
    srv = uvicorn.Server(uvicorn.Config(create_app(cfg, searchers={"animals": s}), host="127.0.0.1", port=port,
                                        log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    yield base
    srv.should_exit = True
    t.join(timeout=10)


def test_live_server_answers_over_http(server):
    req = urllib.request.Request(server + "/search", data=json.dumps({"text": "okapi", "k": 4}).encode(),
                                 headers={"Content-Type": "application/json"})
    hits = json.loads(urllib.request.urlopen(req, timeout=10).read())["hits"]
    assert len(hits) == 4 and hits[0]["label"] == "okapi"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(server + "/search", data=b'{"text": ""}',
                                                      headers={"Content-Type": "application/json"}), timeout=10)
    assert err.value.code == 400 and "empty text" in json.loads(err.value.read())["detail"]


def _chrome():
    webdriver = pytest.importorskip("selenium.webdriver")
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium/chromedriver installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def test_web_page_in_a_real_browser(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = _chrome()
    try:
        d.get(server + "/")
        box = d.find_element(By.ID, "q")
        box.send_keys("zebra", Keys.ENTER)  # keyboard only
        wait = WebDriverWait(d, 20)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) >= 10)
        # the thumbnails in view loaded (naturalWidth > 0), served by /images/{id} (the rest load lazily)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#gallery img')].slice(0, 6)"
            ".every(i => i.complete && i.naturalWidth > 0)"))
        first = d.find_element(By.CSS_SELECTOR, "#gallery figure .label").text
        assert first == "zebra"
        assert "q=zebra" in d.current_url  # the search can be shared
        # the shared URL reproduces the search on load
        d.get(server + "/?q=dog&k=5")
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) == 5)
        assert d.find_element(By.CSS_SELECTOR, "#gallery figure .label").text == "dog"
    finally:
        d.quit()
