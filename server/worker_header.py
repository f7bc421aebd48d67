"""`X-Simsearch-Worker: <pid>` on every answer: which server process answered. With `--workers N`
it tells clients, tests and benchmarks the workers apart (e.g. that a write made through one
worker is read through another)."""

from __future__ import annotations

import os

from starlette.types import ASGIApp, Message, Receive, Scope, Send

WORKER_HEADER = "x-simsearch-worker"


def worker_header() -> tuple[bytes, bytes]:
    """The header as an ASGI (name, value) pair. The pid is read per request, not at import: the app
    may be built before a worker process forks."""
    return WORKER_HEADER.encode(), str(os.getpid()).encode()


class WorkerHeaderMiddleware:
    """Pure ASGI: appends one header to the response start, nothing else."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = worker_header()

        async def send_with_worker(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), header]
            await send(message)

        await self.app(scope, receive, send_with_worker)
