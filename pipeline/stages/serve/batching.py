"""Text queries of concurrent requests encoded together, with an LRU cache of query vectors."""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections import OrderedDict
from concurrent.futures import Future

import numpy as np

from pipeline.core.timing import timed
from pipeline.index.searcher import Searcher

LOG = logging.getLogger(__name__)

def text_workers(cfg) -> int:
    """Threads encoding text queries (a :class:`~pipeline.core.config.ServeConfig`'s
    ``text_workers``, or one per core, at most 4)."""
    return cfg.text_workers or min(4, os.cpu_count() or 1)


QueryPair = tuple[np.ndarray, np.ndarray | None]  # (image-space query, caption query or None)


class TextBatcher:
    """Encodes the text queries of concurrent requests together: a request waits at most
    ``wait_ms`` for others, then one encoder call embeds up to ``max_batch`` texts. The query
    vectors of the last ``cache_size`` distinct texts are kept (an LRU cache): on CPU, embedding a
    query with its prompt templates costs far more than the index search, and query logs repeat.
    ``hits`` and ``misses`` count the cache's answers (``/metrics`` reports them)."""

    def __init__(self, searcher: Searcher, *, max_batch: int = 4, wait_ms: float = 2.0,
                 cache_size: int = 0, workers: int = 1) -> None:
        self.searcher, self.max_batch, self.wait = searcher, max_batch, wait_ms / 1000
        self.q: "queue.Queue[tuple[str, Future]]" = queue.Queue()
        self.cache: "OrderedDict[str, QueryPair]" = OrderedDict()
        self.cache_size, self.hits, self.misses = cache_size, 0, 0
        self.lock = threading.Lock()
        self._warmed = False
        self.workers, self.closed = workers, False
        self.threads = [threading.Thread(target=self._loop, daemon=True, name=f"zsl-text-batcher-{i}")
                        for i in range(workers)]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        """Stop the worker threads once the texts already queued are answered; a text asked for
        afterwards (a request that began before its index version was replaced) is encoded by
        the caller's thread."""
        with self.lock:
            self.closed = True
            for _ in range(self.workers):
                self.q.put(None)  # after every queued text: the queue is FIFO

    def encode(self, text: str) -> QueryPair:
        """``(image-space query (1, d), caption query or None)`` of a text."""
        key = text.strip()
        cached = self._cached(key)
        if cached is not None:
            return cached
        fut: Future = Future()
        with self.lock:
            closed = self.closed
            if not closed:
                self.q.put((key, fut))
        if closed:
            self._answer([(key, fut)])
        v = tuple(None if a is None else _frozen(a) for a in fut.result())  # not views into the batch's matrix
        if self.cache_size:
            with self.lock:
                self.cache[key] = v
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        return v

    def _cached(self, key: str) -> QueryPair | None:
        """The cached pair of ``key`` (counted as a hit), or None (counted as a miss)."""
        if not self.cache_size:
            return None
        with self.lock:
            v = self.cache.get(key)
            if v is None:
                self.misses += 1
                return None
            self.cache.move_to_end(key)
            self.hits += 1
            return v

    def _warm(self) -> None:
        """One encoder call before the workers run concurrently: the first call sets the fast
        tokenizer's padding/truncation state, which concurrent first calls would race on."""
        with self.lock:
            if not self._warmed:
                self.searcher.encoder.encode(["warm up"])
                self._warmed = True

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            self._answer(batch)

    def _answer(self, batch: list[tuple[str, Future]]) -> None:
        """Each request's pair from one encoder call; if that call fails, each text is encoded
        alone, so that a text the encoder cannot take fails only its own request."""
        try:
            pairs = self.searcher.text_query_pairs([t for t, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to the waiting request(s)
            if len(batch) == 1:
                batch[0][1].set_exception(exc)
                return
            LOG.warning("a batch of %d text queries failed (%s); encoding each alone", len(batch), exc)
            for one in batch:
                self._answer([one])
            return
        for (_, fut), (q_img, q_cap) in zip(batch, pairs):
            fut.set_result((q_img[None, :], q_cap))

    def _collect(self) -> list[tuple[str, Future]] | None:
        """The next batch: the first waiting request, then whatever arrives within ``wait``; None
        when the batcher is closed."""
        first = self.q.get()
        if first is None:
            return None
        batch = [first]
        try:
            self._warm()
        except Exception:  # noqa: BLE001 - reported to the requests by the encoder call that follows
            pass
        with timed() as t:
            while len(batch) < self.max_batch:
                left = self.wait - t.elapsed()
                if left <= 0:
                    break
                try:
                    nxt = self.q.get(timeout=left)
                except queue.Empty:
                    break
                if nxt is None:  # closing: leave the stop for a worker's next get
                    self.q.put(None)
                    break
                batch.append(nxt)
        return batch


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a
