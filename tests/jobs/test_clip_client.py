"""The real clip-retrieval 2.45.0 ``ClipClient`` (its own venv from `make tools`) against `zsl serve`
(uvicorn on a free loopback port): text, embedding and image-file queries, three indexes by
``indice_name``, and ``modality``; it gets result rows, not an error object. ``clip_retrieval/__init__.py`` imports the
whole backend (torch, flask, faiss...), so the venv holds the wheel without its dependencies and
the client module is loaded from its file, unchanged."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

pytest.importorskip("fastapi")

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("ZSL_TOOLS_DIR", ROOT / ".venv-tools")) / "clip-retrieval"

CLIENT = """
import importlib.util, json, os, sys
pkg = importlib.util.find_spec("clip_retrieval")  # finds the package without running its __init__
spec = importlib.util.spec_from_file_location(
    "clip_client", os.path.join(pkg.submodule_search_locations[0], "clip_client.py"))
cc = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cc)
a = json.loads(sys.argv[1])
url = a["base"] + "/knn-service"
animals = cc.ClipClient(url=url, indice_name="animals", num_images=5, modality=cc.Modality.IMAGE)
out = {"text": animals.query(text="zebra"), "embedding": animals.query(embedding_input=a["embedding"]),
       "captioned": cc.ClipClient(url=url, indice_name="captioned", num_images=4).query(text="dog"),
       "by_text_modality": cc.ClipClient(url=url, indice_name="animals", num_images=3,
                                         modality=cc.Modality.TEXT).query(text="cat"),
       "image": cc.ClipClient(url=url, indice_name="silhouettes", num_images=3).query(image=a["image"])}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def base(serve_world, caption_world, image_world, free_port, live_server):
    from pipeline.core.config import ServeConfig
    from pipeline.index.searcher import Searcher
    from pipeline.stages.serve import create_app

    cfg = ServeConfig(indexes={}, port=free_port(), thumbnail_cache=str(serve_world[1] / "thumbs"))
    app = create_app(cfg, searchers={"animals": serve_world[0], "captioned": caption_world[0],
                                     "silhouettes": Searcher(str(image_world[0] / "index"), load_text=False)})
    with live_server(app, cfg.port) as url:
        yield url


def test_real_clip_client_gets_rows(base, serve_world, image_world):
    if not (VENV / "bin" / "python").exists():
        pytest.skip(f"{VENV} is missing: run `make tools` (clip-retrieval's client in its own venv)")
    s, _, _, _ = serve_world
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["NO_PROXY"] = "127.0.0.1"
    arg = json.dumps({"base": base, "embedding": s.text_queries(["okapi"])[0].tolist(),
                      "image": str(image_world[0] / "img" / "12.png")})  # the client base64-encodes the file
    r = subprocess.run([str(VENV / "bin" / "python"), "-c", CLIENT, arg], capture_output=True, text=True,
                       timeout=120, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    for key, n, label in (("text", 5, "zebra"), ("embedding", 5, "okapi"), ("captioned", 4, "dog")):
        rows = out[key]
        assert isinstance(rows, list) and len(rows) == n, (key, rows)
        assert all(isinstance(x["id"], int) and isinstance(x["similarity"], float) and x["caption"] for x in rows)
        assert sum(x["label"] == label for x in rows) >= n - 1, (key, rows)
    assert all(x["image_id"].startswith("cap") and "a drawing of a dog" in x["caption"]
               for x in out["captioned"] if x["id"] % 3 != 2)
    assert [x["image_id"] for x in out["image"]][:1] == ["a12"] and out["image"][0]["label"] == "giraffe"
    # modality TEXT searches captions: this index has no caption index, and the client gets why
    assert isinstance(out["by_text_modality"], dict) and "caption index" in out["by_text_modality"]["detail"]
