"""Image work apart: decoding and encoding query images, and making thumbnails, run on their own few
threads at a lower CPU priority, so that text queries and ``/health`` neither queue behind them nor
lose the cores to them. Image queries are bounded (a 503 with ``Retry-After`` past the bound);
thumbnails queue (a thumbnail request waits without holding a thread)."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from fastapi import HTTPException

from pipeline.core.config import ServeConfig

LOG = logging.getLogger(__name__)

T = TypeVar("T")


def lower_priority(nice: int) -> None:
    """Raise the calling thread's nice value by ``nice`` (at most 19): on Linux the nice value is a
    thread's own, so the rest of the process keeps its priority. A no-op where the OS refuses."""
    if nice <= 0:
        return
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed
        LOG.debug("cannot lower the priority of thread %s: %s", threading.current_thread().name, exc)


class ImagePool:
    """``workers`` threads for image queries and at most ``queue`` more waiting (past that, a 503
    with ``Retry-After``; the request is not queued); ``thumbnail_workers`` threads for thumbnails.
    All of them run ``nice`` steps below the rest of the process (0: the same priority)."""

    def __init__(self, workers: int, queue: int, *, thumbnail_workers: int = 2, nice: int = 0):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="zsl-image-query", initializer=lower_priority,
                                        initargs=(nice,))
        self._slots = threading.BoundedSemaphore(workers + queue)
        self._thumbnails = ThreadPoolExecutor(thumbnail_workers, thread_name_prefix="zsl-thumbnail",
                                              initializer=lower_priority, initargs=(nice,))

    @classmethod
    def of(cls, cfg: ServeConfig) -> "ImagePool":
        """The pool ``cfg`` asks for (``image_workers``, ``image_queue``, ``thumbnail_workers``, ``background_nice``)."""
        return cls(cfg.image_workers, cfg.image_queue, thumbnail_workers=cfg.thumbnail_workers, nice=cfg.background_nice)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` (an image query) on a pool thread, awaited without holding an event-loop or threadpool thread."""
        if not self._slots.acquire(blocking=False):
            raise HTTPException(503, "too many image queries at once; retry shortly", headers={"Retry-After": "1"})
        try:
            return await asyncio.wrap_future(self._pool.submit(fn))
        finally:
            self._slots.release()

    async def thumbnail(self, fn: Callable[[], T]) -> T:
        """``fn()`` (a thumbnail) on a thumbnail thread, awaited without holding any thread."""
        return await asyncio.wrap_future(self._thumbnails.submit(fn))
