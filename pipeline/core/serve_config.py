"""``zsl serve``'s config (:class:`ServeConfig`, re-exported by :mod:`pipeline.core.config`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.core.config_base import Uri, _Config

__all__ = ["ServeConfig"]


class ServeConfig(_Config):
    indexes: dict[str, Uri] = Field(description="Served indexes: name -> `zsl index` output.")
    labels: dict[str, Uri] = Field(default_factory=dict, description=(
        "`zsl label` outputs of the indexed features: index name -> labels dir; hits then carry the "
        "predicted label and score."))
    host: str = "127.0.0.1"
    port: int = Field(8000, gt=0, lt=65536)
    max_k: int = Field(200, gt=0, description="Largest k a request may ask for.")
    max_text_chars: int = Field(1000, gt=0, le=10_000, description=(
        "Longer search texts get a 400 (a request's text is capped at 10,000 characters whatever this is)."))
    max_body_bytes: int = Field(4 << 20, gt=0, description="Larger request bodies get a 413.")
    max_image_pixels: int = Field(50_000_000, gt=0, description="Thumbnails and image queries refuse larger images.")
    thumbnail_cache: str | None = Field(None, description=(
        "Where thumbnails are cached (default: a private per-user folder, 0700, under $XDG_CACHE_HOME or "
        "~/.cache). The folder must belong to this user and not be writable by others."))
    thumbnail_cache_mb: float = Field(256, gt=0, description="The thumbnail cache is kept under this size (oldest used first out).")
    thumbnail_roots: list[str] = Field(default_factory=list, description=(
        "Local folders thumbnails may be read from (default: the input folder of each index's features)."))
    thumbnail_remote: bool = Field(False, description="Also read thumbnails of remote uris (http, s3, ...): off by default.")
    thumbnail_max_bytes: int = Field(32 << 20, gt=0, description="Image files larger than this get no thumbnail.")
    thumbnail_timeout_s: float = Field(10.0, gt=0, description="Reading one remote image for a thumbnail gives up after this.")
    cors_origins: list[str] = Field(default_factory=list, description=(
        "Origins whose web pages may call the service (CORS), e.g. a clip-retrieval front end's "
        "'http://localhost:3005'; '*' for any; empty: no CORS headers."))
    preload_text: bool = Field(True, description="Load the text encoder before reporting ready.")
    text_batch: int = Field(4, gt=0, le=64, description=(
        "Text queries of concurrent requests encoded together, at most this many per encoder call."))
    query_cache: int = Field(10_000, ge=0, description="Query vectors of this many distinct texts are cached (0: none).")
    text_workers: int = Field(0, ge=0, description=(
        "Threads encoding text queries, one torch/ONNX Runtime thread each (0: one per CPU core, at "
        "most 4; 1: one thread using every core)."))
    text_backend: Literal["auto", "torch", "onnx"] = Field("auto", description=(
        "How the text model runs: 'onnx' (the offline MiniLM on ONNX Runtime: same vectors, 1.5x the "
        "queries/s on 2 cores), 'torch', or 'auto' (onnx where it applies, else torch)."))
    api_key_file: Uri | None = Field(None, description=(
        "File holding an API key (or set ZSL_API_KEY): every endpoint but the page / and GET /health then "
        "needs 'Authorization: Bearer <key>' or 'X-API-Key: <key>' (clip-retrieval's client cannot send one)."))
    allowed_hosts: list[str] = Field(["127.0.0.1", "localhost", "::1"], description=(
        "Host headers accepted by `zsl serve` (uvicorn and Ray Serve replicas; DNS-rebinding defence), plus "
        "`host` when it is a concrete address; others get a 400. ['*']: any."))
    debug_paths: bool = Field(False, description="Replies may show absolute paths (index and labels dirs).")
    limit_concurrency: int = Field(256, gt=0, description="uvicorn: more open connections/tasks get a 503.")
    timeout_keep_alive: int = Field(5, gt=0, description="uvicorn: idle keep-alive connections close after this (s).")
    max_header_bytes: int = Field(64 << 10, gt=0, description="uvicorn (h11): larger request heads are refused.")
    timeout_graceful_shutdown: int = Field(10, gt=0, description="uvicorn: shutting down waits at most this (s).")
    backlog: int = Field(2048, gt=0, description="uvicorn: the listening socket's backlog.")
    image_workers: int = Field(2, gt=0, description="Threads decoding and encoding query images (apart from text queries).")
    image_threads: int = Field(0, ge=0, description=(
        "ONNX Runtime threads encoding one image query (0: one per core; 1: on the niced image thread itself. "
        "Mixed load, 50 clients, 2 cores: 1 answered 233 vs 207 image queries, text p99 295 vs 205 ms)."))
    image_queue: int = Field(8, ge=0, description="Image queries that may wait for those threads; more get a 503.")
    reload_interval_s: float = Field(5.0, ge=0, description=(
        "Every this many seconds the served indexes' manifests are checked, and a new version (a `zsl index` "
        "run that added shards or rebuilt, a new `zsl label`) is loaded beside the old one and swapped in; "
        "0: only on SIGHUP."))
    thumbnail_workers: int = Field(2, gt=0, description="Threads making thumbnails (apart from text queries).")
    background_nice: int = Field(10, ge=0, le=19, description=(
        "The image-query and thumbnail threads run this many nice steps below the rest (Linux), so that "
        "on a busy machine text queries and /health get the cores first; 0: the same priority."))
    ray: bool = Field(False, description="Serve with Ray Serve (one replica per node) instead of uvicorn.")
    address: str | None = Field(None, description="Ray cluster address for --ray (default: a local one).")
    replicas: int | None = Field(None, gt=0, description="Ray Serve replicas (default: one per node).")

    @model_validator(mode="after")
    def _labels_of_served(self) -> "ServeConfig":
        unknown = sorted(set(self.labels) - set(self.indexes))
        if unknown and self.indexes:  # (no indexes: a library caller injects loaded ones)
            raise ValueError(f"labels given for unserved index(es) {', '.join(unknown)} (served: "
                             f"{', '.join(self.indexes)})")
        return self
