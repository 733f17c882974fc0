"""Filesystem helpers over fsspec: URIs, atomic writes, manifests.

Every output file is written to a temporary name beside its final name and renamed into place,
so a reader never sees a partial file and a killed job leaves nothing that looks finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import io as _io
import json
import logging
import os
import time
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np

LOG = logging.getLogger(__name__)

__all__ = [
    "filesystem",
    "join",
    "exists",
    "makedirs",
    "list_files",
    "read_bytes",
    "write_bytes_atomic",
    "write_json_atomic",
    "read_json",
    "to_jsonable",
    "absolute_uri",
    "fingerprint",
    "TMP_PREFIX",
    "remove",
    "remove_temp_files",
    "output_lock",
    "OutputLocked",
    "write_npy_atomic",
    "read_npy",
    "sha256_file",
    "atomic_local_file",
    "local_path",
    "is_local",
]

TMP_PREFIX = "._tmp-"


def is_local(uri: str) -> bool:
    """True when ``uri`` is on the local filesystem (a path or ``file://``), not an object store."""
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Return ``(fs, path)`` for a local path or any fsspec URI."""
    fs, path = fsspec.core.url_to_fs(str(uri))
    return fs, path


def join(base: str, *parts: str) -> str:
    base = str(base)
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)


def _protocol_prefix(uri: str) -> str:
    return "" if "://" not in str(uri) else str(uri).split("://", 1)[0] + "://"


def list_files(uri: str, suffixes: tuple[str, ...] | None = None, recursive: bool = True) -> list[str]:
    """Sorted file URIs under ``uri`` (skipping temporary and hidden files)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or directory")
    if fs.isfile(path):
        found = [path]
    elif recursive:
        found = fs.find(path)
    else:
        found = [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
    prefix = _protocol_prefix(uri)
    out = []
    base = path.rstrip("/")
    for p in sorted(found):
        rel = p[len(base):] if p.startswith(base) else p.rsplit("/", 1)[-1]
        if any(part.startswith(".") for part in rel.split("/") if part):
            continue  # hidden files and folders (.ipynb_checkpoints, temp files of atomic writes)
        name = p.rsplit("/", 1)[-1]
        if suffixes and not name.lower().endswith(suffixes):
            continue
        out.append(prefix + p if prefix and not p.startswith(prefix) else p)
    return out


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return f.read()


def _tmp_name(path: str) -> str:
    head, _, tail = path.rpartition("/")
    return f"{head}/{TMP_PREFIX}{uuid.uuid4().hex[:8]}-{tail}" if head else f"{TMP_PREFIX}{tail}"


def _commit(fs: fsspec.AbstractFileSystem, tmp: str, path: str) -> None:
    if isinstance(fs, LocalFileSystem):
        os.replace(tmp, path)  # atomic on POSIX
    else:
        fs.mv(tmp, path)  # object stores: the final key appears in one PUT/copy


def write_bytes_atomic(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = _tmp_name(path)
    try:
        with fs.open(tmp, "wb") as f:
            f.write(data)
            if hasattr(f, "flush"):
                f.flush()
            if hasattr(f, "fileno"):
                try:
                    os.fsync(f.fileno())
                except (OSError, ValueError, AttributeError, NotImplementedError):
                    pass
        _commit(fs, tmp, path)
    except BaseException:
        if fs.exists(tmp):
            fs.rm(tmp)
        raise


@contextlib.contextmanager
def atomic_local_file(uri: str, suffix: str = ""):
    """Yield a local path to write ``uri``'s content to (by any library); commit it atomically on exit.

    Local outputs: a temp file beside the final name, fsynced and renamed into place. Other
    filesystems: a local temp file uploaded to a temp key, then moved. On error nothing is committed.
    Lets libraries that write files themselves (faiss) stream to disk without an in-memory copy.
    """
    import tempfile

    fs, path = filesystem(uri)
    local = isinstance(fs, LocalFileSystem)
    parent = path.rpartition("/")[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if local:
        tmp = _tmp_name(path)
    else:
        fd, tmp = tempfile.mkstemp(suffix=suffix, prefix=TMP_PREFIX)
        os.close(fd)
    try:
        yield tmp
        if local:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _commit(fs, tmp, path)
        else:
            remote_tmp = _tmp_name(path)
            fs.put_file(tmp, remote_tmp)
            _commit(fs, remote_tmp, path)
    finally:
        if os.path.exists(tmp) and (not local or tmp != path):
            os.remove(tmp)


def local_path(uri: str, cache_dir: str | None = None) -> str:
    """A local filesystem path holding ``uri``'s bytes: the path itself when local, else a copy
    downloaded (atomically) as ``cache_dir/<name>`` (default: a temp dir per URI), reused while its size matches."""
    import tempfile

    fs, path = filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        return path
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "zsl-cache", hashlib.sha256(uri.encode()).hexdigest()[:16])
    target = os.path.join(cache_dir, path.rsplit("/", 1)[-1])
    if os.path.exists(target) and os.path.getsize(target) == fs.size(path):
        return target
    os.makedirs(cache_dir, exist_ok=True)
    tmp = _tmp_name(target)
    fs.get_file(path, tmp)
    os.replace(tmp, target)
    return target


def write_json_atomic(uri: str, obj: Any) -> None:
    write_bytes_atomic(uri, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def read_json(uri: str) -> Any:
    try:
        return json.loads(read_bytes(uri))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri}: not valid JSON ({exc})") from None


def to_jsonable(obj: Any) -> Any:
    """``obj`` as ``json.loads`` of its JSON (tuples become lists, keys strings): how it reads back."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def absolute_uri(uri: str) -> str:
    """A local path made absolute (so a manifest means the same from any working directory);
    URIs with a scheme (``s3://``, ``file://``, ``memory://``) are returned unchanged.

    >>> absolute_uri("s3://bucket/x")
    's3://bucket/x'
    >>> absolute_uri("/data/x/")
    '/data/x'
    """
    text = str(uri)
    if "://" in text:
        return text
    return os.path.abspath(os.path.expanduser(text))


def fingerprint(obj: Any) -> str:
    """Short stable hash of a JSON-able object (configs, class sets)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def remove(uri: str) -> None:
    """Remove a file or a directory tree; nothing if it does not exist."""
    fs, path = filesystem(uri)
    if fs.exists(path):
        fs.rm(path, recursive=True)


def remove_temp_files(uri: str) -> int:
    """Delete the temporary files (``._tmp-*``) a killed writer left under ``uri``; return how many.

    Only call this while holding :func:`output_lock` on the output: a live writer's temp file
    would be removed under it.
    """
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return 0
    stale = [p for p in fs.find(path) if p.rsplit("/", 1)[-1].startswith(TMP_PREFIX)]
    for p in stale:
        fs.rm(p)
    if stale:
        LOG.info("%s: removed %d temporary file(s) left by an interrupted run", uri, len(stale))
    return len(stale)


class OutputLocked(ValueError):
    """Another job is writing to the same output directory."""


@contextlib.contextmanager
def output_lock(uri: str, *, name: str = ".zsl.lock", wait_s: float = 0.0, what: str = "zsl job"):
    """Hold an exclusive lock on an output directory for the duration of a job (local paths).

    The lock is an ``flock`` on ``<uri>/<name>``: the kernel drops it when the process dies,
    SIGKILL included, so a killed job never leaves a stale lock. Held by another process, it is
    waited for up to ``wait_s`` seconds, then :class:`OutputLocked` names the holder's pid. Other
    filesystems (object stores) have no such lock; there, one job per output directory is the caller's rule.
    """
    fs, path = filesystem(uri)
    if not isinstance(fs, LocalFileSystem):
        yield
        return
    import fcntl

    os.makedirs(path, exist_ok=True)
    fd = os.open(os.path.join(path, name), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    waited = f" (waited {wait_s:g} s)" if wait_s else ""
                    raise OutputLocked(f"{uri}: another {what} (pid {holder}) is writing to this output{waited}; "
                                       "wait for it or use another --output") from None
                time.sleep(min(0.5, max(0.01, deadline - time.monotonic())))
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_names(uri: str, key: str) -> list[str]:
    """Names from a file: one per line (blank lines and ``#`` comments skipped), or, for ``.json``, a list or
    a dict with a ``key`` list (as ``splits.json`` files hold ``seen`` and ``unseen``). ValueError naming the
    file when the dict has no such list."""
    text = read_bytes(uri).decode()
    if uri.endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            if key not in data:
                raise ValueError(f"{uri}: no '{key}' list in the JSON file")
            data = data[key]
        return [str(x) for x in data]
    return [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]


def write_npy_atomic(uri: str, array: np.ndarray) -> None:
    """Write a numeric array as ``.npy`` (never with pickled objects), atomically."""
    a = np.asarray(array)
    if a.dtype.hasobject:
        raise TypeError(f"{uri}: refusing to write an object array")
    buf = _io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    write_bytes_atomic(uri, buf.getvalue())


def read_npy(uri: str) -> np.ndarray:
    """Read a ``.npy`` file without ever unpickling (``allow_pickle=False``); ValueError if broken."""
    data = read_bytes(uri)
    try:
        return np.load(_io.BytesIO(data), allow_pickle=False)
    except (ValueError, EOFError, OSError) as exc:
        raise ValueError(f"{uri}: not a readable .npy array ({exc})") from None


def sha256_file(uri: str, chunk: int = 1 << 20) -> str:
    fs, path = filesystem(uri)
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


