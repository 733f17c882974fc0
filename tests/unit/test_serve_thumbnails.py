"""Thumbnails read only what they may (issue 17): allowed roots and schemes, byte and pixel caps before
decoding, a private cache that follows no symlink and stays under its size, replies that name no path."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest

pytest.importorskip("faiss")
pytest.importorskip("fastapi")

from fastapi import HTTPException  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from pipeline.core.config import ServeConfig  # noqa: E402
from pipeline.stages.serve import thumbnails as th  # noqa: E402


def _png(path, size=(64, 48)) -> str:
    Image.fromarray(np.full((size[1], size[0], 3), 120, np.uint8)).save(path)
    return str(path)


def test_remote_uris_are_refused_unless_enabled(monkeypatch):
    with pytest.raises(th.Refused):
        th.check_source("http://127.0.0.1:9/x.jpg", roots=None, remote=False)
    assert th.check_source("http://127.0.0.1:9/x.jpg", roots=None, remote=True) == "http://127.0.0.1:9/x.jpg"


def test_local_files_only_under_the_roots_and_symlinks_resolved(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    inside = _png(root / "a.png")
    secret = _png(outside / "b.png")
    os.symlink(secret, root / "link.png")
    roots = [os.path.realpath(root)]
    assert th.check_source(inside, roots=roots, remote=False) == os.path.realpath(inside)
    assert th.check_source(f"{root}/shard.tar::key.jpg", roots=roots, remote=False)
    for bad in (secret, str(root / "link.png"), f"{root}/../outside/b.png"):
        with pytest.raises(th.Refused):
            th.check_source(bad, roots=roots, remote=False)


def test_byte_and_pixel_caps_hold_before_decoding(tmp_path):
    big = _png(tmp_path / "big.png", size=(300, 300))
    with pytest.raises(th.Refused):
        th.read_capped(big, max_bytes=100, timeout=1, remote=False)
    raw = th.read_capped(big, max_bytes=10**7, timeout=1, remote=False)
    with pytest.raises(th.Refused, match="max_image_pixels"):
        th.make_thumbnail(raw, size=32, max_pixels=300 * 300 - 1)
    assert max(Image.open(io.BytesIO(th.make_thumbnail(raw, size=32, max_pixels=300 * 300))).size) == 32


def test_a_remote_read_gives_up_after_its_timeout(monkeypatch):
    import threading

    release = threading.Event()

    class Hanging:
        def open(self, path, mode):
            release.wait(5)
            raise OSError("never")

    monkeypatch.setattr(th.zio, "filesystem", lambda uri: (Hanging(), uri))
    try:
        with pytest.raises(th.Refused, match="no answer"):
            th.read_capped("http://example.invalid/x.jpg", max_bytes=10, timeout=0.2, remote=True)
    finally:
        release.set()


def test_the_cache_is_private_and_refuses_a_shared_folder(tmp_path):
    made = tmp_path / "made"
    th.private_dir(str(made))
    assert os.stat(made).st_mode & 0o777 == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    with pytest.raises(ValueError, match="writable by group or others"):
        th.private_dir(str(shared))
    os.symlink(made, tmp_path / "link")
    with pytest.raises(ValueError, match="not a plain folder"):
        th.private_dir(str(tmp_path / "link"))


def test_a_symlink_planted_in_the_cache_is_never_followed(tmp_path):
    cache = th.ThumbnailCache(str(tmp_path / "c"), max_bytes=10**6)
    secret = tmp_path / "secret.txt"
    secret.write_text("not an image")
    folder = tmp_path / "c" / "v1"
    folder.mkdir()
    os.symlink(secret, folder / "7-32.jpg")
    assert cache.get("v1", "7-32.jpg") is None and not (folder / "7-32.jpg").exists()
    cache.put("v1", "7-32.jpg", b"jpeg")
    assert cache.get("v1", "7-32.jpg") == b"jpeg" and secret.read_text() == "not an image"


def test_the_cache_stays_under_its_size_least_recently_used_out(tmp_path):
    cache = th.ThumbnailCache(str(tmp_path / "c"), max_bytes=3000)
    for i in range(3):
        cache.put("v", f"{i}.jpg", bytes(1000))
        os.utime(tmp_path / "c" / "v" / f"{i}.jpg", (1000 + i, 1000 + i))
    assert cache.get("v", "0.jpg") is not None  # used: now the most recent
    cache.put("v", "3.jpg", bytes(1000))
    left = sorted(os.listdir(tmp_path / "c" / "v"))
    assert "0.jpg" in left and "3.jpg" in left and "1.jpg" not in left
    assert sum(os.path.getsize(tmp_path / "c" / "v" / f) for f in left) <= 3000


def test_the_service_refuses_an_image_outside_its_roots_without_naming_it(serve_world, tmp_path):
    from pipeline.stages.serve import create_app

    s, root, _, _ = serve_world
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    cfg = ServeConfig(indexes={}, thumbnail_cache=str(tmp_path / "thumbs"), thumbnail_roots=[str(elsewhere)])
    client = TestClient(create_app(cfg, searchers={"animals": s}), base_url="http://localhost")
    r = client.get("/images/7?size=32")
    assert r.status_code == 404
    uri = s.ids.take([7]).column("uri")[0].as_py()
    assert uri not in r.text and str(root) not in r.text and str(tmp_path) not in r.text
    ok = TestClient(create_app(cfg.model_copy(update={"thumbnail_roots": [str(root)]}), searchers={"animals": s}),
                    base_url="http://localhost")
    r = ok.get("/images/7?size=32")
    assert r.status_code == 200 and r.headers["cache-control"].startswith("private")
    assert r.headers["etag"].endswith('-7-32"')


def test_a_shared_cache_folder_is_a_503_not_a_write(serve_world, tmp_path):
    from pipeline.stages.serve import create_app

    s, _, _, _ = serve_world
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    client = TestClient(create_app(ServeConfig(indexes={}, thumbnail_cache=str(shared)), searchers={"animals": s}),
                        base_url="http://localhost")
    r = client.get("/images/7?size=32")
    assert r.status_code == 503 and str(shared) not in r.text and os.listdir(shared) == []
    with pytest.raises(HTTPException):
        th.cache_for(ServeConfig(indexes={}, thumbnail_cache=str(shared)))
