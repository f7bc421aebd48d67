"""The fast path for the hottest request: `POST /v1/embed` with a multipart body.

Measured on the 2-core machine (server/README.md, "Throughput per core"): uvicorn answers a bare
ASGI request for 0.08 ms of CPU, a Starlette route for 0.20 ms, a FastAPI route for 0.31 ms, and
this server's trivial `/healthz` for 0.46 ms; an embed request's whole work besides (multipart
split, decoding a small image, the batcher, the JSON) is about as much again. So for the one
request that clients send by the thousand, this middleware answers directly, skipping FastAPI's
routing, dependency solving and per-route exception wrapping. It calls the route's own function
(`server.routes.embed.answer`) on the same parsed body (`server.bodies.parse_multipart`), so the
two paths cannot answer differently; errors are answered in the same shape (`errors.error_response`).

It sits innermost among the app's middlewares: the body limit (413), the metrics (labelled with
the route's template), the worker header and CORS still wrap it. Anything else — JSON bodies,
cross-origin requests, other paths — goes through FastAPI as before, and the route stays the one
the OpenAPI schema describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from server.bodies import MULTIPART, parse_multipart
from server.errors import ApiError, error_response
from server.routes import embed

PATH = "/v1/embed"


@dataclass(frozen=True)
class RouteTemplate:
    """What the metrics middleware reads from `scope["route"]` (the router sets the real route)."""

    path: str


class EmbedFastPath:
    """Pure ASGI; `state` is the app's `app.state`, where the resources appear once started."""

    def __init__(self, app: ASGIApp, *, state: Any) -> None:
        self.app = app
        self.state = state
        self.route = RouteTemplate(PATH)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        content = headers.get(b"content-type", b"").decode("latin-1")
        if b"origin" in headers or content.split(";")[0].strip().lower() != MULTIPART:
            await self.app(scope, receive, send)  # CORS and JSON bodies: the full route
            return
        scope["route"] = self.route
        res = self.state.resources
        try:
            if res is None:
                raise ApiError(503, "not_ready", "the server is starting or stopping", headers={"Retry-After": "1"})
            body = await _read_body(receive)
            if body is None:
                return  # the client went away
            form = parse_multipart(body, content, file_fields=embed.FILE_FIELDS,
                                   max_files=res.settings.max_images_per_request)
            response = await embed.answer(res, form.uploads, headers.get(b"accept", b"").decode("latin-1"))
        except ApiError as e:
            response = error_response(e)
        await response(scope, receive, send)


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (the body limit counts it as it streams in); None on disconnect."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
