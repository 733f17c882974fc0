"""What every handler reads: the app's typed state, kept on ``app.state.serve``."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, HTTPException, Request

from pipeline.core.config import ServeConfig
from pipeline.index.searcher import Searcher
from pipeline.stages.serve.batching import TextBatcher
from pipeline.stages.serve.image_pool import ImagePool
from pipeline.stages.serve.prometheus import ServeMetrics
from pipeline.stages.serve.reload import IndexWatcher, Served

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeState:
    """The served indexes (the watcher's current versions, name -> :class:`Served`; the first is
    the default), the metrics, the config (limits, thumbnail cache), the API key and the paths
    replies hide. A request takes its index's :class:`Served` once (:meth:`served`) and uses it
    to the end, so its answer comes from one version."""

    config: ServeConfig
    watcher: IndexWatcher
    metrics: ServeMetrics
    api_key: str | None = None  # requests need it (but the page and /health): security.refused
    private_paths: list[str] = field(default_factory=list)  # absolute paths error replies must not show
    images: ImagePool | None = None  # image queries' own threads (image_pool)

    def served(self, name: str | None) -> Served:
        """The current version of index ``name`` (None: the default); a 404 naming the served ones."""
        now = self.watcher.served  # one snapshot
        name = name or next(iter(now))
        if name not in now:
            raise HTTPException(404, f"unknown index {name!r} (served: {', '.join(now)})")
        return now[name]

    def searcher(self, name: str | None) -> tuple[str, Searcher]:
        """``(name, searcher)`` of the current version of index ``name`` (:meth:`served`)."""
        got = self.served(name)
        return got.name, got.searcher

    @property
    def searchers(self) -> dict[str, Searcher]:
        """name -> the current version's searcher."""
        return {n: v.searcher for n, v in self.watcher.served.items()}

    @property
    def batchers(self) -> dict[str, TextBatcher]:
        """name -> the current version's text batcher."""
        return {n: v.batcher for n, v in self.watcher.served.items()}


async def get_state(request: Request) -> ServeState:
    """The state of the app answering ``request`` (a FastAPI dependency; async: no thread hop)."""
    return request.app.state.serve


#: A handler's ``state: State`` parameter.
State = Annotated[ServeState, Depends(get_state)]
