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

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServeState:
    """The served indexes (name -> searcher, the first is the default), one text batcher each, the
    metrics, the config (limits, thumbnail cache), the API key and the paths replies hide."""

    config: ServeConfig
    searchers: dict[str, Searcher]
    batchers: dict[str, TextBatcher]
    metrics: ServeMetrics
    api_key: str | None = None  # requests need it (but the page and /health): security.refused
    private_paths: list[str] = field(default_factory=list)  # absolute paths error replies must not show
    images: ImagePool | None = None  # image queries' own threads (image_pool)

    def searcher(self, name: str | None) -> tuple[str, Searcher]:
        """``(name, searcher)`` of index ``name`` (None: the default); a 404 naming the served ones."""
        name = name or next(iter(self.searchers))
        if name not in self.searchers:
            raise HTTPException(404, f"unknown index {name!r} (served: {', '.join(self.searchers)})")
        return name, self.searchers[name]


async def get_state(request: Request) -> ServeState:
    """The state of the app answering ``request`` (a FastAPI dependency; async: no thread hop)."""
    return request.app.state.serve


#: A handler's ``state: State`` parameter.
State = Annotated[ServeState, Depends(get_state)]
