"""Image encoders on ONNX Runtime: the same features as PyTorch, exported once (shared by processes
starting together), checked before use, redone once when torn or wrong, else PyTorch with a warning."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import numpy as np
import pytest

from pipeline.core import fs as zio
from pipeline.encoders import image_onnx, onnx_cache
from pipeline.encoders.image import load_image_encoder
from pipeline.inputs.images import decode_image

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def png_bytes(arr: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One EfficientNet-Lite0 export for the module's tests, in a cache of its own."""
    d = tmp_path_factory.mktemp("zsl-cache")
    mp = pytest.MonkeyPatch()
    mp.setenv("ZSL_CACHE_DIR", str(d))
    assert load_image_encoder("effnet-lite0", device="cpu", backend="onnx", threads=1).backend == "onnx"
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def torch_effnet():
    return load_image_encoder("effnet-lite0", device="cpu", backend="torch")


@pytest.fixture(scope="module")
def real_pixels(animal_mnist):
    """70 real images decoded as `zsl extract` decodes them: animal-mnist silhouettes, and Open Clip Art
    drawings where Debian's openclipart-png is installed."""
    from PIL import Image

    x, y = animal_mnist
    blobs = [png_bytes(x[i]) for i in np.concatenate([np.flatnonzero(y == c)[:5] for c in range(10)])]
    root = "/usr/share/openclipart/png"
    if os.path.isdir(root):
        files = sorted(os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs if f.endswith(".png"))
        for f in files[:: max(1, len(files) // 20)][:20]:
            with open(f, "rb") as fh:
                blobs.append(fh.read())
    else:
        rng = np.random.default_rng(0)  # photos-like stand-ins: textured, coloured upscales
        for i in range(20):
            im = Image.fromarray(x[i]).resize((300, 240)).convert("RGB")
            arr = np.clip(np.asarray(im, np.int16) + rng.integers(-30, 30, (240, 300, 3)), 0, 255).astype(np.uint8)
            blobs.append(png_bytes(arr))
    return np.stack([decode_image(b, size=224)[0] for b in blobs])


def test_onnx_features_equal_the_pytorch_ones_on_real_images(cache, monkeypatch, torch_effnet, real_pixels):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(cache))
    enc = load_image_encoder("effnet-lite0", device="cpu", backend="onnx", threads=1)
    assert (enc.backend, torch_effnet.backend) == ("onnx", "torch")
    assert (enc.model_id, enc.dim, enc.image_size) == (torch_effnet.model_id, torch_effnet.dim, 224)
    for batch in (real_pixels[:1], real_pixels[1:8], real_pixels):  # batch sizes other than the export's
        got, want = enc.encode(batch), torch_effnet.encode(batch)
        assert got.shape == want.shape == (len(batch), 1280) and got.dtype == np.float32
        scale = max(1.0, float(np.abs(want).max()))
        assert float(np.abs(got - want).max()) / scale <= image_onnx.TOLERANCE
    v = enc.encode(real_pixels[[0, 20]])  # different images stay apart (not one constant vector)
    assert float(np.abs(v[0] - v[1]).max()) > 0.1
    assert enc.encode(real_pixels[:0]).shape == (0, 1280)
    with pytest.raises(ValueError, match="expected 224x224 images"):
        enc.encode(np.zeros((1, 100, 100, 3), np.uint8))


def test_an_open_clip_image_tower_on_onnx_equals_pytorch(tmp_path, monkeypatch, real_pixels):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(tmp_path))
    torch_enc = load_image_encoder("open_clip:ViT-S-32", "random", device="cpu", backend="torch")
    enc = image_onnx.onnx_image_encoder(torch_enc, threads=1)  # the same (random) weights
    got, want = enc.encode(real_pixels[:5]), torch_enc.encode(real_pixels[:5])
    assert got.shape == want.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # normalised, as PyTorch's
    assert float(np.abs(got - want).max()) <= image_onnx.TOLERANCE
    # auto keeps random weights on PyTorch: a new export for every process would only fill the cache
    assert load_image_encoder("open_clip:ViT-S-32", "random", device="cpu").backend == "torch"
    assert len(list((tmp_path / "onnx").glob("image-*.onnx"))) == 1


