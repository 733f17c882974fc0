"""Shared fixtures: a seeded rng, a few real animal-mnist PNGs in class folders, a 2-CPU Ray."""

from __future__ import annotations

import os
import shutil
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
#: The class-level tables (AwA1/AwA2/CUB/SUN/aPY) the repository carries, with their sources (README there).
CLASS_SEMANTICS = REPO / "conf" / "class_semantics"


@pytest.fixture(scope="session")
def class_semantics_dir() -> Path:
    """``conf/class_semantics`` (AwA1/AwA2/CUB/SUN/aPY tables, carried by the repository). Missing data
    fails the test: a skip would let CI pass without ever reading the real tables."""
    d = CLASS_SEMANTICS
    if not (d / "awa2" / "class_attributes.csv").is_file():
        pytest.fail(f"{d} is missing: the repository carries these tables (conf/class_semantics/README.md)")
    return d


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """The real animal-mnist arrays, loaded once per session."""
    from pipeline.inputs.demo_data import load_animal_mnist

    try:
        return load_animal_mnist()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


TINY_CLASSES = ("bear", "bird", "cat")
TINY_PER_CLASS = 2


@pytest.fixture
def tiny_images(tmp_path, animal_mnist):
    """``TINY_PER_CLASS`` real images of each of ``TINY_CLASSES`` as ``<root>/<class>/NNNNN.png``.

    Returns ``(root, {"<class>/NNNNN.png": (28, 28) uint8 array})``.
    """
    from PIL import Image

    from pipeline.inputs.demo_data import ANIMAL_MNIST_CLASSES

    x, y = animal_mnist
    root = tmp_path / "images"
    written: dict[str, np.ndarray] = {}
    for name in TINY_CLASSES:
        (root / name).mkdir(parents=True)
        for i in np.flatnonzero(y == ANIMAL_MNIST_CLASSES.index(name))[:TINY_PER_CLASS]:
            rel = f"{name}/{int(i):05d}.png"
            Image.fromarray(x[i], mode="L").save(root / rel, format="PNG")
            written[rel] = x[i]
    return str(root), written


@pytest.fixture(scope="module")
def ray_start_2_cpus():
    ray = pytest.importorskip("ray")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir="/tmp/zsl-ray-tests")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_down_after():
    """For modules that run `zsl extract` in-process (it starts a local Ray): shut Ray down after them,
    so that later tests (Ray Serve, a cluster) start their own."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


class FakeText:
    """A text encoder that maps a class name to that class's text embedding (and anything else to noise)."""

    def __init__(self, names, text):
        self.names, self.text, self.dim = list(names), np.asarray(text, np.float32), text.shape[1]

    def encode(self, prompts):
        out = []
        for p in prompts:
            word = p.split()[-1].strip(".")
            out.append(self.text[self.names.index(word)] if word in self.names else np.ones(self.dim, np.float32))
        return np.stack(out)


@pytest.fixture(scope="session")
def serve_world(tmp_path_factory):
    """A moved index of 120 tiny PNGs in 4 classes, served by a Searcher with a fake text encoder
    (a class name maps to its class embedding); ``(searcher, root, labels, names)``."""
    from PIL import Image

    from pipeline.semantics.classset import write_class_set
    from pipeline.core.features import write_features
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL
    from pipeline.index.searcher import Searcher
    from pipeline.core.config import IndexConfig
    from pipeline.stages.index import run_index

    root = tmp_path_factory.mktemp("serve")
    rng = np.random.default_rng(0)
    names = ["cat", "dog", "okapi", "zebra"]
    text = rng.standard_normal((4, 8)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    write_class_set(str(root / "classes"), names, [None] * 4, text, None, {"text_model": "fake-text"})
    centres = rng.standard_normal((4, 16)).astype(np.float32) * 3
    y = np.arange(120) % 4
    X = (centres[y] + 0.3 * rng.standard_normal((120, 16))).astype(np.float32)
    model = ESZSL(gamma=1.0, lam=0.1).fit(X, y, text)
    save_model(str(root / "model"), model, {
        "feature_model": "fake-feat", "feature_dim": 16, "semantics": "text", "semantic_dim": 8,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["a {name}"],
        "seen": names, "gamma": 0.0, "calibration": None})
    (root / "img").mkdir()
    uris = []
    for i in range(120):
        p = root / "img" / f"{i:03d}.png"
        Image.new("RGB", (40, 30), (i * 2, 0, 0)).save(p)
        uris.append(str(p))
    (root / "img" / "005.png").write_bytes(b"not an image")
    write_features(str(root / "features"), image_ids=[f"img{i:03d}" for i in range(120)], uris=uris,
                   labels=[names[c] for c in y], X=X, model_id="fake-feat", shard_size=50)
    run_index(IndexConfig(features=str(root / "features"), model=str(root / "model"), output=str(root / "built"),
                          use_gpu="no", tune_queries=50), progress=False)
    # the index is moved, its model deleted, and it is served from elsewhere
    shutil.move(str(root / "built"), str(root / "moved"))
    shutil.rmtree(root / "model")
    cwd = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("elsewhere"))
    try:
        s = Searcher(str(root / "moved"), load_text=False)
    finally:
        os.chdir(cwd)
    s._encoder = FakeText(names, text)
    return s, root, y, names


