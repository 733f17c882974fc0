"""The offline text model on ONNX Runtime: same vectors as PyTorch, cached export, checked before use."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from pipeline.core import fs as zio
from pipeline.encoders import text_onnx
from pipeline.encoders.text import load_text_encoder

TEXTS = ["a photo of a zebra.", "zebra", "a drawing of a red car parked near a house with a blue door",
         "Ünïcödé テキスト 🦓", "striped " * 400, "?", "the quick brown fox jumps over the lazy dog"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export for the module's tests, in a cache of its own."""
    d = tmp_path_factory.mktemp("zsl-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZSL_CACHE_DIR", str(d))
    load_text_encoder("minilm", backend="onnx", threads=1)
    yield d
    mp.undo()


@pytest.fixture
def torch_encoder():
    return load_text_encoder("minilm", backend="torch")


def test_onnx_vectors_equal_the_pytorch_ones(cache, monkeypatch, torch_encoder):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(cache))
    enc = load_text_encoder("minilm", backend="onnx", threads=1)
    assert enc.backend == "onnx" and torch_encoder.backend == "torch" and enc.dim == torch_encoder.dim == 384
    for batch in (TEXTS[:1], TEXTS, TEXTS[2:5]):  # batch sizes and lengths other than the export's
        got, want = enc.encode(batch), torch_encoder.encode(batch)
        assert got.shape == want.shape and np.abs(got - want).max() < 1e-5
        np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # different texts stay apart (not one constant vector)
    v = enc.encode(["zebra", "car"])
    assert float(v[0] @ v[1]) < 0.9


def test_the_export_is_cached_and_reused(cache, monkeypatch):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(cache))
    (f,) = (cache / "onnx").glob("minilm-*.onnx")
    assert f.stat().st_size > 10_000_000 and not list((cache / "onnx").glob(f"{zio.TMP_PREFIX}*"))

    def no_export(*a, **k):
        raise AssertionError("exported again although the cache holds the model")

    monkeypatch.setattr(text_onnx, "_export", no_export)
    assert load_text_encoder("minilm", backend="onnx").backend == "onnx"


def test_a_torn_cache_file_is_exported_again(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(tmp_path))
    load_text_encoder("minilm", backend="onnx", threads=1)
    (f,) = (tmp_path / "onnx").glob("minilm-*.onnx")
    f.write_bytes(f.read_bytes()[:1000])  # cut short: a crashed copy, a full disk
    with caplog.at_level(logging.WARNING, logger="pipeline.encoders.text_onnx"):
        enc = load_text_encoder("minilm", backend="onnx", threads=1)
    assert enc.backend == "onnx" and f.stat().st_size > 10_000_000
    assert "exporting again" in caplog.text
    assert enc.encode(["zebra"]).shape == (1, 384)


def test_an_export_that_disagrees_with_pytorch_is_refused(cache, tmp_path, monkeypatch, caplog):
    import shutil

    (good,) = (cache / "onnx").glob("minilm-*.onnx")
    monkeypatch.setenv("ZSL_CACHE_DIR", str(tmp_path))
    real = text_onnx._encode_fn
    exports = []

    def off(model, sess):
        fn = real(model, sess)
        return lambda texts: fn(texts) + 0.05  # as if pooling ignored the attention mask

    def export(model, path):  # a copy of the real export (the graph is fine, the encode path is not)
        exports.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(good, path)

    monkeypatch.setattr(text_onnx, "_encode_fn", off)
    monkeypatch.setattr(text_onnx, "_export", export)
    with pytest.raises(ValueError, match=r"differs from PyTorch by .* \(> 0.0001\)"):
        load_text_encoder("minilm", backend="onnx")
    assert len(exports) == 1 and not list((tmp_path / "onnx").glob("*.onnx"))  # the refused file is not kept
    # a cached file that disagrees is exported again once, then refused
    export(None, exports[0])
    with pytest.raises(ValueError, match="differs from PyTorch"):
        load_text_encoder("minilm", backend="onnx")
    assert len(exports) == 3
    # auto falls back to PyTorch with a warning (and a correct encoder)
    with caplog.at_level(logging.WARNING, logger="pipeline.encoders.text"):
        enc = load_text_encoder("minilm", backend="auto")
    assert enc.backend == "torch" and "stays on PyTorch" in caplog.text


def test_backend_choices_are_checked():
    with pytest.raises(ValueError, match="text backend 'tensorrt'; use one of torch, onnx, auto"):
        load_text_encoder("minilm", backend="tensorrt")
    with pytest.raises(ValueError, match="'onnx' is available for 'minilm' only"):
        load_text_encoder("open_clip:ViT-B-32", "random", backend="onnx")


def test_auto_without_onnxruntime_is_pytorch(monkeypatch):
    monkeypatch.setattr(text_onnx, "onnx_available", lambda: False)
    assert load_text_encoder("minilm", backend="auto").backend == "torch"


def test_an_unwritable_cache_falls_back_to_the_temp_dir(cache, tmp_path, monkeypatch, caplog):
    import shutil
    import tempfile

    (good,) = (cache / "onnx").glob("minilm-*.onnx")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("ZSL_CACHE_DIR", str(blocker))  # <file>/onnx cannot be made
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(text_onnx, "_export", lambda model, path: shutil.copyfile(good, path))
    with caplog.at_level(logging.WARNING, logger="pipeline.encoders.text_onnx"):
        enc = load_text_encoder("minilm", backend="onnx")
    assert enc.backend == "onnx" and "cannot be written" in caplog.text
    assert len(list((tmp_path / "tmp").glob("zsl-onnx-*/minilm-*.onnx"))) == 1


def test_temp_files_of_a_killed_export_are_removed(cache, monkeypatch):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(cache))
    stale = cache / "onnx" / f"{zio.TMP_PREFIX}killed-minilm.onnx"
    stale.write_bytes(b"half an export")
    assert load_text_encoder("minilm", backend="onnx").backend == "onnx"
    assert not stale.exists() and len(list((cache / "onnx").glob("minilm-*.onnx"))) == 1


def test_onnx_on_cuda_is_refused():
    with pytest.raises(ValueError, match="'onnx' runs on the CPU"):
        load_text_encoder("minilm", device="cuda", backend="onnx")
