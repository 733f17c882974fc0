"""`zsl serve` for real: uvicorn on a free loopback port, and the web page driven by headless Chromium
(Debian's `chromium` + `chromium-driver`; skipped where they are not installed)."""

from __future__ import annotations

import json
import urllib.request

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")


def _serve(live_server, cfg, searchers):
    """uvicorn in a thread on cfg.port (loopback); yields the base URL, stops on exit."""
    from pipeline.stages.serve import create_app

    with live_server(create_app(cfg, searchers=searchers), cfg.port) as base:
        yield base


@pytest.fixture(scope="module")
def server(serve_world, free_port, live_server):
    from pipeline.core.config import ServeConfig

    s, root, _, _ = serve_world
    cfg = ServeConfig(indexes={}, port=free_port(), thumbnail_cache=str(root / "thumbs-live"))
    yield from _serve(live_server, cfg, {"animals": s})


@pytest.fixture(scope="module")
def image_server(image_world, free_port, live_server):
    from pipeline.core.config import ServeConfig

    root = image_world[0]
    cfg = ServeConfig(indexes={"silhouettes": str(root / "index")}, port=free_port(), preload_text=False,
                      thumbnail_cache=str(root / "thumbs-live"))
    yield from _serve(live_server, cfg, None)


def test_live_server_answers_over_http(server):
    req = urllib.request.Request(server + "/search", data=json.dumps({"text": "okapi", "k": 4}).encode(),
                                 headers={"Content-Type": "application/json"})
    hits = json.loads(urllib.request.urlopen(req, timeout=10).read())["hits"]
    assert len(hits) == 4 and hits[0]["label"] == "okapi"
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(urllib.request.Request(server + "/search", data=b'{"text": ""}',
                                                      headers={"Content-Type": "application/json"}), timeout=10)
    assert err.value.code == 400 and "empty text" in json.loads(err.value.read())["detail"]


def test_web_page_in_a_real_browser(server, chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = chrome()
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


def test_search_by_image_in_a_real_browser(image_server, image_world, chrome):
    """The page's file picker sends the image; the same image comes back first."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root = image_world[0]
    d = chrome()
    try:
        d.get(image_server + "/")
        d.find_element(By.ID, "file").send_keys(str(root / "img" / "12.png"))
        wait = WebDriverWait(d, 30)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) >= 10)
        assert d.find_element(By.CSS_SELECTOR, "#gallery figure .id").text == "a12"
        assert d.find_element(By.CSS_SELECTOR, "#gallery figure .label").text == "giraffe"
    finally:
        d.quit()


@pytest.fixture(scope="module")
def keyed_server(serve_world, free_port, tmp_path_factory, live_server):
    from pipeline.core.config import ServeConfig

    s, root, _, _ = serve_world
    key = tmp_path_factory.mktemp("key") / "key"
    key.write_text("browser-key")
    cfg = ServeConfig(indexes={}, port=free_port(), thumbnail_cache=str(root / "thumbs-live"), api_key_file=str(key))
    yield from _serve(live_server, cfg, {"animals": s})


def test_web_page_sends_the_key_of_its_url_fragment(keyed_server, chrome):
    """With an API key, the page given /#key=... searches and shows the thumbnails (fetched with the key)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(keyed_server + "/indices", timeout=10)
    assert err.value.code == 401
    d = chrome()
    try:
        d.get(keyed_server + "/#key=browser-key")
        d.find_element(By.ID, "q").send_keys("zebra", Keys.ENTER)
        wait = WebDriverWait(d, 20)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#gallery figure")) >= 10)
        wait.until(lambda d: d.execute_script(
            "return [...document.querySelectorAll('#gallery img')].slice(0, 6)"
            ".every(i => i.complete && i.naturalWidth > 0 && i.src.startsWith('blob:'))"))
        assert d.find_element(By.CSS_SELECTOR, "#gallery figure .label").text == "zebra"
    finally:
        d.quit()


def test_docs_page_works_without_internet(server, chrome):
    """/docs in Chromium lists the API's operations: Swagger UI's script and styles come from this
    server (the machine has no internet, and the page would stay blank on a CDN's)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = chrome()
    try:
        d.get(server + "/docs")
        WebDriverWait(d, 30).until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= 5)
        paths = {e.text for e in d.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
        assert {"/search", "/knn-service", "/health"} <= paths, paths
        scripts = [s.get_attribute("src") for s in d.find_elements(By.TAG_NAME, "script") if s.get_attribute("src")]
        assert scripts and all(s.startswith(server) for s in scripts), scripts
    finally:
        d.quit()
