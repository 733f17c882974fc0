"""The service follows its indexes: each served index is a :class:`Served` version, and an
:class:`IndexWatcher` swaps in the next one when ``zsl index`` (or ``zsl label``) finishes a new one.

A version is named by its manifests (:func:`pipeline.index.store.index_version`; the labels'
manifest too when predicted labels are served). The watcher polls them every
``reload_interval_s`` seconds and on :meth:`IndexWatcher.check` (``zsl serve`` calls it on
SIGHUP). A new version is loaded beside the old one, in the watcher's thread; then one
assignment makes it the one new requests get. A request takes its :class:`Served` once, at its
start, and uses only that (searcher, text batcher, ids), so no answer mixes two versions and a
request in flight finishes on the old one; the old one is released when its last request
drops it (its files stay mapped until then: index writers replace files by rename, never
rewrite them in place). A version that fails to load keeps the old one serving: ``/health`` says
``degraded`` with the reason, ``/metrics`` counts the failure, and the same version is not tried
again until its manifests change. An index being written (no ``manifest.json`` yet) is left alone.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Callable

from pipeline.core.manifests import LabelsManifest, read_manifest
from pipeline.core.serve_config import ServeConfig
from pipeline.index.searcher import PredictedLabels, Searcher
from pipeline.index.store import index_version, version_on_disk
from pipeline.stages.serve.batching import TextBatcher, text_workers

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Served:
    """One loaded version of a served index: what a request uses from its start to its answer."""

    name: str
    searcher: Searcher
    batcher: TextBatcher
    version: str  # index_version of the index (what /indices and replies show)
    key: tuple[str, str | None]  # (index version, labels version): a change of either is a new version
    loaded_at: float  # time.time() when it was loaded


def serve_searcher(cfg: ServeConfig, name: str, s: Searcher) -> Served:
    """``s`` (loaded) ready to serve as index ``name``: its image-pixel limit, the predicted labels
    ``cfg.labels`` names, the filters' id sets, and a text batcher of its own."""
    s.max_image_pixels = cfg.max_image_pixels
    lver = None
    if name in cfg.labels:
        LOG.info("predicted labels of index %s from %s", name, cfg.labels[name])
        s.labels = PredictedLabels(cfg.labels[name], s.manifest)
        lver = labels_version(cfg.labels[name])
    s.prepare_filters()  # label id sets and large sets' copies now, not on the first filtered query
    batcher = TextBatcher(s, cache_size=cfg.query_cache, workers=text_workers(cfg), max_batch=cfg.text_batch)
    ver = index_version(s.manifest, s.captions_manifest)
    return Served(name=name, searcher=s, batcher=batcher, version=ver, key=(ver, lver), loaded_at=time.time())


def load_searcher(cfg: ServeConfig, index_dir: str, *, like: Searcher | None = None) -> Searcher:
    """The index at ``index_dir`` loaded as ``zsl serve`` loads it; ``like``: the version it
    replaces, whose loaded text and image encoders it takes over when it uses the same ones."""
    s = Searcher(index_dir, load_text=False, text_backend=cfg.text_backend,
                 text_threads=1 if text_workers(cfg) > 1 else None, image_threads=cfg.image_threads or None)
    if like is not None:
        s.adopt_encoders(like)
    if cfg.preload_text:
        s.encoder  # noqa: B018 - loaded before it serves
    return s


def labels_version(labels_dir: str) -> str:
    """The version of a ``zsl label`` output (its manifest's content)."""
    return read_manifest(labels_dir, LabelsManifest).version()


