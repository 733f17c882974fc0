"""JPEG batches decoded by torchvision (nvJPEG on CUDA; libjpeg-turbo here) match the project's
Pillow decoder: same geometry and orientation, pixels within a few levels, EfficientNet-Lite0
embeddings at cosine >= 0.999; what torchvision cannot take falls back to Pillow, one row at a time."""

from __future__ import annotations

import io

import numpy as np
import pytest

pytest.importorskip("torchvision")

from PIL import Image  # noqa: E402

from pipeline.inputs.images import decode_image  # noqa: E402
from pipeline.inputs.jpeg_batch import decode_jpegs, is_jpeg  # noqa: E402


def _photos(n: int = 12, seed: int = 0) -> list[bytes]:
    """Real animal-mnist silhouettes, enlarged to 320x256 (not square), tinted, saved as JPEG."""
    from pipeline.inputs.demo_data import load_animal_mnist

    x, _ = load_animal_mnist()
    rng = np.random.default_rng(seed)
    out = []
    for j in rng.choice(len(x), n, replace=False):
        g = np.asarray(Image.fromarray(x[j]).resize((320, 256), Image.Resampling.BICUBIC), np.float32) / 255
        tint = rng.uniform(0.3, 1.0, 3)
        rgb = (np.stack([g * t for t in tint], -1) * 255 + rng.uniform(0, 40, (256, 320, 3))).clip(0, 255)
        buf = io.BytesIO()
        Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=92)
        out.append(buf.getvalue())
    return out


def test_same_pixels_as_the_pillow_decoder():
    datas = _photos()
    assert all(is_jpeg(d) for d in datas)
    pixels, errors, fast = decode_jpegs(datas, size=224)
    assert pixels.shape == (12, 224, 224, 3) and errors == [None] * 12 and fast == 12
    ref = np.stack([decode_image(d, size=224)[0] for d in datas])
    diff = np.abs(pixels.numpy().astype(int) - ref.astype(int))
    assert diff.mean() < 1.5 and np.percentile(diff, 99) <= 8, (diff.mean(), np.percentile(diff, 99))


def test_exif_orientation_is_applied():
    img = np.zeros((200, 300, 3), np.uint8)
    img[:, :100] = (255, 0, 0)  # a red band on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    ours = decode_jpegs([buf.getvalue()], size=64)[0].numpy()[0].astype(int)
    ref = decode_image(buf.getvalue(), size=64)[0].astype(int)
    assert np.abs(ours - ref).mean() < 3
    assert ours[:8, :, 0].mean() > 200 and ours[-8:, :, 0].mean() < 60  # the band is now on top


def test_other_files_fall_back_and_fail_alone():
    datas = _photos(3)
    png = io.BytesIO()
    Image.new("RGB", (90, 60), (0, 200, 0)).save(png, "PNG")
    batch = [datas[0], png.getvalue(), b"\xff\xd8\xff not really a jpeg", datas[1], datas[2][:200]]
    pixels, errors, fast = decode_jpegs(batch, size=32)
    assert fast == 2  # the two whole JPEGs
    assert errors[0] is None and errors[3] is None and errors[1] is None  # the PNG, by Pillow
    assert pixels[1].float().mean(dim=(0, 1)).tolist() == pytest.approx([0, 200, 0], abs=2)
    assert errors[2] and errors[4]  # broken: each named, the others decoded
    assert int(pixels[2].sum()) == 0


def test_the_pixel_limit_is_checked_before_decoding():
    datas = _photos(2)
    _, errors, fast = decode_jpegs(datas, size=32, max_pixels=320 * 256 - 1)
    assert fast == 0 and all("decompression bomb" in e for e in errors)


def test_embeddings_match_the_pillow_path():
    from pipeline.encoders.image import load_image_encoder

    datas = _photos(8, seed=3)
    enc = load_image_encoder("effnet-lite0", device="cpu")
    a = enc.encode(decode_jpegs(datas, size=224)[0])
    b = enc.encode(np.stack([decode_image(d, size=224)[0] for d in datas]))
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.999, cos
