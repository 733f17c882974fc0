"""Who may call the service and what its replies may show: the optional API key, the Host
allow-list (DNS-rebinding defence) and the absolute paths kept out of error replies."""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.middleware.trustedhost import TrustedHostMiddleware

from pipeline.core.config import ServeConfig

KEY_ENV = "ZSL_API_KEY"

#: Open without a key: the page (it sends the key given in its URL fragment, ``/#key=...``), the
#: readiness probe, and the API's description and docs page (with its ``/docs-assets/``).
OPEN_PATHS = frozenset({"/", "/health", "/docs", "/openapi.json"})


def api_key(cfg: ServeConfig) -> str | None:
    """The key every request but the open ones must carry: ``cfg.api_key_file``'s content, else
    ``$ZSL_API_KEY``, else None (no key asked)."""
    key = Path(cfg.api_key_file).read_text().strip() if cfg.api_key_file else os.environ.get(KEY_ENV, "").strip()
    if cfg.api_key_file and not key:
        raise ValueError("api_key_file is empty")
    return key or None


def refused(request: Request, key: str | None) -> Response | None:
    """A 401 when ``key`` is set and ``request`` (not to an open path, not a CORS preflight) carries
    neither ``Authorization: Bearer <key>`` nor ``X-API-Key: <key>``; else None."""
    path = request.url.path
    if key is None or path in OPEN_PATHS or path.startswith("/docs-assets/") or request.method == "OPTIONS":
        return None
    auth = request.headers.get("authorization", "")
    given = auth[7:].strip() if auth[:7].lower() == "bearer " else request.headers.get("x-api-key", "")
    if hmac.compare_digest(given.encode(), key.encode()):
        return None
    reason = "API key missing" if not given else "wrong API key"
    return JSONResponse({"detail": f"{reason}: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'"}, 401,
                        headers={"WWW-Authenticate": "Bearer"})


def allowed_hosts(cfg: ServeConfig) -> list[str]:
    """``cfg.allowed_hosts`` plus ``cfg.host`` when that is a concrete address (not 0.0.0.0 or ::),
    IPv6 addresses in brackets."""
    hosts = list(cfg.allowed_hosts)
    try:
        concrete = not ipaddress.ip_address(cfg.host).is_unspecified
    except ValueError:  # a name
        concrete = bool(cfg.host)
    if concrete and cfg.host not in hosts:
        hosts.append(cfg.host)
    return [f"[{h}]" if ":" in h and not h.startswith("[") else h for h in hosts]  # IPv6 as in a Host header


def check_hosts(app: FastAPI, cfg: ServeConfig) -> None:
    """Starlette's TrustedHostMiddleware added to ``app`` (outermost when added last): a request
    whose Host header is not among :func:`allowed_hosts` gets a 400 ('*' among them: no check).
    Part of the app :func:`~pipeline.stages.serve.app.create_app` builds, so that uvicorn
    (``run_serve``) and each Ray Serve replica (``build_app_from_env``, behind Ray's proxy, which
    passes the client's Host on) both check it."""
    hosts = allowed_hosts(cfg)
    if "*" not in hosts:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=hosts, www_redirect=False)


def private_paths(cfg: ServeConfig, searchers: dict) -> list[str]:
    """The absolute paths an error reply must not show (longest first): the served index and
    labels dirs, the thumbnail cache and roots, the key file."""
    paths = {*cfg.indexes.values(), *cfg.labels.values(), *cfg.thumbnail_roots, cfg.thumbnail_cache or "",
             cfg.api_key_file or ""}
    for s in searchers.values():
        paths |= {str(getattr(s, "index_dir", "") or ""), str(getattr(s.labels, "labels_dir", "") or "")}
    return sorted({p.rstrip("/") for p in paths if p.startswith("/") or "://" in p} - {""}, key=len, reverse=True)


def shown(path: str | None, cfg: ServeConfig) -> str | None:
    """``path`` as a reply may show it: its last part (a name), unless ``cfg.debug_paths``."""
    if not path or cfg.debug_paths or not (path.startswith("/") or "://" in path):
        return path
    return Path(path.rstrip("/")).name or path


def hide_paths(text: str, paths: list[str]) -> str:
    """``text`` with each of ``paths`` (:func:`private_paths`) replaced by its last part."""
    for p in paths:
        if p in text:
            text = text.replace(p, Path(p).name or "?")
    return text


def shown_body(body: bytes, paths: list[str]) -> bytes:
    """An error reply's ``body`` with each of ``paths`` replaced by its last part."""
    for p in paths:
        if p.encode() in body:
            body = body.replace(p.encode(), (Path(p).name or "?").encode())
    return body
