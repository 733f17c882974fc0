"""The service's own endpoints: health, indices, search, thumbnails, metrics and the web page."""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from pipeline.stages.serve.prometheus import CONTENT_TYPE
from pipeline.stages.serve.queries import find, query_vectors
from pipeline.stages.serve.security import hide_paths, shown
from pipeline.stages.serve.state import State
from pipeline.stages.serve.thumbnails import cached_thumbnail

LOG = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("page.html")

router = APIRouter()

#: Hard caps on a ``/search`` body's shape, checked while it is parsed (the config's limits, such
#: as ``max_text_chars`` and ``max_k``, are checked after it, with a 400 naming them).
MAX_TEXT_CHARS = 10_000
MAX_LABELS, MAX_LABEL_CHARS = 1000, 200
MAX_EMBEDDING_DIM = 8192
MAX_NAME_CHARS = 200
MAX_ERRORS_REPORTED = 10

Label = Annotated[str, StringConstraints(max_length=MAX_LABEL_CHARS)]


class SearchRequest(BaseModel):
    """``POST /search`` body; unknown keys, NaN/inf numbers and over-long lists or strings are
    refused (422 naming the fields, never echoing their values)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    text: str | None = Field(None, max_length=MAX_TEXT_CHARS, description="Free-text query.")
    image: str | None = Field(None, description="Query image (JPEG, PNG, ...), base64; a data: URL is accepted.")
    embedding: list[float] | None = Field(None, max_length=MAX_EMBEDDING_DIM,
                                          description="A query vector in the index's space.")
    k: int = Field(10, gt=0)
    index: str | None = Field(None, max_length=MAX_NAME_CHARS)
    labels: list[Label] | None = Field(None, max_length=MAX_LABELS, description=(
        "Keep only hits whose label or predicted label is one of these."))
    unseen_only: bool = Field(False, description="Keep only hits predicted as an unseen class (needs --labels).")
    mode: Literal["image", "caption", "both"] = Field("image", description=(
        "Search the images, their captions (zsl embed-text), or both (weighted sum of the two scores)."))
    caption_weight: float = Field(0.5, ge=0, le=1, description="Weight of the caption score in mode 'both'.")
    min_score: float | None = None
    offset: int = Field(0, ge=0)


async def validation_failed(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A 422 naming the invalid fields and why, never their values: FastAPI's default reply echoes
    each input (a 30 MB reply to a 600 KB body; a 500 when an input is NaN)."""
    errors = exc.errors()
    where = lambda e: ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"  # noqa: E731
    shown = [f"{where(e)}: {str(e.get('msg', ''))[:200]}" for e in errors[:MAX_ERRORS_REPORTED]]
    more = f" (and {len(errors) - len(shown)} more)" if len(errors) > len(shown) else ""
    return JSONResponse({"detail": "invalid request: " + "; ".join(shown) + more}, 422)


@router.get("/health")
async def health(state: State) -> dict:
    """Ready: the indexes are loaded (answered on the event loop: no thread pool to wait for);
    ``degraded`` (still 200: every index answers) while a new version of one failed to load and its
    older version serves, with the reason per index."""
    errors = {n: hide_paths(e, state.private_paths) for n, e in state.watcher.errors.items()}
    return {"status": "degraded" if errors else "ok", "indices": list(state.watcher.served),
            **({"errors": errors} if errors else {})}


@router.get("/indices")
def indices(state: State) -> list[dict]:
    """The served indexes: version, size, load time, factory, tuned recall, text model, labels,
    captions (paths as their last part unless ``debug_paths``), and why a newer version is not
    served (``reload_error``)."""
    return [{"name": n, "version": v.version, "ntotal": v.searcher.index.ntotal,
             "loaded_at": datetime.fromtimestamp(v.loaded_at, timezone.utc).isoformat(timespec="seconds"),
             "reload_error": hide_paths(state.watcher.errors[n], state.private_paths) if n in state.watcher.errors
             else None, **_describe(v.searcher, state)}
            for n, v in state.watcher.served.items()]


def _describe(s, state) -> dict:
    return {"dim": s.dim, "factory": s.manifest.factory,
             "search_params": s.manifest.search_params, "text_model": shown(s.manifest.text_model, state.config),
             "text_backend": s.text_backend_in_use,
             "recall_at_10": s.manifest.tuning.recall_at_10 if s.manifest.tuning else None,
             "image_encoder": shown(s.manifest.image_encoder or s.manifest.feature_model, state.config),
             "labels": shown(s.labels.labels_dir, state.config) if s.labels else None,
             "captions": s.captions is not None}


@router.post("/search")
async def search(req: SearchRequest, state: State) -> dict:
    """Hits of a text, image or embedding query, filtered and paged; image queries on their own
    bounded pool (a 503 with Retry-After when it is full), the others on the app's threads."""
    if req.image is not None and state.images is not None:
        return await state.images.run(lambda: _search(req, state))
    return await run_in_threadpool(_search, req, state)


def _search(req: SearchRequest, state) -> dict:
    served = state.served(req.index)  # this version answers, whatever is swapped in meanwhile
    q = query_vectors(state, served, text=req.text, image=req.image, embedding=req.embedding)
    hits = find(state, served.searcher, q, k=req.k, offset=req.offset, labels=req.labels, min_score=req.min_score,
                unseen_only=req.unseen_only, mode=req.mode, caption_weight=req.caption_weight)
    return {"index": served.name, "version": served.version, "query": req.text, "k": req.k, "hits": hits}


@router.get("/images/{faiss_id}")
async def image(faiss_id: int, state: State, index: str | None = None, size: int = Query(256, ge=16, le=1024)):
    """A JPEG thumbnail of image ``faiss_id`` of an index (made on the image pool's thumbnail threads)."""
    name, s = state.searcher(index)
    make = lambda: cached_thumbnail(s, name, faiss_id, size=size, config=state.config)  # noqa: E731
    data, version = await (state.images.thumbnail(make) if state.images is not None else run_in_threadpool(make))
    # private and short-lived: the same url shows another image once the index is rebuilt (the ETag says which)
    return Response(data, media_type="image/jpeg",
                    headers={"Cache-Control": "private, max-age=300", "ETag": f'"{version}-{faiss_id}-{size}"'})


@router.get("/metrics")
def prometheus(state: State) -> Response:
    """Prometheus metrics (text format)."""
    return Response(state.metrics.latest(), media_type=CONTENT_TYPE)


@router.get("/", response_class=HTMLResponse)
def page() -> str:
    """The search page (no external CDN or font)."""
    return PAGE.read_text()
