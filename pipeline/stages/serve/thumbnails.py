"""``GET /images/{faiss_id}``: JPEG thumbnails of the images an index holds, made on first request
and cached on disk. Ids are integers, so no client path reaches the disk; and the uri an index holds
is read only where it is allowed to be:

- local files under the allowed roots (``thumbnail_roots``, by default the input folder each index's
  features were extracted from; a symlink out of a root is refused, as the root is compared after
  resolving), remote uris (http, s3, ...) only with ``thumbnail_remote: true``, within
  ``thumbnail_timeout_s``;
- at most ``thumbnail_max_bytes`` read, and the image's size checked against ``max_image_pixels``
  from its header before any pixel is decoded;
- the cache is a private folder (this user's, not writable by others; a per-user 0700 folder by
  default), files are opened without following symlinks, keyed by the index's version (its manifest
  sha), and kept under ``thumbnail_cache_mb`` by dropping the least recently used.

Replies never name the uri or a path: the log does.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from fastapi import HTTPException

from pipeline.core import fs as zio
from pipeline.core.config import ServeConfig
from pipeline.core.features import open_features
from pipeline.index.searcher import Searcher
from pipeline.inputs.images import FORMATS

LOG = logging.getLogger(__name__)

_REMOTE = ThreadPoolExecutor(max_workers=4, thread_name_prefix="zsl-thumbnail-fetch")
_CACHES: dict[str, "ThumbnailCache"] = {}
_CACHES_LOCK = threading.Lock()
_FEATURE_ROOTS: dict[Searcher, list[str] | None] = {}


class Refused(Exception):
    """This uri is not read for a thumbnail (the reason is logged, not replied)."""


def default_cache_dir() -> str:
    """A per-user cache folder: ``$XDG_CACHE_HOME`` or ``~/.cache``, else the temp dir with the uid."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if os.access(base, os.W_OK) or (not os.path.exists(base) and os.access(os.path.dirname(base), os.W_OK)):
        return os.path.join(base, "zsl-pipeline", "thumbnails")
    return os.path.join(tempfile.gettempdir(), f"zsl-thumbnails-{os.getuid()}")


def private_dir(path: str) -> str:
    """``path`` created 0700 if missing; a ``ValueError`` when it is a symlink, another user's, or
    writable by group or others (a shared cache could be filled with anything)."""
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ValueError(f"thumbnail cache {path} is not a plain folder")
    if st.st_uid != os.getuid():
        raise ValueError(f"thumbnail cache {path} belongs to uid {st.st_uid}, not this user ({os.getuid()})")
    if st.st_mode & 0o022:
        raise ValueError(f"thumbnail cache {path} is writable by group or others (mode {oct(st.st_mode & 0o777)})")
    return path


