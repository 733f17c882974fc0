"""Image encoders (``effnet-lite0``, open_clip image towers) on ONNX Runtime, for CPUs.

One graph does a batch's whole work: uint8 ``(n, H, W, 3)`` pixels -> scale and normalise ->
network -> (L2-normalise, open_clip) -> float32 ``(n, dim)``, exported from the PyTorch encoder of
:mod:`pipeline.encoders.image` with ``torch.onnx.export`` (TorchScript exporter, opset 17, dynamic
batch axis), so ONNX Runtime runs it with no Python step in between. Exported once per model (its
weights), image size and torch/onnxruntime versions into the cache of
:mod:`pipeline.encoders.onnx_cache` (atomic, under its lock: actors starting together share one
export), and checked against the PyTorch encoder before use on seeded images in batches of other
sizes than the trace's: ``max |onnx - torch| <= TOLERANCE * max(1, max |torch|)`` (relative to the
largest output, since EfficientNet-Lite0's pooled features reach ~6 while open_clip's are unit
vectors). Measured: 3e-6 relative (1.6e-5 absolute on outputs of magnitude 5.7) for
EfficientNet-Lite0, so the features of both backends carry the same model id.

Why: on two cores the exported EfficientNet-Lite0 encodes about 3x more images per second than
PyTorch (``make bench-extract``; README, Benchmarks).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from pathlib import Path

import numpy as np

from pipeline.encoders import onnx_cache

LOG = logging.getLogger(__name__)

__all__ = ["OnnxImageEncoder", "onnx_image_encoder", "TOLERANCE", "check_images"]

#: largest allowed ``max |onnx - torch| / max(1, max |torch|)`` on the check images
TOLERANCE = 1e-4
_FORMAT = 2  # bump when the exported graph changes (2: static "same" padding)
#: the trace's batch size, and the batch sizes the export is checked with (other than the trace's,
#: so a batch size frozen into the graph would show)
TRACE_BATCH = 2
CHECK_BATCHES = (1, 3)


class OnnxImageEncoder:
    """Encodes uint8 ``(n, H, W, 3)`` batches into float32 ``(n, dim)`` features with an ONNX Runtime
    session (the interface of :class:`pipeline.encoders.image.ImageEncoder`)."""

    backend = "onnx"
    device = "cpu"

    def __init__(self, sess, *, model_id: str, dim: int, image_size: int, normalize: bool) -> None:
        self.session, self.model_id, self.dim, self.image_size = sess, model_id, dim, image_size
        self.normalize = normalize
        self._input = sess.get_inputs()[0].name

    def encode(self, images: np.ndarray) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected (n, H, W, 3) uint8 images, got shape {images.shape}")
        if len(images) == 0:
            return np.zeros((0, self.dim), np.float32)
        if images.shape[1:3] != (self.image_size, self.image_size):
            raise ValueError(f"expected {self.image_size}x{self.image_size} images, got {images.shape[1:3]}")
        x = np.ascontiguousarray(images, dtype=np.uint8)
        return np.asarray(self.session.run(None, {self._input: x})[0], np.float32)


def check_images(size: int, n: int, *, seed: int = 0) -> np.ndarray:
    """``n`` seeded uint8 images unlike each other: noise, smooth gradients, flat colours (the export's
    check inputs)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        kind = i % 3
        if kind == 0:
            out[i] = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        elif kind == 1:
            c = rng.uniform(0.2, 1.0, 3).astype(np.float32)
            img = (ramp[:, None, None] * c + ramp[None, :, None] * (1 - c)) / 1.0
            out[i] = np.clip(img + rng.normal(0, 8, (size, size, 3)), 0, 255).astype(np.uint8)
        else:
            out[i] = rng.integers(0, 256, 3, dtype=np.uint8)
    return out


def onnx_image_encoder(encoder, *, threads: int | None = None, spinning: bool = True) -> OnnxImageEncoder:
    """The PyTorch image ``encoder`` (:class:`pipeline.encoders.image.ImageEncoder`, on the CPU) on ONNX
    Runtime with ``threads`` intra-op threads (``spinning``: :func:`pipeline.encoders.onnx_cache.session`);
    exported and checked on first use, then cached.
    Raises :class:`pipeline.encoders.onnx_cache.OnnxExportError` when the export fails or disagrees."""
    if encoder.device != "cpu":
        raise ValueError(f"the ONNX image path exports a CPU model, not one on {encoder.device!r}")
    net = encoder.export_module()
    safe = encoder.model_id.replace("/", "_").replace(":", "_").replace("@", "_")
    name = f"image-{safe}-{_key(encoder, net)}.onnx"

    def build(path: Path) -> OnnxImageEncoder:
        sess = onnx_cache.session(path, threads, spinning=spinning)
        return OnnxImageEncoder(sess, model_id=encoder.model_id, dim=encoder.dim, image_size=encoder.image_size,
                                normalize=encoder.normalize)

    return onnx_cache.cached_export(name, export=lambda path: _export(encoder, net, path), build=build,
                                    check=lambda enc: max_rel_diff(encoder, enc), tolerance=TOLERANCE,
                                    what=f"image encoder {encoder.model_id}", log=LOG)


