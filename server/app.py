"""`create_app(settings)`: the FastAPI application, its resources opened in `lifespan`.

The index watcher (server/live_index.py) runs for the app's lifetime, so commits other processes
make to the index (`index build`, another server) are served without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.concurrency import run_in_threadpool

from embed.backends.base import Backend
from index.identity import IndexModelMismatch
from server.body_limit import BodySizeLimitMiddleware
from server.errors import ErrorResponse, install_error_handlers
from server.fastpath import SimsearchAPI
from server.metrics import Metrics, MetricsMiddleware
from server.routes import duplicates, embed, health, items, page, search
from server.routes import map as map_view
from server.schemas import EmbedJSON, ItemJSON, SearchJSON
from server.settings import Settings
from server.state import close_resources, open_resources
from server.worker_header import WorkerHeaderMiddleware

log = logging.getLogger(__name__)

DESCRIPTION = """Embed images with this deployment's own encoder and search the image index.

Images go up as multipart file parts or, for clients that cannot send multipart, as base64 in a
JSON body. Every error answer has the shape `{"detail", "reason", "errors"}`.
Writes (`POST/DELETE /v1/items`) need the API key when the server has one.
"""

# request bodies read by the routes themselves (multipart or JSON): added to the schema's components
JSON_BODY_MODELS: tuple[type[BaseModel], ...] = (EmbedJSON, SearchJSON, ItemJSON)


def create_app(settings: Settings, *, backend: Backend | None = None) -> FastAPI:
    """The app for `settings`. Pass `backend` to serve an already-open backend (not closed on exit)."""
    metrics = Metrics(multiprocess=settings.workers > 1)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        res = await run_in_threadpool(open_resources, settings, metrics, backend)
        res.batcher.start()
        res.committer.start()
        res.watcher.start()
        app.state.resources = res
        refresher = None
        if metrics.multiprocess:  # several workers: gauges written to the shared directory every second
            metrics.forget_dead_workers()
            refresher = asyncio.get_running_loop().create_task(metrics.refresh_forever())
        log.info(
            "serving model %s v%d (%s) with %d indexed items from %s",
            res.spec.name, res.spec.version, settings.backend_name, len(res.index), settings.index_dir,
        )
        try:
            yield
        finally:
            if refresher is not None:
                refresher.cancel()
                metrics.forget_dead_workers(stopping=True)
            app.state.resources = None
            await res.batcher.stop()
            await res.committer.stop()
            await run_in_threadpool(close_resources, res)
            log.info("stopped; index committed")

    app = SimsearchAPI(
        title="simsearch",
        version="1",
        description=DESCRIPTION,
        lifespan=lifespan,
        # FastAPI's native OpenTelemetry looks the global providers up on every request (~3% of a
        # small request's interpreter time); this server reports through /metrics (Prometheus)
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.resources = None
    install_error_handlers(app)
    app.add_exception_handler(IndexModelMismatch, _model_mismatch)
    for module in (embed, search, items, health, page, duplicates):
        app.include_router(module.router)
    app.include_router(map_view.router)
    page.mount_static(app)

    # added innermost first: metrics sees everything, including 413s from the body limit.
    # SimsearchAPI answers multipart POST /v1/embed before these, doing their part itself (fastpath.py)
    app.add_middleware(BodySizeLimitMiddleware, max_body_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["*"], allow_headers=["*"]
        )
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(WorkerHeaderMiddleware)
    _install_openapi(app)
    return app


async def _model_mismatch(request: Request, exc: Exception) -> JSONResponse:
    """A write after the index changed hands (a --reembed switch): refused by the store, never
    written with the old model. Retry: the server follows the switch within seconds when its
    model directory (or Triton) has the new model; else it stays not ready (see /readyz)."""
    body = ErrorResponse(detail=str(exc), reason="model_mismatch")
    return JSONResponse(body.model_dump(mode="json"), status_code=503, headers={"Retry-After": "2"})


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            _, defs = models_json_schema(
                [(m, "validation") for m in JSON_BODY_MODELS], ref_template="#/components/schemas/{model}"
            )
            schema.setdefault("components", {}).setdefault("schemas", {}).update(defs.get("$defs", {}))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
