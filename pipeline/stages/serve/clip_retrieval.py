"""clip-retrieval compatibility: the endpoints its ``ClipClient`` and front end call, with the JSON
they send, as clip-retrieval 2.45.0's ``clip_back.py`` answers them.

* The body is read as JSON whatever its Content-Type: ``ClipClient`` posts ``data=json.dumps(...)``
  with none (a 400 with a short reason for bad JSON or a non-object; the body is never echoed).
* ``/knn-service`` searches ``num_result_ids`` (default ``num_images``; at most ``max_k``)
  candidates, drops duplicates when ``deduplicate`` is true, and returns them all, the first
  ``num_images`` with their metadata (``caption``, ``url``, ...) and the rest as ``id`` and
  ``similarity`` only (the front fetches those through ``/metadata``), like clip-retrieval.
  A duplicate is the same image again: the same uri, or a stored vector identical to a kept
  hit's. (clip-retrieval's cosine >= 0.94 suits CLIP's space, not ours: a zsl model projects a
  class's images close together, so a threshold would drop distinct images.)
* ``caption`` is the image's own caption, else its label or predicted label, never null;
  ``predicted_label`` and ``label`` come apart; ``url`` is the image's http(s) source url, else the
  absolute url of its thumbnail on this server (``/images/{id}?index=``, built from the url the
  request came to), so that clip-retrieval's web front, which hides a result whose image fails to
  load, shows it; a local path is never in a reply.
* The safety, violence, aesthetic and mclip options are ignored; ``image_url`` is refused (this
  server fetches nothing).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Annotated, Any
from urllib.parse import urlencode

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool

from pipeline.stages.serve.feature_meta import describe
from pipeline.stages.serve.queries import find, query_vectors
from pipeline.stages.serve.state import State

LOG = logging.getLogger(__name__)

router = APIRouter()


async def json_object(request: Request) -> dict[str, Any]:
    """The request body parsed as a JSON object, whatever its Content-Type; a 413 over
    ``max_body_bytes``, a 400 for anything else."""
    raw = await request.body()
    limit = request.app.state.serve.config.max_body_bytes
    if len(raw) > limit:
        raise HTTPException(413, f"request body of {len(raw)} bytes; at most {limit}")
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise HTTPException(400, "the body is not valid JSON (UTF-8)") from None
    if not isinstance(body, dict):
        raise HTTPException(400, f"the body must be a JSON object, not {type(body).__name__}")
    return body


#: A handler's parsed JSON-object body.
Body = Annotated[dict[str, Any], Depends(json_object)]


@router.get("/indices-list")
def indices_list(state: State) -> list[str]:
    """The served index names (clip-retrieval answers GET; POST is kept for older callers)."""
    return list(state.searchers)


router.add_api_route("/indices-list", indices_list, methods=["POST"], operation_id="indices_list_post")


@router.post("/knn-service")
async def knn_service(state: State, body: Body, request: Request) -> list[dict]:
    """Hits as clip-retrieval rows ``{id, similarity, caption, url, label, predicted_label, image_id}``;
    image queries on the image pool, as ``/search``'s (a 503 with Retry-After when it is full), the
    others on the app's threads. One index version answers the whole request."""
    served = state.served(_str(body, "indice_name"))
    name = served.name
    if body.get("image_url"):
        raise HTTPException(400, "image_url is not fetched by this server; send the image itself as 'image' (base64)")
    emb, image = body.get("embedding_input"), body.get("image")
    text = body.get("text") if emb is None and image is None else None
    image = image if emb is None else None
    for key, v in (("text", text), ("image", image)):
        if v is not None and not isinstance(v, str):
            raise HTTPException(400, f"{key} must be a string")
    num_images = _positive_int(body, "num_images", 10)
    num_ids = min(_positive_int(body, "num_result_ids", num_images), state.config.max_k)
    # clip-retrieval's modality: "image" searches the images, "text" the captions (its text index)
    mode = "caption" if body.get("modality") == "text" else "image"
    urls = thumbnail_url(request, name)

    def rows() -> list[dict]:
        q = query_vectors(state, served, text=text, image=image, embedding=emb)
        return knn_rows(state, served.searcher, q, k=num_ids, mode=mode, num_images=num_images,
                        dedup=bool(body.get("deduplicate")), urls=urls)

    if image is not None and state.images is not None:
        return await state.images.run(rows)
    return await run_in_threadpool(rows)


