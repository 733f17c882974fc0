"""Serve stage: text-to-image retrieval over HTTP (FastAPI, run by uvicorn), with a web page.

:func:`create_app` is a library object (tests and Ray Serve can mount it); ``zsl serve`` only
starts it. Each index loads once (memory-mapped, :class:`pipeline.index.searcher.Searcher`); faiss
searches and the text encoder are thread-safe for reads. Endpoints:

- ``POST /search`` ``{"text" | "image" (base64) | "embedding", "k", "index", "labels", "unseen_only",
  "min_score", "offset"}`` -> hits (with the predicted label and score when a labels dir is served)
- ``GET /images/{faiss_id}?index=&size=`` a JPEG thumbnail of the uri the index holds for that id
  (made on first request, cached on disk atomically); ids are integers, so no path reaches the disk
- ``GET /indices``, ``GET /health``, ``GET /metrics`` (Prometheus text format), ``GET /`` the page
- clip-retrieval compatibility: ``POST /knn-service``, ``POST /indices-list``

Bad input gets a 4xx with a JSON ``detail``, never a 500: empty or overlong text, ``k`` above the
maximum, images that are not base64 or not an image or too many pixels, wrong-dimension
embeddings, unknown indexes or ids, bodies above the size cap.
"""

from __future__ import annotations

import base64
import binascii
import io as _io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from pipeline.core import fs as zio
from pipeline.core.config import ServeConfig
from pipeline.inputs.images import FORMATS, DecodeError
from pipeline.index.searcher import PredictedLabels, Searcher

LOG = logging.getLogger(__name__)

__all__ = ["create_app", "run_serve"]

_PAGE = Path(__file__).with_name("serve_page.html")


class SearchRequest(BaseModel):
    """``POST /search`` body; unknown keys are refused (422 naming them)."""

    model_config = ConfigDict(extra="forbid")
    text: str | None = Field(None, description="Free-text query.")
    image: str | None = Field(None, description="Query image (JPEG, PNG, ...), base64; a data: URL is accepted.")
    embedding: list[float] | None = Field(None, description="A query vector in the index's space.")
    k: int = Field(10, gt=0)
    index: str | None = None
    labels: list[str] | None = Field(None, description="Keep only hits whose label or predicted label is one of these.")
    unseen_only: bool = Field(False, description="Keep only hits predicted as an unseen class (needs --labels).")
    mode: Literal["image", "caption", "both"] = Field("image", description=(
        "Search the images, their captions (zsl embed-text), or both (weighted sum of the two scores)."))
    caption_weight: float = Field(0.5, ge=0, le=1, description="Weight of the caption score in mode 'both'.")
    min_score: float | None = None
    offset: int = Field(0, ge=0)