def max_rel_diff(reference, candidate, images: np.ndarray | None = None) -> float:
    """``max |candidate - reference| / max(1, max |reference|)`` over ``images`` (default: the check
    images, in batches of :data:`CHECK_BATCHES`)."""
    if images is None:
        total = sum(CHECK_BATCHES)
        images = check_images(reference.image_size, total, seed=1)
        batches = np.split(images, np.cumsum(CHECK_BATCHES)[:-1])
    else:
        batches = [images]
    diff = 0.0
    for x in batches:
        want, got = reference.encode(x), candidate.encode(x)
        if got.shape != want.shape:
            raise ValueError(f"ONNX output shape {got.shape}, PyTorch {want.shape}")
        diff = max(diff, float(np.abs(got - want).max()) / max(1.0, float(np.abs(want).max())))
    return diff


def _key(encoder, net) -> str:
    """What the exported file depends on: weights (each tensor's shape, sum and first/last bytes),
    preprocessing, image size, the graph's format and the torch/onnxruntime versions."""
    import onnxruntime
    import torch

    h = hashlib.sha256()
    h.update(f"format={_FORMAT} torch={torch.__version__} ort={onnxruntime.__version__} id={encoder.model_id} "
             f"size={encoder.image_size} norm={encoder.normalize} "
             f"mean={encoder.mean} std={encoder.std}".encode())
    with torch.no_grad():
        for k, t in net.state_dict().items():
            t = t.detach().cpu().contiguous()
            h.update(f"{k}:{tuple(t.shape)}:{t.dtype}:{float(t.double().sum()) if t.numel() else 0!r}".encode())
            raw = t.reshape(-1).to(torch.uint8) if t.dtype == torch.bool else t.reshape(-1).view(torch.uint8)
            h.update(raw[:4096].numpy().tobytes())
            h.update(raw[-4096:].numpy().tobytes())
    return h.hexdigest()[:20]


def _export(encoder, net, path: Path) -> None:
    """Export pixels -> features of ``encoder`` (its network ``net``) to ``path``, atomically."""
    import torch

    graph = _graph(_static_padding(net, encoder.image_size), encoder.mean, encoder.std, encoder.normalize).eval()
    x = torch.from_numpy(check_images(encoder.image_size, TRACE_BATCH, seed=0))
    axes = {"pixels": {0: "batch"}, "features": {0: "batch"}}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused inference kernel has no ONNX form
    try:
        with onnx_cache.export_to(path) as tmp, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on Python-level branches; the result is checked
            torch.onnx.export(graph, (x,), tmp, input_names=["pixels"], output_names=["features"], dynamic_axes=axes,
                              opset_version=17, dynamo=False)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


def _static_padding(net, image_size: int):
    """``net``, or a copy whose TensorFlow-style "same" convolutions (timm's ``Conv2dSame``, which pad by
    the input's size at run time: shape arithmetic and a separate Pad in the exported graph) pad by the
    sizes they see at ``image_size`` (the exported graph's only size): the same numbers, and ONNX Runtime
    folds the padding into the convolution (EfficientNet-Lite0: 1.36x the images per second)."""
    import copy

    import torch

    try:
        from timm.layers.conv2d_same import Conv2dSame
        from timm.layers.padding import pad_same_arg
    except ImportError:  # no timm model, nothing to fix
        return net
    names = [n for n, m in net.named_modules() if isinstance(m, Conv2dSame)]
    if not names:
        return net
    net, sizes = copy.deepcopy(net), {}
    hooks = [net.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: sizes.__setitem__(n, list(args[0].shape[-2:]))) for n in names]
    try:
        with torch.no_grad():
            net(torch.zeros(1, 3, image_size, image_size))
    finally:
        for h in hooks:
            h.remove()

    class _PaddedConv(torch.nn.Module):
        def __init__(self, conv, pad) -> None:
            super().__init__()
            self.conv, self.pad = conv, torch.nn.ZeroPad2d(pad)

        def forward(self, x):
            c = self.conv
            return torch.nn.functional.conv2d(self.pad(x), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)

    for n in names:
        conv = net.get_submodule(n)
        parent, _, attr = n.rpartition(".")
        pad = pad_same_arg(sizes[n], list(conv.weight.shape[-2:]), list(conv.stride), list(conv.dilation))
        setattr(net.get_submodule(parent) if parent else net, attr, _PaddedConv(conv, pad))
    return net


def _graph(net, mean, std, normalize: bool):
    """The module exported: what :meth:`ImageEncoder.encode` computes on the CPU, as one forward."""
    import torch

    class _PixelsToFeatures(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

        def forward(self, pixels):
            x = pixels.permute(0, 3, 1, 2).float().div(255.0).sub(self.mean).div(self.std)
            out = self.net(x)
            return torch.nn.functional.normalize(out, dim=-1) if normalize else out

    return _PixelsToFeatures()