class IndexWatcher:
    """Polls the served indexes' manifests and swaps in new versions (see the module's docstring).

    ``served``: the current versions, name -> :class:`Served` (the dict is replaced, never
    changed in place: a reader's snapshot stays whole). ``errors``: name -> why its newest version
    is not served. ``on_swap(old, new)`` and ``on_failure(name)`` report to the metrics."""

    def __init__(self, cfg: ServeConfig, served: dict[str, Served], *,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.served = dict(served)
        self.errors: dict[str, str] = {}
        self.reloads = {n: 0 for n in served}
        self.on_failure = on_failure
        self._failed: dict[str, tuple] = {}  # name -> the key that failed (not tried again)
        self._lock = threading.Lock()  # one check at a time
        self._wake = threading.Event()
        self._retry = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._retired: list[weakref.ref] = []  # replaced searchers not yet freed (see _sweep)
        self._sweeps = 0  # full collections tried since the last swap

    def get(self, name: str) -> Served | None:
        return self.served.get(name)

    def start(self) -> None:
        """Poll every ``reload_interval_s`` seconds in a daemon thread (0: only on :meth:`wake`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, daemon=True, name="zsl-index-watcher")
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def wake(self, retry: bool = True) -> None:
        """Check now (SIGHUP), ``retry``: versions that failed to load too; safe from a signal
        handler (it only sets flags)."""
        self._retry = self._retry or retry
        self._wake.set()

    def _loop(self) -> None:
        interval = self.cfg.reload_interval_s or None
        while not self._stop.is_set():
            # while a replaced version waits for its last requests, look again within a second
            self._wake.wait(min(interval or 1.0, 1.0) if self._retired else interval)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                retry, self._retry = self._retry, False
                self.check(retry=retry)
                self._sweep()
            except Exception:  # noqa: BLE001 - a watcher that dies would stop following the indexes
                LOG.exception("checking the served indexes failed")

    def check(self, retry: bool = False) -> list[str]:
        """Load and swap in every served index whose manifests changed (``retry``: and those whose
        newest version failed to load); the names swapped."""
        swapped = []
        with self._lock:
            if retry:
                self._failed.clear()
            for name, cur in list(self.served.items()):
                if self._follow(name, cur):
                    swapped.append(name)
        if swapped:
            self._sweep()
        return swapped

    def _sweep(self) -> None:
        """Free the replaced versions whose last request has ended. Their objects sit in reference
        cycles (an id table's row-group cache refers to the table), which only a full collection
        frees, and ``zsl serve`` hides the objects loaded at start from the collector (``gc.freeze``,
        :func:`~.runner.frozen`); so: unfreeze, collect, freeze again, while replaced versions remain."""
        if not self._retired:
            return
        self._sweeps += 1
        if self._sweeps > 10:  # each costs a full collection (~0.5 s on a loaded server): give up
            LOG.warning("%d replaced index version(s) are still referenced after 10 collections; they are "
                        "freed when their last reference goes", len(self._retired))
            self._retired = []
            return
        frozen = gc.get_freeze_count() > 0
        if frozen:
            gc.unfreeze()
        gc.collect()
        if frozen:
            gc.freeze()
        self._retired = [r for r in self._retired if r() is not None]

    def _key(self, name: str, index_dir: str) -> tuple | None:
        """The current (index, labels) version key on disk, None while the index is being written."""
        try:
            lab = self.cfg.labels.get(name)
            return version_on_disk(index_dir), (labels_version(lab) if lab else None)
        except FileNotFoundError:
            return None

    def _follow(self, name: str, cur: Served) -> bool:
        index_dir = cur.searcher.index_dir
        key = self._key(name, index_dir)
        if key is None or key == cur.key or key == self._failed.get(name):
            return False
        LOG.info("index %s: new version %s (serving %s); loading it", name, key[0], cur.version)
        try:
            new = serve_searcher(self.cfg, name, load_searcher(self.cfg, index_dir, like=cur.searcher))
        except Exception as exc:  # noqa: BLE001 - the old version keeps serving; /health says why
            if self._key(name, index_dir) != key:  # written while we read it: try the finished one next time
                LOG.info("index %s changed while loading; trying again", name)
                return False
            self._failed[name] = key
            self.errors[name] = f"version {key[0]} failed to load ({type(exc).__name__}: {exc}); serving {cur.version}"
            LOG.error("index %s: %s", name, self.errors[name])
            if self.on_failure:
                self.on_failure(name)
            return False
        self.served = {**self.served, name: new}  # one assignment: new requests get the new version
        self.errors.pop(name, None)
        self._failed.pop(name, None)
        self.reloads[name] = self.reloads.get(name, 0) + 1
        cur.batcher.close()  # its queued texts are still answered; later ones are encoded by the caller
        self._retired.append(weakref.ref(cur.searcher))
        self._sweeps = 0
        LOG.info("index %s: now serving version %s (%d vectors)", name, new.version, new.searcher.index.ntotal)
        return True
