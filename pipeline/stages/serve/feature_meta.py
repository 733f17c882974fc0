"""What clip-retrieval's clients show of a hit that the index's id table does not hold: the image's
own caption and source url, read from the indexed feature shards (faiss id ``i`` is row
``i - offset`` of one shard, in the index manifest's shard order, as for predicted labels)."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Callable

import numpy as np

from pipeline.core import parquet as zpq
from pipeline.core.features import feature_shards
from pipeline.index.searcher import Searcher

LOG = logging.getLogger(__name__)

#: columns read from the feature shards (those a shard lacks are left out)
COLUMNS = ("image_id", "caption", "url")


class FeatureMeta:
    """Caption and url of faiss ids from the feature shards of an index; checked by image id."""

    def __init__(self, features_dir: str, shards: list[str], ntotal: int) -> None:
        files = {f.rsplit("/", 1)[-1]: f for f in feature_shards(features_dir)}
        missing = [s for s in shards if s not in files]
        if missing:
            raise FileNotFoundError(f"{features_dir}: indexed shard(s) {', '.join(missing[:3])} not found")
        self.tables = []
        for s in shards:
            names = zpq.LazyParquet(files[s], cache_groups=1).schema.names
            self.tables.append(zpq.LazyParquet(files[s], cache_groups=4, columns=[c for c in COLUMNS if c in names]))
        counts = [t.num_rows for t in self.tables]
        if sum(counts) != ntotal:
            raise ValueError(f"{features_dir}: {sum(counts)} rows in the indexed shards, the index holds {ntotal}")
        self.starts = np.cumsum([0, *counts])
        self._lock = threading.Lock()

    def get(self, faiss_ids: list[int], image_ids: list[str]) -> list[dict]:
        """``{caption, url}`` per id (None where unknown, or where the shard row is another image)."""
        ids = np.asarray(faiss_ids, np.int64)
        shard = np.searchsorted(self.starts, ids, side="right") - 1
        found: dict[int, dict] = {}
        with self._lock:  # the row-group caches are not thread-safe
            for s in np.unique(shard):
                sel = np.flatnonzero(shard == s)
                found.update(zip(sel.tolist(), self.tables[s].take(ids[sel] - self.starts[s]).to_pylist()))
        out = []
        for i, image_id in enumerate(image_ids):
            row = found.get(i, {})
            ok = row.get("image_id") == image_id
            out.append({"caption": row.get("caption") if ok else None, "url": row.get("url") if ok else None})
        return out


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_CACHE_LOCK = threading.Lock()


def feature_meta(s: Searcher) -> FeatureMeta | None:
    """The :class:`FeatureMeta` of a searcher's index (opened once), or None when its feature
    directory is gone or does not match (hits then carry no caption or source url)."""
    with _CACHE_LOCK:
        if s not in _CACHE:
            m = s.manifest
            try:
                _CACHE[s] = FeatureMeta(m.features_dir, list(m.shards), m.ntotal) if m.features_dir else None
            except (OSError, ValueError) as exc:
                LOG.warning("%s: no captions or source urls for hits (%s)", s.index_dir, exc)
                _CACHE[s] = None
        return _CACHE[s]


def describe(s: Searcher, rows: list[dict], image_url: Callable[[int], str]) -> list[dict]:
    """clip-retrieval's view of hits or id-table rows (``faiss_id``, ``image_id``, ``uri``, ``label``,
    maybe ``predicted``): ``caption`` (the image's caption, else its label or predicted label, else
    ""), ``url`` (its http(s) source url or uri, else ``image_url(faiss_id)``: this server's thumbnail, which
    a browser can load where it cannot a local path; the uri itself is never shown), ``label``,
    ``predicted_label``, ``image_id``."""
    meta = feature_meta(s)
    extra = meta.get([r["faiss_id"] for r in rows], [r["image_id"] for r in rows]) if meta and rows else \
        [{}] * len(rows)
    return [{"caption": e.get("caption") or r.get("label") or r.get("predicted") or "",
             "url": _web_url(e.get("url")) or _web_url(r["uri"]) or image_url(r["faiss_id"]), "label": r.get("label"),
             "predicted_label": r.get("predicted"), "image_id": r["image_id"]} for r, e in zip(rows, extra)]


def _web_url(url: str | None) -> str | None:
    """``url`` where a browser can load it (http or https), else None."""
    return url if isinstance(url, str) and url.lower().startswith(("http://", "https://")) else None
