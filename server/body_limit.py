"""Request body size limit: 413 from the declared Content-Length, and from the bytes actually
received when no length is declared (a chunked client is cut off as soon as it goes over). A
declared length within the limit needs no counting: the HTTP parser delivers exactly that many
bytes (whatever follows is the next request), so such requests pass straight through."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import ErrorResponse


def _too_large(limit: int) -> str:
    return f"request body larger than the limit of {limit} bytes"


class BodySizeLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.limit = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None:
            try:
                too_big = int(declared) > self.limit
            except ValueError:
                too_big = False  # the server rejects a malformed header itself
            if too_big:
                await _send_413(send, self.limit)
                return
            if not too_big and declared.isdigit():
                # uvicorn never hands the app more than a well-formed Content-Length: nothing to count
                await self.app(scope, receive, send)
                return

        received = 0
        response_started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    # raised inside the route's body parsing: FastAPI lets HTTPException through
                    raise HTTPException(413, _too_large(self.limit))
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except HTTPException as e:  # raised outside a route (e.g. while a middleware read the body)
            if e.status_code != 413 or response_started:
                raise
            await _send_413(send, self.limit)


async def _send_413(send: Send, limit: int) -> None:
    body = ErrorResponse(detail=_too_large(limit), reason="too_large").model_dump_json().encode()
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