def png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def image_world(tmp_path_factory):
    """24 animal-mnist silhouettes (3 classes) encoded by EfficientNet-Lite0 exactly as `zsl extract`
    decodes and encodes them, an ESZSL text model on them, and the index."""
    from pipeline.semantics.classset import write_class_set
    from pipeline.core.config import IndexConfig
    from pipeline.inputs.demo_data import load_animal_mnist
    from pipeline.encoders.image import load_image_encoder
    from pipeline.core.features import write_features
    from pipeline.inputs.images import decode_image
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL
    from pipeline.stages.index import run_index

    root = tmp_path_factory.mktemp("imgq")
    x, y = load_animal_mnist()
    pick = np.concatenate([np.flatnonzero(y == c)[:8] for c in (2, 6, 9)])  # cat, giraffe, zebra
    names = ["cat", "giraffe", "zebra"]
    labels = np.repeat(np.arange(3), 8)
    (root / "img").mkdir()
    uris, blobs = [], []
    for i, j in enumerate(pick):
        data = png_bytes(x[j])
        (root / "img" / f"{i:02d}.png").write_bytes(data)
        uris.append(str(root / "img" / f"{i:02d}.png"))
        blobs.append(data)
    enc = load_image_encoder("effnet-lite0", device="cpu")
    X = enc.encode(np.stack([decode_image(b, size=224)[0] for b in blobs]))
    write_features(str(root / "features"), image_ids=[f"a{i:02d}" for i in range(24)], uris=uris,
                   labels=[names[c] for c in labels], X=X, model_id="effnet-lite0", shard_size=10,
                   config={"encoder": "effnet-lite0", "pretrained": None}, image_size=224)
    rng = np.random.default_rng(0)
    S = rng.standard_normal((3, 8)).astype(np.float32)
    S /= np.linalg.norm(S, axis=1, keepdims=True)
    write_class_set(str(root / "classes"), names, [None] * 3, S, None, {"text_model": "fake-text"})
    save_model(str(root / "model"), ESZSL(gamma=1.0, lam=0.1).fit(X, labels, S), {
        "feature_model": "effnet-lite0", "feature_dim": X.shape[1], "semantics": "text", "semantic_dim": 8,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["{name}"],
        "seen": names, "gamma": 0.0, "calibration": None})
    run_index(IndexConfig(features=str(root / "features"), model=str(root / "model"), output=str(root / "index"),
                          use_gpu="no", tune_queries=10), progress=False)
    return root, blobs, labels, names


@pytest.fixture(scope="session")
def free_port():
    """A function giving a free TCP port on 127.0.0.1 (servers under test listen on loopback only)."""
    import socket

    def pick() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    return pick


@pytest.fixture(scope="session")
def caption_world(tmp_path_factory, serve_world):
    """A second small index (the classes and text encoder of ``serve_world``): 24 rows in 3 feature
    shards with captions (every third row has none), rows 0 and 1 the same vector under two uris;
    ``(searcher, root, labels, names)``."""
    from pipeline.core.config import IndexConfig
    from pipeline.core.features import write_features
    from pipeline.index.searcher import Searcher
    from pipeline.stages.index import run_index
    from pipeline.zsl.models import save_model
    from pipeline.zsl.models.eszsl import ESZSL

    s0, _, _, names = serve_world
    text = s0._encoder.text
    root = tmp_path_factory.mktemp("captions")
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 16)).astype(np.float32) * 3
    y = np.arange(24) % 4
    X = (centres[y] + 0.3 * rng.standard_normal((24, 16))).astype(np.float32)
    y[1], X[1] = y[0], X[0]
    save_model(str(root / "model"), ESZSL(gamma=1.0, lam=0.1).fit(X, y, text), {
        "feature_model": "fake-feat", "feature_dim": 16, "semantics": "text", "semantic_dim": 8,
        "text_model": "fake-text", "text_model_name": "fake", "text_pretrained": None, "templates": ["a {name}"],
        "seen": names, "gamma": 0.0, "calibration": None})
    captions = [None if i % 3 == 2 else f"a drawing of a {names[c]}, number {i}" for i, c in enumerate(y)]
    write_features(str(root / "features"), image_ids=[f"cap{i:02d}" for i in range(24)],
                   uris=[str(root / f"{i:02d}.png") for i in range(24)], labels=[names[c] for c in y], X=X,
                   model_id="fake-feat", shard_size=10, captions=captions)
    run_index(IndexConfig(features=str(root / "features"), model=str(root / "model"), output=str(root / "index"),
                          use_gpu="no", tune_queries=10), progress=False)
    s = Searcher(str(root / "index"), load_text=False)
    s._encoder = FakeText(names, text)
    return s, root, y, names


@contextmanager
def _live_server(app, port: int, **uvicorn_options):
    """Serve ``app`` with uvicorn on ``127.0.0.1:port`` in a thread; yield its base url once
    ``/health`` answers; stop it on exit (tests that need a real socket: browsers, real clients)."""
    import uvicorn

    options = {"host": "127.0.0.1", "port": port, "log_level": "warning", **uvicorn_options}
    srv = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(200):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                time.sleep(0.05)
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="session")
def live_server():
    """``live_server(app, port, **uvicorn_options)``: a context manager serving ``app`` on loopback."""
    return _live_server


def _chrome(*extra_args: str):
    """Headless Chromium driven by selenium (skips the test where chromium/chromedriver are missing)."""
    import shutil as _shutil

    webdriver = pytest.importorskip("selenium.webdriver")
    browser = _shutil.which("chromium") or _shutil.which("chromium-browser")
    driver = _shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("no chromium/chromedriver installed (apt-get install chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", *extra_args):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


@pytest.fixture(scope="session")
def chrome():
    """``chrome(*extra_args)``: a new headless Chromium driver (the caller quits it)."""
    return _chrome
