"""pipeline.inputs.images: untrusted bytes -> (size, size, 3) uint8, or a DecodeError that says why."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from pipeline.inputs.images import DecodeError, decode_image, resize_center_crop


def encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def test_real_png_decodes_exactly(tiny_images):
    root, written = tiny_images
    for rel, gray in written.items():
        with open(f"{root}/{rel}", "rb") as f:
            arr, w, h = decode_image(f.read(), size=28)  # same size: no resampling
        assert arr.shape == (28, 28, 3) and arr.dtype == np.uint8 and (w, h) == (28, 28)
        for c in range(3):
            np.testing.assert_array_equal(arr[..., c], gray)


def test_real_png_resized(tiny_images):
    root, written = tiny_images
    rel = next(iter(written))
    with open(f"{root}/{rel}", "rb") as f:
        arr, w, h = decode_image(f.read(), size=64)
    assert arr.shape == (64, 64, 3) and (w, h) == (28, 28)
    assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_decode_solid_colour(fmt):
    data = encode(Image.new("RGB", (30, 20), (200, 40, 10)), fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    arr, w, h = decode_image(data, size=16)
    assert arr.shape == (16, 16, 3) and arr.dtype == np.uint8 and (w, h) == (30, 20)
    assert np.abs(arr.astype(int) - [200, 40, 10]).max() <= 3


def test_resize_center_crop_keeps_the_centre():
    a = np.zeros((10, 30, 3), np.uint8)
    a[:, 10:20] = 255  # a white centre band in a 30x10 image
    out = np.asarray(resize_center_crop(Image.fromarray(a), 10))
    assert out.shape == (10, 10, 3) and (out == 255).all()


def test_empty_bytes():
    with pytest.raises(DecodeError, match="empty"):
        decode_image(b"", size=8)


def test_random_bytes_are_not_an_image(rng):
    with pytest.raises(DecodeError, match="not an image"):
        decode_image(rng.bytes(2000), size=8)


def test_truncated_jpeg_fails(rng):
    data = encode(Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)), "JPEG")
    for cut in (200, len(data) // 2, len(data) - 10):
        with pytest.raises(DecodeError, match="broken image"):
            decode_image(data[:cut], size=8)


def test_png_bytes_under_a_jpeg_name_decode_fine():
    """The format comes from the bytes, not the name: a .jpg holding PNG data is fine."""
    data = encode(Image.new("RGB", (8, 8), (0, 255, 0)), "PNG")
    arr, _, _ = decode_image(data, size=8)
    assert (arr == [0, 255, 0]).all()


def test_cmyk_jpeg_to_rgb():
    data = encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)  # pure red in CMYK
    arr, _, _ = decode_image(data, size=16)
    assert arr.shape == (16, 16, 3)
    assert np.abs(arr.astype(int) - [255, 0, 0]).max() <= 3


def test_16bit_png_is_rescaled_min_max():
    a = np.zeros((16, 16), np.uint16)
    a[:, :8], a[:, 8:] = 1000, 60000
    im = Image.fromarray(a)
    data = encode(im, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    arr, _, _ = decode_image(data, size=16)
    assert (arr[:, :8] == 0).all() and (arr[:, 8:] == 255).all()


def test_16bit_png_constant_is_black():
    arr, _, _ = decode_image(encode(Image.fromarray(np.full((8, 8), 777, np.uint16)), "PNG"), size=8)
    assert (arr == 0).all()


def test_palette_png_with_transparency_goes_on_white():
    p = Image.new("P", (16, 16), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.paste(1, (8, 0, 16, 16))
    data = encode(p, "PNG", transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"
    arr, _, _ = decode_image(data, size=16)
    assert (arr[:, :8] == 255).all()  # index 0 is transparent -> white, not its palette colour
    assert (arr[:, 8:] == [200, 100, 50]).all()


def test_palette_png_without_transparency_keeps_colours():
    p = Image.new("P", (8, 8), 0)
    p.putpalette([10, 20, 30] + [0] * 765)
    arr, _, _ = decode_image(encode(p, "PNG"), size=8)
    assert (arr == [10, 20, 30]).all()


def test_rgba_is_composited_on_white():
    a = np.zeros((16, 16, 4), np.uint8)
    a[:, :8] = (255, 0, 0, 0)  # fully transparent red -> white
    a[:, 8:12] = (0, 0, 255, 255)  # opaque blue
    a[:, 12:] = (0, 0, 0, 128)  # half-transparent black over white
    arr, _, _ = decode_image(encode(Image.fromarray(a, "RGBA"), "PNG"), size=16)
    assert (arr[:, :8] == 255).all()
    assert (arr[:, 8:12] == [0, 0, 255]).all()
    assert np.abs(arr[:, 12:].astype(int) - 127).max() <= 1  # 255 * (1 - 128/255)


def test_la_grayscale_alpha_is_composited_on_white():
    a = np.zeros((8, 8, 2), np.uint8)
    a[:, :, 0], a[:, 4:, 1] = 50, 255
    arr, _, _ = decode_image(encode(Image.fromarray(a, "LA"), "PNG"), size=8)
    assert (arr[:, :4] == 255).all() and (arr[:, 4:] == 50).all()


def test_exif_orientation_is_applied():
    a = np.zeros((20, 40, 3), np.uint8)  # 40 wide x 20 high: red top half, blue bottom half
    a[:10], a[10:] = (255, 0, 0), (0, 0, 255)
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    arr, w, h = decode_image(encode(im, "JPEG", exif=exif.tobytes(), quality=95), size=20)
    assert (w, h) == (20, 40)
    # turned clockwise, the top (red) ends up on the right, the bottom (blue) on the left
    assert arr[:, 14:, 0].min() > 200 and arr[:, 14:, 2].max() < 60
    assert arr[:, :6, 2].min() > 200 and arr[:, :6, 0].max() < 60


def test_animated_gif_first_frame():
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    arr, w, h = decode_image(data, size=16)
    assert (w, h) == (16, 16) and (arr == [255, 0, 0]).all()


def _png_claiming(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose IHDR says ``width`` x ``height`` (CRC fixed up, so only the size lies)."""
    data = bytearray(encode(Image.new("RGB", (1, 1)), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def test_decompression_bomb_refused_from_the_header():
    bomb = _png_claiming(50_000, 50_000)
    assert Image.open(io.BytesIO(_png_claiming(3, 2))).size == (3, 2)  # the crafting itself is sound
    t0 = time.perf_counter()
    with pytest.raises(DecodeError, match="decompression bomb"):
        decode_image(bomb, size=16)
    assert time.perf_counter() - t0 < 1.0


def test_max_pixels_below_pillows_limit_is_enforced():
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    with pytest.raises(DecodeError, match=r"decompression bomb: header claims 100x100 pixels \(limit 5000\)"):
        decode_image(data, size=8, max_pixels=5000)
    assert decode_image(data, size=8, max_pixels=10_000)[0].shape == (8, 8, 3)


def test_decode_error_is_a_value_error():
    assert issubclass(DecodeError, ValueError)


# ---------------------------------------------------------------- draft (reduced-scale JPEG decoding)


def _photo(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth colour gradients with texture (seeded)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 255, yy / h * 255, (xx + yy) / (w + h) * 255], -1)
    arr += 20 * np.sin(xx[..., None] / 7.0 + yy[..., None] / 11.0) + rng.normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


@pytest.mark.parametrize("w, h", [(900, 600), (2000, 1500), (470, 1000)])
def test_draft_decodes_large_jpegs_at_a_reduced_scale_close_to_full_decoding(w, h):
    data = encode(_photo(w, h), "JPEG", quality=90)
    full, fw, fh = decode_image(data, size=224)
    fast, dw, dh = decode_image(data, size=224, draft=True)
    assert (dw, dh) == (fw, fh) == (w, h)  # the original size, as without draft
    assert fast.shape == full.shape == (224, 224, 3)
    diff = np.abs(fast.astype(int) - full.astype(int))
    assert 0 < diff.mean() < 2.0 and np.percentile(diff, 99) < 12  # another decode, close to the full one


def test_draft_keeps_the_exif_corrected_original_size():
    im = _photo(1000, 600)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees to display: 600 wide, 1000 high
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=90)
    full = decode_image(data, size=224)
    fast = decode_image(data, size=224, draft=True)
    assert full[1:] == fast[1:] == (600, 1000)
    assert np.abs(fast[0].astype(int) - full[0].astype(int)).mean() < 2.0  # rotated alike