class ThumbnailCache:
    """JPEG files under one private folder, at most ``max_bytes`` in all (least recently used out)."""

    def __init__(self, root: str, *, max_bytes: int) -> None:
        self.root, self.max_bytes = private_dir(root), max_bytes
        self.lock = threading.Lock()
        self.total = sum(size for _, size, _ in self._files())

    def _files(self) -> list[tuple[str, int, float]]:
        out = []
        for dirpath, _dirs, files in os.walk(self.root, followlinks=False):
            for f in files:
                st = os.lstat(os.path.join(dirpath, f))
                if stat.S_ISREG(st.st_mode):
                    out.append((os.path.join(dirpath, f), st.st_size, st.st_mtime))
        return out

    def _path(self, version: str, name: str) -> str:
        folder = os.path.join(self.root, version)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        if os.path.islink(folder):
            raise ValueError(f"thumbnail cache folder {folder} is a symlink")
        return os.path.join(folder, name)

    def get(self, version: str, name: str) -> bytes | None:
        """The cached bytes (marking them used), or None; a symlink is never followed."""
        path = self._path(version, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError:  # ELOOP: a symlink planted in the cache is dropped, never read
            LOG.warning("thumbnail cache: %s is not a plain file; removed", path)
            os.unlink(path)
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read()
        os.utime(path)
        return data

    def put(self, version: str, name: str, data: bytes) -> None:
        """Write atomically (rename over any planted link), then evict down to the size bound."""
        zio.write_bytes_atomic(self._path(version, name), data)
        with self.lock:
            self.total += len(data)
            if self.total > self.max_bytes:
                self._evict()

    def _evict(self) -> None:
        files = sorted(self._files(), key=lambda f: f[2])
        self.total = sum(size for _, size, _ in files)
        for path, size, _ in files:
            if self.total <= self.max_bytes * 0.9:
                break
            os.unlink(path)
            self.total -= size
        LOG.info("thumbnail cache: evicted down to %.1f MB", self.total / 2**20)


def cache_for(config: ServeConfig) -> ThumbnailCache:
    """The process's cache of this config's folder (one per folder); a 503 when it is not private."""
    root = os.path.abspath(config.thumbnail_cache or default_cache_dir())
    with _CACHES_LOCK:
        if root not in _CACHES:
            try:
                _CACHES[root] = ThumbnailCache(root, max_bytes=int(config.thumbnail_cache_mb * 2**20))
            except ValueError as exc:
                LOG.error("%s", exc)
                raise HTTPException(503, "the thumbnail cache folder is not private; see the server log") from None
        return _CACHES[root]


def allowed_roots(s: Searcher, config: ServeConfig) -> list[str] | None:
    """Resolved local folders thumbnails of ``s`` may come from; None when nothing is known (then any
    local file the index names is read, as the index was built from it)."""
    if config.thumbnail_roots:
        return [os.path.realpath(r) for r in config.thumbnail_roots]
    with _CACHES_LOCK:  # the features' input folder: read from their manifest once per served index
        if s not in _FEATURE_ROOTS:
            _FEATURE_ROOTS[s] = _feature_input_root(s)
        return _FEATURE_ROOTS[s]


def _feature_input_root(s: Searcher) -> list[str] | None:
    try:
        source = open_features(s.manifest.features_dir).config.get("input") if s.manifest.features_dir else None
    except (FileNotFoundError, ValueError):
        source = None
    sources = [str(x) for x in source] if isinstance(source, (list, tuple)) else [str(source)] if source else []
    roots = []
    for src in sources:  # one input, or several (`zsl run`'s inputs)
        if not zio.is_local(src):
            continue
        path = src[7:] if src.startswith("file://") else src
        roots.append(os.path.realpath(path if os.path.isdir(path) else os.path.dirname(path)))
    return roots or None


def check_source(uri: str, *, roots: list[str] | None, remote: bool) -> str:
    """The container path of ``uri`` (``a.tar::member`` -> ``a.tar``) if it may be read; else Refused."""
    container = uri.split("::", 1)[0]
    if not zio.is_local(container):
        if not remote:
            raise Refused("remote uri and thumbnail_remote is off")
        return container
    path = os.path.realpath(container[7:] if container.startswith("file://") else container)
    if roots is not None and not any(os.path.commonpath([path, r]) == r for r in roots):
        raise Refused(f"outside the allowed roots {roots}")
    return path


def read_capped(uri: str, *, max_bytes: int, timeout: float, remote: bool) -> bytes:
    """At most ``max_bytes`` of ``uri`` (Refused when larger); a remote read gives up after ``timeout``."""
    def read() -> bytes:
        fs, path = zio.filesystem(uri)
        with fs.open(path, "rb") as f:
            data = f.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise Refused(f"larger than thumbnail_max_bytes ({max_bytes})")
        return data

    if not remote:
        return read()
    try:
        return _REMOTE.submit(read).result(timeout=timeout)
    except FutureTimeout:
        raise Refused(f"no answer within {timeout} s") from None


def cached_thumbnail(s: Searcher, name: str, faiss_id: int, *, size: int, config: ServeConfig) -> tuple[bytes, str]:
    """``(jpeg, version)``: the thumbnail (at most ``size`` pixels a side) of image ``faiss_id`` of
    index ``name`` and the index version it was made from; a 404 for an id the index does not hold
    or an image that is refused or cannot be read."""
    if not 0 <= faiss_id < s.manifest.ntotal:
        raise HTTPException(404, f"no image {faiss_id} in index {name!r} ({s.manifest.ntotal} images)")
    cache, version = cache_for(config), s.manifest.sha256[:16]
    key = f"{faiss_id}-{size}.jpg"
    data = cache.get(version, key)
    if data is None:
        uri = s.ids.take([faiss_id]).column("uri")[0].as_py()
        try:
            check_source(uri, roots=allowed_roots(s, config), remote=config.thumbnail_remote)
            raw = read_capped(uri, max_bytes=config.thumbnail_max_bytes, timeout=config.thumbnail_timeout_s,
                              remote=not zio.is_local(uri.split("::", 1)[0]))
            data = make_thumbnail(raw, size=size, max_pixels=config.max_image_pixels)
        except Exception as exc:  # noqa: BLE001 - refused, gone or broken: the client's 404, the log's detail
            LOG.warning("thumbnail of %s #%d (%s): %s: %s", name, faiss_id, uri, type(exc).__name__, exc)
            raise HTTPException(404, f"image {faiss_id} of index {name!r} has no thumbnail") from None
        cache.put(version, key, data)
    return data, version


def make_thumbnail(raw: bytes, *, size: int, max_pixels: int) -> bytes:
    """The image ``raw`` as a JPEG of at most ``size`` pixels a side; its header is checked against
    ``max_pixels`` before anything is decoded."""
    from PIL import Image

    with Image.open(io.BytesIO(raw), formats=FORMATS) as im:
        w, h = im.size
        if w * h > max_pixels:
            raise Refused(f"{w}x{h} pixels, more than max_image_pixels ({max_pixels})")
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


__all__ = ["cached_thumbnail", "make_thumbnail", "check_source", "read_capped", "ThumbnailCache", "private_dir",
           "default_cache_dir", "Refused"]
