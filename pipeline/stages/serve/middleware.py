"""The middleware every request passes: the API key, the size limits, a JSON 500 instead of a bare
one, no absolute path in an error reply, and the request's metrics.

A plain ASGI middleware: Starlette's ``BaseHTTPMiddleware`` (``app.middleware("http")``) runs each
request's app in a task group of its own and streams its answer through a memory channel (about a
quarter of the event loop's busy samples under ``make bench-serve``'s mixed load); here the answer
passes straight through (an error reply is read whole, to take the paths out).
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable

from fastapi import Request
from fastapi.responses import JSONResponse

from pipeline.core.timing import timed
from pipeline.stages.serve import security

LOG = logging.getLogger(__name__)

Message = dict[str, Any]
Send = Callable[[Message], Awaitable[None]]


class Guard:
    """ASGI middleware applying the limits of the app's ``state.serve`` to each HTTP request."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope["app"].state.serve
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        with timed() as t:
            request = Request(scope)
            ours = security.refused(request, state.api_key) or over_limits(
                request, max_body=state.config.max_body_bytes, max_head=state.config.max_header_bytes)
            if ours is not None:
                await ours(scope, receive, counted)
            else:
                await self._answer(scope, receive, counted, state.private_paths)
        route = scope.get("route")
        state.metrics.observe(path=getattr(route, "path", "unmatched"), status=status[0], seconds=t.seconds)

    async def _answer(self, scope, receive, send: Send, paths: list[str]) -> None:
        """The app's answer, its error replies without ``paths``; a JSON 500 (logged) for an
        exception raised before the answer started."""
        started = [False]
        out = PathFilter(send, paths) if paths else send

        async def sending(message: Message) -> None:
            started[0] = started[0] or message["type"] == "http.response.start"
            await out(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:  # noqa: BLE001 - never a bare 500 page: a JSON reason, logged
            LOG.exception("unhandled error on %s", scope.get("path"))
            if started[0]:
                raise
            await JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, 500)(scope, receive, send)


def over_limits(request: Request, *, max_body: int, max_head: int) -> JSONResponse | None:
    """A 431 for headers over ``max_head`` bytes (uvicorn's h11 caps only a head still arriving), a
    413 for a declared body over ``max_body``, a 411 for a POST without Content-Length; else None."""
    head = sum(len(k) + len(v) for k, v in request.scope["headers"])
    if head > max_head:
        return JSONResponse({"detail": f"request headers of {head} bytes; at most {max_head}"}, 431)
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > max_body:
        return JSONResponse({"detail": f"request body of {size} bytes; at most {max_body}"}, 413)
    if request.method == "POST" and size is None:  # a chunked body could pass the size cap unseen
        return JSONResponse({"detail": "POST requests need a Content-Length header"}, 411)
    return None


class PathFilter:
    """An ASGI ``send`` passing answers below 400 through and holding an error reply until its body
    is whole, then sending it with each of ``paths`` replaced by its last part
    (:func:`security.shown_body`)."""

    def __init__(self, send: Send, paths: list[str]) -> None:
        self.send, self.paths = send, paths
        self.start: Message | None = None
        self.body: list[bytes] = []

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] >= 400:
            self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.body.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = security.shown_body(b"".join(self.body), self.paths)
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await self.send({"type": "http.response.body", "body": body})
