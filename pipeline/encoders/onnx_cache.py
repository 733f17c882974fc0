"""Models exported to ONNX once, cached, checked against PyTorch before use: what the text path
(:mod:`pipeline.encoders.text_onnx`) and the image path (:mod:`pipeline.encoders.image_onnx`) share.

Cache: ``$ZSL_CACHE_DIR/onnx/`` (default ``~/.cache/zsl-pipeline/onnx/``; a per-user folder in the
temp dir where that cannot be written). Each file is named by the model and a key of what went
into it (weights, format, torch and onnxruntime versions), written atomically under one lock file,
so processes starting together (Ray actors, Serve replicas) take turns: one exports, the others then
load its file. Before use, the loaded file is checked against PyTorch; a torn or disagreeing file is
exported again once, then refused (:class:`OnnxExportError`), and the caller decides what to fall back on.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Callable, TypeVar

from pipeline.core import fs as zio

LOG = logging.getLogger(__name__)

__all__ = ["OnnxExportError", "onnx_available", "cache_dir", "usable_cache", "session", "cached_export"]

T = TypeVar("T")


class OnnxExportError(ValueError):
    """The export cannot be used: it failed, or it disagrees with PyTorch beyond the tolerance."""


def onnx_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def cache_dir() -> Path:
    root = os.environ.get("ZSL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "zsl-pipeline")
    return Path(root) / "onnx"


def usable_cache() -> Path:
    """The cache directory, or a per-user one under the temp dir where it cannot be written."""
    d = cache_dir()
    try:
        d.mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return d
    except OSError:
        pass
    alt = Path(tempfile.gettempdir()) / f"zsl-onnx-{os.getuid()}"
    LOG.warning("%s cannot be written; the ONNX export is cached in %s (set ZSL_CACHE_DIR)", d, alt)
    alt.mkdir(parents=True, exist_ok=True)
    return alt


def session(path: Path, threads: int | None, *, spinning: bool = True):
    """An ONNX Runtime CPU session on ``path``: ``threads`` intra-op threads (None or 0: one per core),
    one inter-op thread; ``spinning=False``: idle pool threads sleep at once instead of spinning a
    moment first (for processes that share their cores with other work: in the 2-core extraction
    pipeline, beside decode tasks, 153 vs 143 images/s and 10 % less CPU, medians of 3)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = int(threads or 0)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spinning:
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def cached_export(file_name: str, *, export: Callable[[Path], None], build: Callable[[Path], T],
                  check: Callable[[T], float], tolerance: float, what: str, log: logging.Logger = LOG) -> T:
    """``build(path)`` of the cached export ``file_name``, made by ``export(path)`` where missing.

    ``export`` writes the ONNX file to the path it is given (atomically: :func:`export_to`);
    ``check`` returns the disagreement of the built object with PyTorch, which must be ``<= tolerance``.
    Raises :class:`OnnxExportError` when a fresh export fails or disagrees."""
    import fcntl

    d = usable_cache()
    with open(d / "export.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        zio.remove_temp_files(str(d))  # left by a process killed while exporting (none runs now)
        return _load_checked(d / file_name, export=export, build=build, check=check, tolerance=tolerance,
                             what=what, log=log)


def _load_checked(path: Path, *, export, build, check, tolerance: float, what: str, log: logging.Logger):
    for attempt in (0, 1):
        fresh = not path.exists()
        if fresh:
            log.info("exporting the %s to ONNX: %s", what, path)
            _export(export, path, what)
        try:
            built = build(path)
            diff = check(built)
        except Exception as exc:  # noqa: BLE001 - a torn or foreign cache file: export again
            path.unlink(missing_ok=True)
            if fresh or attempt:
                raise OnnxExportError(f"ONNX export of the {what} cannot be loaded ({type(exc).__name__}: "
                                      f"{exc})") from exc
            log.warning("%s unusable (%s: %s); exporting again", path, type(exc).__name__, exc)
            continue
        if diff <= tolerance:
            log.info("%s on ONNX Runtime (%s; max |onnx - torch| %.2e on the check inputs, bound %g)", what,
                     path.name, diff, tolerance)
            return built
        path.unlink(missing_ok=True)
        if fresh or attempt:
            raise OnnxExportError(f"ONNX export of the {what} differs from PyTorch by {diff:.2e} (> {tolerance})")
        log.warning("%s differs from the model by %.2e; exporting again", path, diff)
    raise AssertionError("unreachable")


def _export(export: Callable[[Path], None], path: Path, what: str) -> None:
    try:
        export(path)
    except Exception as exc:  # noqa: BLE001 - the exporter's own errors are many and varied
        path.unlink(missing_ok=True)
        raise OnnxExportError(f"ONNX export of the {what} failed ({type(exc).__name__}: {exc})") from exc


def export_to(path: Path):
    """A temp path beside ``path`` to export to, renamed into place when the block ends without error."""
    return zio.atomic_local_file(str(path))