def knn_rows(state, s, q, *, k: int, mode: str, num_images: int, dedup: bool,
             urls: Callable[[int], str]) -> list[dict]:
    """The ``k`` hits of the query pair ``q`` in searcher ``s`` as clip-retrieval rows, the first
    ``num_images`` with their metadata, the others ``{id, similarity}`` only."""
    hits = find(state, s, q, k=k, mode=mode)
    if dedup:
        hits = deduplicate(s.index, hits)
    rows = [{"id": h["faiss_id"], "similarity": h["score"]} for h in hits]
    for row, meta in zip(rows, describe(s, hits[:num_images], urls)):
        row.update(meta)
    return rows


@router.post("/metadata")
def metadata(state: State, body: Body, request: Request) -> list[dict]:
    """``{ids, indice_name}`` -> ``[{id, metadata: {caption, url, label, predicted_label, image_id}}]``."""
    ids = body.get("ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise HTTPException(400, "ids must be a list of integers")
    limit = state.config.max_k * 10
    if len(ids) > limit:
        raise HTTPException(400, f"{len(ids)} ids; at most {limit}")
    if not ids:
        return []
    name, s = state.searcher(_str(body, "indice_name"))
    bad = [i for i in ids if not 0 <= i < s.index.ntotal]
    if bad:
        raise HTTPException(400, f"id {bad[0]} is not in the index (0..{s.index.ntotal - 1})")
    rows = s.ids.take(ids).select(["faiss_id", "image_id", "uri", "label"]).to_pylist()
    if s.labels is not None:
        s.labels.annotate(rows)
    return [{"id": i, "metadata": meta} for i, meta in zip(ids, describe(s, rows, thumbnail_url(request, name)))]


def thumbnail_url(request: Request, index: str) -> Callable[[int], str]:
    """faiss id -> the absolute url of its thumbnail on this server, ``GET /images/{id}?index=``, at
    the scheme, host and root path the request came to."""
    prefix = str(request.url_for("image", faiss_id="0"))[:-1]  # ".../images/"
    query = "?" + urlencode({"index": index})
    return lambda faiss_id: f"{prefix}{int(faiss_id)}{query}"


def deduplicate(index, hits: list[dict]) -> list[dict]:
    """``hits`` less the later copies of an image: the same uri, or a stored vector identical to an
    earlier hit's (where the index can give its vectors back; else by uri alone)."""
    vecs = None
    if hits:
        try:
            vecs = index.reconstruct_batch(np.array([h["faiss_id"] for h in hits], np.int64))
        except RuntimeError:  # compressed, or IVF without a direct map
            vecs = None
    seen: set = set()
    out = []
    for i, h in enumerate(hits):
        keys = {("uri", h["uri"])} | ({("vec", vecs[i].tobytes())} if vecs is not None else set())
        if not keys & seen:
            out.append(h)
        seen |= keys
    return out


def _str(body: dict[str, Any], key: str) -> str | None:
    v = body.get(key)
    if v is not None and not isinstance(v, str):
        raise HTTPException(400, f"{key} must be a string")
    return v


def _positive_int(body: dict[str, Any], key: str, default: int) -> int:
    """``body[key]`` (default ``default``) as a positive int; a 400 otherwise."""
    v = body.get(key)
    if v is None:
        return default
    try:
        k = int(v)
    except (TypeError, ValueError, OverflowError):
        raise HTTPException(400, f"{key} must be an integer") from None
    if k < 1:
        raise HTTPException(400, f"{key} must be >= 1")
    return k
