"""GET /healthz (the process answers), GET /readyz (model, index and batcher really work, and the
model is the one the index belongs to), GET /metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.concurrency import run_in_threadpool

from server.schemas import Health, Readiness
from server.state import Resources

router = APIRouter(tags=["health"])

READY_TIMEOUT_S = 5.0


@router.get("/healthz", response_model=Health, summary="Liveness: the process is up")
async def healthz() -> Health:
    return Health(status="ok")


async def _check(fn: object, timeout: float) -> tuple[bool, str]:
    try:
        ok = await asyncio.wait_for(run_in_threadpool(fn), timeout)  # type: ignore[arg-type]
    except asyncio.TimeoutError:
        return False, f"no answer within {timeout:.0f} s"
    except Exception as e:  # a readiness probe reports failures, it does not raise them
        return False, f"{type(e).__name__}: {e}"
    return bool(ok), "" if ok else "not ready"


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the model answers, the index is open, the batcher runs",
    responses={503: {"model": Readiness, "description": "not ready (see checks and detail)"}},
)
async def readyz(request: Request) -> Response:
    res: Resources | None = request.app.state.resources
    settings = request.app.state.settings
    if res is None:
        body = Readiness(
            ready=False, checks={"started": False}, detail={"started": "starting or stopping"},
            backend=settings.backend_name,
        )
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    backend_ok, backend_why = await _check(res.backend.ready, READY_TIMEOUT_S)
    index_ok, index_why = await _check(lambda: len(res.index) >= 0, READY_TIMEOUT_S)
    mismatch = res.watcher.mismatch  # the index changed hands and this server cannot follow (yet)
    checks = {"backend": backend_ok, "index": index_ok, "batcher": res.batcher.running,
              "model_matches_index": mismatch is None}
    detail = {k: v for k, v in (("backend", backend_why), ("index", index_why)) if v}
    if not res.batcher.running:
        detail["batcher"] = "not running"
    if mismatch is not None:
        detail["model_matches_index"] = mismatch
    ready = all(checks.values())
    body = Readiness(
        ready=ready,
        checks=checks,
        detail=detail,
        model=f"{res.spec.name} v{res.spec.version}",
        backend=settings.backend_name,
        items=len(res.index) if index_ok else None,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "metrics"}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
