"""clip-retrieval 2.45.0's own built web front (from the wheel `make tools` installs in
``.venv-tools/clip-retrieval``), unmodified, served by a plain static server and pointed at `zsl serve`
with ``?back=``, in headless Chromium: its results show, their images load from ``/images/{id}``,
and a text query ranks its class first. Skipped where Chromium, chromedriver or the tools venv are
missing."""

from __future__ import annotations

import functools
import http.server
import os
import threading
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ZSL_TOOLS_DIR", ROOT / ".venv-tools")) / "clip-retrieval"


def _front_build() -> Path:
    """The built front of the installed clip-retrieval wheel (its ``front/build`` folder)."""
    found = sorted(VENV.glob("lib/python3*/site-packages/front/build/index.html"))
    if not found:
        pytest.skip(f"clip-retrieval's front is not in {VENV}: run `make tools`")
    return found[0].parent


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


@pytest.fixture(scope="module")
def front():
    """The front's static build on a free loopback port (Python's http.server); its base URL."""
    handler = functools.partial(_Quiet, directory=str(_front_build()))
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()
    t.join(timeout=10)


@pytest.fixture(scope="module")
def back(front, serve_world, free_port, live_server):
    """`zsl serve` (uvicorn in a thread, loopback) with the front's origin in ``cors_origins``."""
    from pipeline.core.config import ServeConfig
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    cfg = ServeConfig(indexes={}, port=free_port(), thumbnail_cache=str(root / "thumbs-front"),
                      cors_origins=[front])
    with live_server(create_app(cfg, searchers={"animals": s}), cfg.port) as base:
        yield base


#: the front's results (in its shadow DOM): each figure's display, caption, image src and load state
RESULTS = """
const root = document.querySelector('clip-front').shadowRoot;
return [...root.querySelectorAll('#products figure')].map(f => {
  const img = f.querySelector('img.pic'), cap = f.querySelector('figcaption');
  return {shown: getComputedStyle(f).display !== 'none', caption: cap ? cap.textContent.trim() : null,
          src: img.src, loaded: img.complete && img.naturalWidth > 0};
});
"""


def _loaded(d, n: int):
    """The front's results once ``n`` or more of them show with their image loaded, else False."""
    rows = d.execute_script(RESULTS)
    shown = [r for r in rows if r["shown"]]
    return shown if len(shown) >= n and all(r["loaded"] for r in shown[:n]) else False


def test_clip_front_shows_our_results(front, back, chrome):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d = chrome("--window-size=1280,2000")
    try:
        # the front reads back=, index= and query= from its URL and runs the query on load
        d.get(front + "/?" + urllib.parse.urlencode({"back": back, "index": "animals", "query": "dog"}))
        shown = WebDriverWait(d, 30).until(lambda d: _loaded(d, 10))
        assert all(r["src"].startswith(back + "/images/") and r["src"].endswith("?index=animals") for r in shown)
        top = [r["caption"] for r in shown[:10]]
        assert top[0] == "dog" and top.count("dog") >= 9, top
        # a query typed into its search bar, as a user does
        bar = d.find_element(By.CSS_SELECTOR, "clip-front").shadow_root.find_element(By.ID, "searchBar")
        bar.clear()
        bar.send_keys("zebra", Keys.ENTER)
        shown = WebDriverWait(d, 30).until(
            lambda d: (r := _loaded(d, 10)) and r[0]["caption"] == "zebra" and r)
        top = [r["caption"] for r in shown[:10]]
        assert top.count("zebra") >= 9, top
        assert "query=zebra" in d.current_url and urllib.parse.quote(back, safe="") in d.current_url
    finally:
        d.quit()