class _TextBatcher:
    """Encodes the text queries of concurrent requests together: a request waits at most
    ``wait_ms`` for others, then one encoder call embeds up to ``max_batch`` texts. The query
    vectors of the last ``cache_size`` distinct texts are kept (an LRU cache): on CPU, embedding a
    query with its prompt templates costs far more than the index search, and query logs repeat."""

    def __init__(self, searcher: Searcher, *, max_batch: int = 4, wait_ms: float = 2.0,
                 cache_size: int = 0, workers: int = 1) -> None:
        import queue
        from collections import OrderedDict

        self.searcher, self.max_batch, self.wait = searcher, max_batch, wait_ms / 1000
        self.q: "queue.Queue[tuple[str, Any]]" = queue.Queue()
        self.cache: "OrderedDict[str, np.ndarray]" = OrderedDict()
        self.cache_size, self.hits, self.misses = cache_size, 0, 0
        self.lock = threading.Lock()
        for i in range(workers):
            threading.Thread(target=self._loop, daemon=True, name=f"zsl-text-batcher-{i}").start()

    def encode(self, text: str) -> tuple[np.ndarray, np.ndarray | None]:
        """``(image-space query (1, d), caption query or None)`` of a text."""
        from concurrent.futures import Future

        key = text.strip()
        if self.cache_size:
            with self.lock:
                v = self.cache.get(key)
                if v is not None:
                    self.cache.move_to_end(key)
                    self.hits += 1
                    return v
                self.misses += 1
        fut: Future = Future()
        self.q.put((key, fut))
        v = tuple(None if a is None else _frozen(a) for a in fut.result())  # not views into the batch's matrix
        if self.cache_size:
            with self.lock:
                self.cache[key] = v
                while len(self.cache) > self.cache_size:
                    self.cache.popitem(last=False)
        return v

    def _warm(self) -> None:
        """One encoder call before the workers run concurrently: the first call sets the fast
        tokenizer's padding/truncation state, which concurrent first calls would race on."""
        with self.lock:
            if not getattr(self, "_warmed", False):
                self.searcher.encoder.encode(["warm up"])
                self._warmed = True

    def _loop(self) -> None:
        import queue

        while True:
            batch = [self.q.get()]
            try:
                self._warm()
            except Exception:  # noqa: BLE001 - reported to the requests by the encoder call below
                pass
            deadline = time.perf_counter() + self.wait
            while len(batch) < self.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                try:
                    batch.append(self.q.get(timeout=left))
                except queue.Empty:
                    break
            try:
                pairs = self.searcher.text_query_pairs([t for t, _ in batch])
                for (_, fut), (q_img, q_cap) in zip(batch, pairs):
                    fut.set_result((q_img[None, :], q_cap))
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request
                for _, fut in batch:
                    fut.set_exception(exc)


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


class _Metrics:
    """Request counts, errors and a latency histogram, in the Prometheus text format."""

    BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[int]] = {}
        self.sums: dict[str, float] = {}

    def observe(self, path: str, status: int, seconds: float) -> None:
        with self.lock:
            self.requests[(path, status)] = self.requests.get((path, status), 0) + 1
            h = self.hist.setdefault(path, [0] * (len(self.BUCKETS) + 1))
            h[next((i for i, b in enumerate(self.BUCKETS) if seconds <= b), len(self.BUCKETS))] += 1
            self.sums[path] = self.sums.get(path, 0.0) + seconds

    def text(self) -> str:
        out = ["# TYPE zsl_requests_total counter"]
        with self.lock:
            for (path, status), n in sorted(self.requests.items()):
                out.append(f'zsl_requests_total{{path="{path}",status="{status}"}} {n}')
            out.append("# TYPE zsl_errors_total counter")
            for (path, status), n in sorted(self.requests.items()):
                if status >= 400:
                    out.append(f'zsl_errors_total{{path="{path}",status="{status}"}} {n}')
            out.append("# TYPE zsl_request_seconds histogram")
            for path, h in sorted(self.hist.items()):
                acc = 0
                for b, c in zip((*self.BUCKETS, "+Inf"), h):
                    acc += c
                    out.append(f'zsl_request_seconds_bucket{{path="{path}",le="{b}"}} {acc}')
                out.append(f'zsl_request_seconds_sum{{path="{path}"}} {self.sums[path]:.6f}')
                out.append(f'zsl_request_seconds_count{{path="{path}"}} {acc}')
        return "\n".join(out) + "\n"


def _text_workers(cfg: ServeConfig) -> int:
    return cfg.text_workers or min(4, os.cpu_count() or 1)


def _serving_process(cfg: ServeConfig) -> None:
    """Process-wide settings of a server process (not of :func:`create_app`, which tests mount):
    with several text-encoding threads, torch gets one thread each; a torch op split over every
    core stalls whenever one core is busy answering another request (``make bench-serve``, 2 cores,
    repeated queries: p99 144 -> 124 ms; within run-to-run noise for new queries)."""
    if _text_workers(cfg) > 1:
        import torch

        torch.set_num_threads(1)


