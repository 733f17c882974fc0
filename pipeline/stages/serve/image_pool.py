"""Image queries apart: decoding and encoding a query image runs on its own few threads, with a
bounded number waiting, so that text queries and ``/health`` never queue behind image queries."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from fastapi import HTTPException

T = TypeVar("T")


class ImagePool:
    """``workers`` threads for image queries and at most ``queue`` more waiting; past that, a 503
    with ``Retry-After`` (the request is not queued)."""

    def __init__(self, workers: int, queue: int):
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="zsl-image-query")
        self._slots = threading.BoundedSemaphore(workers + queue)

    async def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on a pool thread, awaited without holding an event-loop or threadpool thread."""
        if not self._slots.acquire(blocking=False):
            raise HTTPException(503, "too many image queries at once; retry shortly", headers={"Retry-After": "1"})
        try:
            return await asyncio.wrap_future(self._pool.submit(fn))
        finally:
            self._slots.release()