def test_the_export_is_cached_and_reused(cache, monkeypatch):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(cache))
    (f,) = (cache / "onnx").glob("image-effnet-lite0-*.onnx")
    assert f.stat().st_size > 5_000_000 and not list((cache / "onnx").glob(f"{zio.TMP_PREFIX}*"))
    import onnx

    ops = {n.op_type for n in onnx.load(str(f)).graph.node}  # "same" padding fixed at export: no shape arithmetic
    assert "Conv" in ops and not ops & {"Shape", "Ceil", "Gather"}

    def no_export(*a, **k):
        raise AssertionError("exported again although the cache holds the model")

    monkeypatch.setattr(image_onnx, "_export", no_export)
    assert load_image_encoder("effnet-lite0", device="cpu").backend == "onnx"  # auto on the CPU


def test_processes_starting_together_share_one_export(tmp_path):
    """Three processes (as Ray actors starting together) load the encoder at once: one exports, the
    others wait on the lock and load its file."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO, stream=sys.stdout);"
            "from pipeline.encoders.image import load_image_encoder;"
            "e = load_image_encoder('effnet-lite0', device='cpu', backend='onnx', threads=1);"
            "print('BACKEND', e.backend)")
    env = {**os.environ, "ZSL_CACHE_DIR": str(tmp_path), "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("BACKEND onnx" in o for o in outs), outs
    assert sum("exporting the image encoder effnet-lite0" in o for o in outs) == 1, outs
    assert len(list((tmp_path / "onnx").glob("image-effnet-lite0-*.onnx"))) == 1


def test_a_torn_export_is_exported_again(cache, tmp_path, monkeypatch, caplog):
    import shutil

    (good,) = (cache / "onnx").glob("image-effnet-lite0-*.onnx")
    (tmp_path / "onnx").mkdir()
    torn = tmp_path / "onnx" / good.name
    torn.write_bytes(good.read_bytes()[:5000])  # cut short: a crashed copy, a full disk
    monkeypatch.setenv("ZSL_CACHE_DIR", str(tmp_path))
    exports = []
    monkeypatch.setattr(image_onnx, "_export", lambda enc, net, path: (exports.append(path), shutil.copyfile(good, path)))
    with caplog.at_level(logging.WARNING):
        enc = load_image_encoder("effnet-lite0", device="cpu", backend="onnx", threads=1)
    assert enc.backend == "onnx" and "exporting again" in caplog.text and exports == [torn]
    assert torn.stat().st_size == good.stat().st_size


def test_an_export_that_disagrees_is_redone_once_then_pytorch_with_a_warning(tmp_path, monkeypatch, caplog,
                                                                              torch_effnet, real_pixels):
    monkeypatch.setenv("ZSL_CACHE_DIR", str(tmp_path))
    real_graph = image_onnx._graph

    def off_graph(net, mean, std, normalize):  # a wrong graph: features shifted by 0.05 (>> the bound)
        import torch

        inner = real_graph(net, mean, std, normalize)

        class Off(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = inner

            def forward(self, pixels):
                return self.inner(pixels) + 0.05

        return Off()

    monkeypatch.setattr(image_onnx, "_graph", off_graph)
    real_export = image_onnx._export
    calls = []
    monkeypatch.setattr(image_onnx, "_export", lambda *a: (calls.append(a[-1]), real_export(*a)))
    with pytest.raises(onnx_cache.OnnxExportError, match=r"differs from PyTorch by .* \(> 0.0001\)"):
        load_image_encoder("effnet-lite0", device="cpu", backend="onnx")
    assert len(calls) == 1 and not list((tmp_path / "onnx").glob("*.onnx"))  # the refused file is not kept
    # a cached file that disagrees is exported again once, then refused; auto: PyTorch, with a warning
    real_export(torch_effnet, torch_effnet.export_module(), calls[0])
    with caplog.at_level(logging.WARNING):
        enc = load_image_encoder("effnet-lite0", device="cpu", backend="auto")
    assert len(calls) == 2 and enc.backend == "torch"
    assert "differs from the model" in caplog.text and "stays on PyTorch" in caplog.text
    np.testing.assert_array_equal(enc.encode(real_pixels[:3]), torch_effnet.encode(real_pixels[:3]))


def test_backend_choices_are_checked():
    with pytest.raises(ValueError, match="image backend 'tensorrt'; use one of auto, torch, onnx"):
        load_image_encoder("effnet-lite0", backend="tensorrt")
    with pytest.raises(ValueError, match="'onnx' runs on the CPU"):
        load_image_encoder("effnet-lite0", device="cuda", backend="onnx")


def test_auto_without_onnxruntime_is_pytorch(monkeypatch, caplog):
    monkeypatch.setattr(onnx_cache, "onnx_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        assert load_image_encoder("effnet-lite0", device="cpu").backend == "torch"
    assert "onnxruntime is not installed" in caplog.text