def create_app(cfg: ServeConfig, *, searchers: dict[str, Searcher] | None = None):
    """The FastAPI app serving ``cfg.indexes`` (name -> index dir); ``searchers`` injects loaded ones."""
    from fastapi import Body, FastAPI, HTTPException, Query, Request
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response

    loaded = dict(searchers or {})
    for name, d in cfg.indexes.items():
        if name not in loaded:
            LOG.info("loading index %s from %s", name, d)
            loaded[name] = Searcher(d, load_text=cfg.preload_text, text_backend=cfg.text_backend,
                                    text_threads=1 if _text_workers(cfg) > 1 else None)
    if not loaded:
        raise ValueError("zsl serve needs at least one --index")
    unknown = sorted(set(cfg.labels) - set(loaded))
    if unknown:
        raise ValueError(f"labels given for unserved index(es) {', '.join(unknown)} (served: {', '.join(loaded)})")
    for name, s in loaded.items():
        s.max_image_pixels = cfg.max_image_pixels
        if name in cfg.labels:
            LOG.info("predicted labels of index %s from %s", name, cfg.labels[name])
            s.labels = PredictedLabels(cfg.labels[name], s.manifest)
    default = next(iter(loaded))
    batchers = {n: _TextBatcher(s, cache_size=cfg.query_cache, workers=_text_workers(cfg)) for n, s in loaded.items()}
    metrics = _Metrics()
    thumbs = Path(cfg.thumbnail_cache)
    app = FastAPI(title="zsl-pipeline retrieval", version="1",
                  description="Text-to-image retrieval over zsl indexes (clip-retrieval compatible endpoints).")

    def searcher(name: str | None) -> tuple[str, Searcher]:
        name = name or default
        if name not in loaded:
            raise HTTPException(404, f"unknown index {name!r} (served: {', '.join(loaded)})")
        return name, loaded[name]

    def query_vector(s: Searcher, text: str | None, embedding: list[float] | None, name: str,
                     image: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """``(image-space query, caption query or None)``."""
        if sum(x is not None for x in (text, image, embedding)) != 1:
            raise HTTPException(400, "give exactly one of 'text', 'image' and 'embedding'")
        if image is not None:
            return image_vector(s, image), None
        if text is not None:
            if not text.strip():
                raise HTTPException(400, "empty text")
            if len(text) > cfg.max_text_chars:
                raise HTTPException(400, f"text of {len(text)} characters; at most {cfg.max_text_chars}")
            return batchers[name].encode(text)
        try:
            v = np.asarray(embedding, np.float32).reshape(1, -1)
        except (TypeError, ValueError):
            raise HTTPException(400, "embedding must be a list of numbers") from None
        if v.shape[1] != s.dim:
            raise HTTPException(400, f"embedding has {v.shape[1]} values; index {s.index_dir} holds {s.dim}-d vectors")
        if not np.isfinite(v).all():
            raise HTTPException(400, "embedding has NaN or infinite values")
        return v, None

    def image_vector(s: Searcher, image: str) -> np.ndarray:
        if len(image) > cfg.max_body_bytes:
            raise HTTPException(413, f"image of {len(image)} base64 characters; at most {cfg.max_body_bytes}")
        if image.startswith("data:"):
            _, sep, data = image.partition(",")
            if not sep:
                raise HTTPException(400, "image is a data: URL without data (no ',')")
        else:
            data = image
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise HTTPException(400, "image is not valid base64") from None
        try:
            return s.image_queries([raw])
        except DecodeError as exc:
            raise HTTPException(400, f"image cannot be used: {exc}") from None
        except ValueError as exc:  # the index cannot encode images (no known encoder)
            raise HTTPException(400, str(exc)) from None

    def run(s: Searcher, q: tuple, k: int, offset: int, labels, min_score, unseen_only: bool = False,
            mode: str = "image", caption_weight: float = 0.5) -> list[dict]:
        if k > cfg.max_k or offset + k > cfg.max_k * 10:
            raise HTTPException(400, f"k={k} (offset {offset}) is above the maximum k={cfg.max_k}")
        if unseen_only and s.labels is None:
            raise HTTPException(400, "unseen_only needs predicted labels; start zsl serve with --labels")
        if mode != "image" and s.captions is None:
            raise HTTPException(400, f"mode {mode!r}: this index has no caption index (zsl embed-text, then zsl index)")
        if mode != "image" and q[1] is None:
            raise HTTPException(400, f"mode {mode!r} needs a text query (captions are searched by text)")
        want = offset + k
        filtered = labels or min_score is not None or unseen_only
        fetch = min(max(4 * want, 100), s.index.ntotal) if filtered else want
        hits = s.search_pair(q[0], q[1], fetch, mode=mode, caption_weight=caption_weight)
        if labels:
            keep = set(labels)
            hits = [h for h in hits if h["label"] in keep or h.get("predicted") in keep]
        if unseen_only:
            hits = [h for h in hits if h["predicted_unseen"]]
        if min_score is not None:
            hits = [h for h in hits if h["score"] >= min_score]
        hits = hits[offset:want]
        for r, h in enumerate(hits):
            h["rank"] = offset + r + 1
        return hits

    @app.middleware("http")
    async def guard(request: Request, call_next):
        t = time.perf_counter()
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > cfg.max_body_bytes:
            resp = JSONResponse({"detail": f"request body of {size} bytes; at most {cfg.max_body_bytes}"}, 413)
        elif request.method == "POST" and size is None:  # a chunked body could pass the size cap unseen
            resp = JSONResponse({"detail": "POST requests need a Content-Length header"}, 411)
        else:
            try:
                resp = await call_next(request)
            except Exception as exc:  # noqa: BLE001 - never a bare 500 page: a JSON reason, logged
                LOG.exception("unhandled error on %s", request.url.path)
                resp = JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, 500)
        route = request.scope.get("route")
        metrics.observe(getattr(route, "path", "unmatched"), resp.status_code, time.perf_counter() - t)
        return resp

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "indices": list(loaded)}

    @app.get("/indices")
    def indices() -> list[dict]:
        return [{"name": n, "ntotal": s.manifest.ntotal, "dim": s.dim, "factory": s.manifest.factory,
                 "search_params": s.manifest.search_params, "text_model": s.manifest.text_model,
                 "text_backend": getattr(s._encoder, "backend", None),
                 "recall_at_10": s.manifest.tuning.recall_at_10 if s.manifest.tuning else None,
                 "image_encoder": s.manifest.image_encoder or s.manifest.feature_model,
                 "labels": s.labels.labels_dir if s.labels else None, "captions": s.captions is not None}
                for n, s in loaded.items()]

    @app.post("/search")
    def search(req: SearchRequest) -> dict:
        name, s = searcher(req.index)
        q = query_vector(s, req.text, req.embedding, name, req.image)
        hits = run(s, q, req.k, req.offset, req.labels, req.min_score, req.unseen_only, req.mode, req.caption_weight)
        return {"index": name, "query": req.text, "k": req.k, "hits": hits}

    @app.get("/images/{faiss_id}")
    def image(faiss_id: int, index: str | None = None, size: int = Query(256, ge=16, le=1024)):
        name, s = searcher(index)
        if not 0 <= faiss_id < s.manifest.ntotal:
            raise HTTPException(404, f"no image {faiss_id} in index {name!r} ({s.manifest.ntotal} images)")
        uri = s.ids.take([faiss_id]).column("uri")[0].as_py()
        target = thumbs / s.manifest.sha256[:16] / f"{faiss_id}-{size}.jpg"
        if not target.exists():
            try:
                data = _thumbnail(uri, size, cfg.max_image_pixels)
            except Exception as exc:  # noqa: BLE001 - a gone or broken image is the client's 404, named
                raise HTTPException(404, f"image {faiss_id} ({uri}) cannot be read: {type(exc).__name__}: {exc}")
            zio.write_bytes_atomic(str(target), data)
        return Response(target.read_bytes(), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/metrics")
    def prometheus() -> PlainTextResponse:
        cache = ["# TYPE zsl_query_cache_hits_total counter"]
        cache += [f'zsl_query_cache_hits_total{{index="{n}"}} {b.hits}' for n, b in batchers.items()]
        cache += ["# TYPE zsl_query_cache_misses_total counter"]
        cache += [f'zsl_query_cache_misses_total{{index="{n}"}} {b.misses}' for n, b in batchers.items()]
        return PlainTextResponse(metrics.text() + "\n".join(cache) + "\n", media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return _PAGE.read_text()

    # -- clip-retrieval compatibility (its ClipClient and front end) ----------------------------------
    @app.post("/indices-list")
    def indices_list() -> list[str]:
        return list(loaded)

    @app.post("/knn-service")
    def knn_service(body: dict[str, Any] = Body(...)) -> list[dict]:
        ix = body.get("indice_name")
        if ix is not None and not isinstance(ix, str):
            raise HTTPException(400, "indice_name must be a string")
        name, s = searcher(ix)
        if body.get("image_url"):
            raise HTTPException(400, "image_url is not fetched by this server; send the image itself as 'image' (base64)")
        emb, image = body.get("embedding_input"), body.get("image")
        text = body.get("text") if emb is None and image is None else None
        image = image if emb is None else None
        for key, v in (("text", text), ("image", image)):
            if v is not None and not isinstance(v, str):
                raise HTTPException(400, f"{key} must be a string")
        try:
            k = int(body.get("num_images", 10))
        except (TypeError, ValueError, OverflowError):
            raise HTTPException(400, "num_images must be an integer") from None
        if k < 1:
            raise HTTPException(400, "num_images must be >= 1")
        # clip-retrieval's modality: "image" searches the images, "text" the captions (its text index)
        mode = "caption" if body.get("modality") == "text" else "image"
        hits = run(s, query_vector(s, text, emb, name, image), min(k, cfg.max_k), 0, None, None, mode=mode)
        return [{"id": h["faiss_id"], "similarity": h["score"], "url": h["uri"],
                 "caption": h.get("predicted") or h["label"], "image_id": h["image_id"]} for h in hits]

    app.state.searchers = loaded
    return app


def _thumbnail(uri: str, size: int, max_pixels: int) -> bytes:
    from PIL import Image

    fs, path = zio.filesystem(uri)
    with fs.open(path, "rb") as f:
        raw = f.read()
    Image.MAX_IMAGE_PIXELS = max_pixels
    with Image.open(_io.BytesIO(raw), formats=FORMATS) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = _io.BytesIO()
        im.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


_CONFIG_ENV = "ZSL_SERVE_CONFIG"


def _build_app():
    """App builder for Ray Serve replicas: the config comes as JSON in ``ZSL_SERVE_CONFIG``; each
    replica loads the indexes itself."""
    import json

    cfg = ServeConfig(**json.loads(os.environ[_CONFIG_ENV]))
    _serving_process(cfg)
    return create_app(cfg)


def ray_app(args: dict | None = None):
    """Ray Serve application builder for ``serve run`` / a KubeRay RayService
    (``import_path: pipeline.stages.serve:ray_app``; config in ``ZSL_SERVE_CONFIG``)."""
    from ray import serve

    @serve.deployment(max_replicas_per_node=1)
    @serve.ingress(_build_app)
    class ZslService:
        pass

    return ZslService.bind()


def run_serve(cfg: ServeConfig, *, blocking: bool = True) -> None:
    """Load the indexes and serve them with uvicorn (or Ray Serve with ``cfg.ray``) until interrupted."""
    if cfg.ray:
        import json

        from pipeline.cluster.serve import serve_asgi

        serve_asgi(_build_app, address=cfg.address, host=cfg.host, port=cfg.port, replicas=cfg.replicas,
                   blocking=blocking, env={_CONFIG_ENV: json.dumps(cfg.model_dump(mode="json"))})
        return
    import uvicorn

    _serving_process(cfg)
    app = create_app(cfg)
    LOG.info("serving %s on http://%s:%d/", ", ".join(cfg.indexes), cfg.host, cfg.port)
    uvicorn.run(app, host=cfg.host, port=cfg.port, log_level="warning")