@pytest.mark.parametrize("fmt, size", [("JPEG", (400, 300)), ("PNG", (1200, 900)), ("WEBP", (1200, 900))])
def test_draft_leaves_small_jpegs_and_other_formats_unchanged(fmt, size):
    data = encode(_photo(*size), fmt)  # a JPEG under twice the input size gains nothing from it
    np.testing.assert_array_equal(decode_image(data, size=224, draft=True)[0], decode_image(data, size=224)[0])


@pytest.mark.parametrize("w, h", [(28, 28), (640, 480), (300, 1000)])
def test_a_grey_image_decodes_exactly_as_its_rgb_copy(w, h):
    """Grey images are resized as one band, then made RGB: the very numbers of resizing them as RGB."""
    grey = Image.fromarray(np.asarray(_photo(w, h, seed=3))[..., 1])
    for fmt in ("PNG", "JPEG"):
        a = decode_image(encode(grey, fmt), size=224)
        b = decode_image(encode(grey.convert("RGB"), "PNG" if fmt == "PNG" else "BMP"), size=224)
        c = decode_image(encode(grey, fmt), size=224, draft=True)
        if fmt == "PNG":
            np.testing.assert_array_equal(a[0], b[0])
        assert a[0].shape == c[0].shape == (224, 224, 3) and a[1:] == b[1:] == c[1:] == (w, h)
        assert (a[0][..., 0] == a[0][..., 2]).all()
