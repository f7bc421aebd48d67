"""GET /v1/map: a 2-D layout of the indexed images (index/layout.py); GET /map: the page that draws it.

A layout is computed once per (index generation, method, limit, grid), in one background thread,
and kept in memory; requests for the same key share that one computation. A request waits up to
`wait` seconds for it and otherwise answers 202 (`status: computing`) so the page can poll. While
a newer generation's layout is computed, the last one of the same parameters is served with
`stale: true` (its sample may name an item deleted since: that thumbnail and search answer 404).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from index.layout import (
    DEFAULT_GRID,
    DEFAULT_MAX_POINTS,
    LAYOUT_METHODS,
    Layout,
    available_methods,
    compute_layout,
    fit_max,
    read_sample,
    resolve_method,
)
from server.errors import ERROR_RESPONSES, ApiError
from server.items_view import thumbnail_url
from server.priority import lower_current_thread_priority
from server.routes.page import STATIC_DIR
from server.state import Resources, get_resources

router = APIRouter(tags=["map"], responses=ERROR_RESPONSES)

MAX_LIMIT = 5000
STALE_WAIT_S = 2.0  # with an older layout to show, wait this long at most for the new one
MAP_NICE = 10  # a layout (UMAP especially) is background work: searches keep the CPU
Key = tuple[int, str, int, int]  # generation, method, limit, grid


class MapPoint(BaseModel):
    id: int
    x: float = Field(description="0..1, left to right")
    y: float = Field(description="0..1, top to bottom")
    thumbnail_url: str


class MapDensity(BaseModel):
    grid: int = Field(description="cells per side")
    cells: list[list[float]] = Field(description="items per cell, [row (y)][column (x)], over the same 0..1 square")


class MapResponse(BaseModel):
    status: Literal["ready", "computing"]
    generation: int = Field(description="the index commit the layout is of")
    stale: bool = Field(False, description="of an older commit; the current one's is being computed")
    method: str | None = Field(None, description="pca or umap")
    methods: list[str] = Field(default_factory=available_methods, description="the methods this server has")
    count: int = Field(0, description="items in the collection")
    fitted_on: int = Field(0, description="items the layout was fitted on (a seeded random sample)")
    density_of: str | None = Field(None, description="all: every item counted; sample: the sample, scaled")
    seconds: float = Field(0.0, description="time the layout took to compute")
    points: list[MapPoint] = Field(default_factory=list, description="a random sample of at most `limit` items")
    density: MapDensity | None = None


class LayoutCache:
    """Layouts by key, computed one at a time in a background thread (see the module docstring)."""

    def __init__(self) -> None:
        self._done: dict[tuple[str, int, int], tuple[int, Layout]] = {}  # (method, limit, grid) -> latest
        self._running: dict[Key, Future[Layout]] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="simsearch-map",
                                        initializer=lambda: lower_current_thread_priority(MAP_NICE))

    def get(self, key: Key, compute: Callable[[], Layout]) -> tuple[Layout | None, int | None, Future[Layout] | None]:
        """(layout, its generation, the future of the wanted one when it is not ready yet)."""
        generation, rest = key[0], key[1:]
        with self._lock:
            latest = self._done.get(rest)
            if latest is not None and latest[0] == generation:
                return latest[1], generation, None
            future = self._running.get(key)
            if future is None:
                future = self._pool.submit(self._run, key, compute)
                self._running[key] = future
        return (latest[1], latest[0], future) if latest is not None else (None, None, future)

    def _run(self, key: Key, compute: Callable[[], Layout]) -> Layout:
        try:
            layout = compute()
            with self._lock:
                current = self._done.get(key[1:])
                if current is None or current[0] <= key[0]:
                    self._done[key[1:]] = (key[0], layout)
            return layout
        finally:
            with self._lock:
                self._running.pop(key, None)


def _cache(request: Request) -> LayoutCache:
    cache = getattr(request.app.state, "map_cache", None)
    if cache is None:
        cache = request.app.state.map_cache = LayoutCache()
    return cache


def _answer(layout: Layout, generation: int, *, stale: bool) -> MapResponse:
    return MapResponse(
        status="ready", generation=generation, stale=stale, method=layout.method, count=layout.count,
        fitted_on=int(layout.extra.get("fitted_on", len(layout.ids))), density_of=layout.density_of,
        seconds=round(layout.seconds, 3),
        points=[MapPoint(id=int(i), x=round(float(x), 5), y=round(float(y), 5), thumbnail_url=thumbnail_url(int(i)))
                for i, (x, y) in zip(layout.ids, layout.xy, strict=True)],
        density=MapDensity(grid=int(layout.density.shape[0]), cells=layout.density.round(3).tolist()),
    )


@router.get(
    "/v1/map",
    response_model=MapResponse,
    summary="A 2-D map of the indexed images",
    description="A layout (PCA, or UMAP with the `map` extra) of a seeded random sample of the "
    "collection: at most `limit` items with their 0..1 coordinates, and a `grid` x `grid` density of "
    "all items. Computed once per index commit and cached; 202 with `status: computing` when it is "
    "not ready within `wait` seconds (ask again).",
    responses={202: {"model": MapResponse, "description": "still computing: ask again"}},
)
async def get_map(
    request: Request,
    res: Annotated[Resources, Depends(get_resources)],
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="most points (thumbnails) returned")] = DEFAULT_MAX_POINTS,
    method: Annotated[str, Query(description=f"one of {', '.join(LAYOUT_METHODS)} (umap: the `map` extra)")] = "pca",
    grid: Annotated[int, Query(ge=4, le=256, description="density cells per side")] = DEFAULT_GRID,
    wait: Annotated[float, Query(ge=0, le=60, description="seconds to wait for a layout being computed")] = 10.0,
) -> JSONResponse | MapResponse:
    try:
        resolve_method(method, 0)  # an unknown method, or umap without umap-learn: 422 naming the choices
    except ValueError as e:
        raise ApiError(422, "invalid_request", str(e)) from None
    index = res.index
    generation = index.generation

    def compute() -> Layout:
        ids, vectors, count = read_sample(index, max(fit_max(method), limit))
        return compute_layout(ids, vectors, count, method=method, max_points=limit, grid=grid)

    layout, of, future = _cache(request).get((generation, method, limit, grid), compute)
    if future is not None:
        try:
            timeout = wait if layout is None else min(wait, STALE_WAIT_S)
            fresh = await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), timeout)
            return _answer(fresh, generation, stale=False)
        except asyncio.TimeoutError:
            pass
    if layout is not None and of is not None:
        return _answer(layout, of, stale=of != generation)
    body = MapResponse(status="computing", generation=generation)
    return JSONResponse(body.model_dump(mode="json"), status_code=202, headers={"Retry-After": "2"})


@router.get("/map", include_in_schema=False)
async def map_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "map.html", media_type="text/html")
