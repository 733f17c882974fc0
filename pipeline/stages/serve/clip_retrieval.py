"""clip-retrieval compatibility: the endpoints its ``ClipClient`` and front end call, with the JSON
they send (filters it sends are ignored; ``image_url`` is refused: this server fetches nothing)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Body, HTTPException

from pipeline.stages.serve.queries import find, query_vectors
from pipeline.stages.serve.state import State

LOG = logging.getLogger(__name__)

router = APIRouter()


@router.post("/indices-list")
def indices_list(state: State) -> list[str]:
    """The served index names."""
    return list(state.searchers)


@router.post("/knn-service")
def knn_service(state: State, body: dict[str, Any] = Body(...)) -> list[dict]:
    """Hits as clip-retrieval rows ``{id, similarity, url, caption, image_id}``."""
    ix = body.get("indice_name")
    if ix is not None and not isinstance(ix, str):
        raise HTTPException(400, "indice_name must be a string")
    name, s = state.searcher(ix)
    if body.get("image_url"):
        raise HTTPException(400, "image_url is not fetched by this server; send the image itself as 'image' (base64)")
    emb, image = body.get("embedding_input"), body.get("image")
    text = body.get("text") if emb is None and image is None else None
    image = image if emb is None else None
    for key, v in (("text", text), ("image", image)):
        if v is not None and not isinstance(v, str):
            raise HTTPException(400, f"{key} must be a string")
    k = _num_images(body)
    # clip-retrieval's modality: "image" searches the images, "text" the captions (its text index)
    mode = "caption" if body.get("modality") == "text" else "image"
    q = query_vectors(state, name, text=text, image=image, embedding=emb)
    hits = find(state, s, q, k=min(k, state.config.max_k), mode=mode)
    return [{"id": h["faiss_id"], "similarity": h["score"], "url": h["uri"],
             "caption": h.get("predicted") or h["label"], "image_id": h["image_id"]} for h in hits]


def _num_images(body: dict[str, Any]) -> int:
    """``num_images`` (default 10) as a positive int; a 400 otherwise."""
    try:
        k = int(body.get("num_images", 10))
    except (TypeError, ValueError, OverflowError):
        raise HTTPException(400, "num_images must be an integer") from None
    if k < 1:
        raise HTTPException(400, "num_images must be >= 1")
    return k
