"""The fast path for the hottest request: `POST /v1/embed` with a multipart body.

Measured on the 2-core machine (server/README.md, "Throughput per core"): uvicorn answers a bare
ASGI request for 0.08 ms of CPU, a Starlette route for 0.20 ms, a FastAPI route for 0.31 ms; each
pure-ASGI middleware adds a coroutine frame per request and a wrapper per message sent. So for the
one request that clients send by the thousand, the app answers before FastAPI's middleware stack,
routing, dependency solving and per-route exception wrapping (`SimsearchAPI.__call__`). It calls
the route's own function (`server.routes.embed.answer`) on the same parsed body
(`server.bodies.parse_multipart`), so the two paths cannot answer differently; errors are answered
in the same shape (`errors.error_response`, and the same 500 as the app's handler).

What the middlewares do for every other request, it does itself, in the same way: the
`X-Simsearch-Worker` header, the request metrics under the route's template, and the body limit
(it takes only requests whose declared Content-Length is within the limit; chunked bodies and
oversized ones go through `BodySizeLimitMiddleware`). Cross-origin requests (CORS), JSON bodies,
other paths and methods all go through FastAPI as before, and the route stays the one the
OpenAPI schema describes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import FastAPI
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from server.bodies import MULTIPART, parse_multipart
from server.errors import ApiError, error_response, internal_error_response
from server.routes import embed
from server.worker_header import worker_header

log = logging.getLogger(__name__)

PATH = "/v1/embed"


class SimsearchAPI(FastAPI):
    """FastAPI, with `POST /v1/embed` multipart requests answered by `embed_fast_path` first."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = scope["type"] == "http" and scope["path"] == PATH and scope["method"] == "POST"
        if not (hot and await embed_fast_path(self, scope, receive, send)):
            await super().__call__(scope, receive, send)


async def embed_fast_path(app: FastAPI, scope: Scope, receive: Receive, send: Send) -> bool:
    """Answer the request and return True, or return False having touched nothing (the full stack
    answers it): a cross-origin request, a body that is not multipart, or no declared length within
    the limit."""
    headers = dict(scope["headers"])
    content = headers.get(b"content-type", b"").decode("latin-1")
    if b"origin" in headers or content.split(";")[0].strip().lower() != MULTIPART:
        return False
    declared = headers.get(b"content-length", b"")
    settings = app.state.settings
    if not declared.isdigit() or int(declared) > settings.max_body_bytes:
        return False
    start = time.perf_counter()
    res: Any = app.state.resources
    try:
        if res is None:
            raise ApiError(503, "not_ready", "the server is starting or stopping", headers={"Retry-After": "1"})
        body = await _read_body(receive)
        if body is None:
            return True  # the client went away
        form = parse_multipart(body, content, file_fields=embed.FILE_FIELDS,
                               max_files=res.settings.max_images_per_request)
        response: Response = await embed.answer(res, form.uploads, headers.get(b"accept", b"").decode("latin-1"))
    except ApiError as e:
        response = error_response(e)
    except Exception:
        log.exception("POST %s failed", PATH)
        response = internal_error_response()
    await send({"type": "http.response.start", "status": response.status_code,
                "headers": [*response.raw_headers, worker_header()]})
    await send({"type": "http.response.body", "body": response.body})
    app.state.metrics.observe_request("POST", PATH, response.status_code, time.perf_counter() - start)
    return True


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (its declared length is within the limit); None on disconnect."""
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
