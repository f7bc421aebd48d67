"""GET /v1/duplicates: groups of exact and near duplicates (index/duplicates.py), page by page;
GET /duplicates: the page that shows them and deletes all but one of a group (DELETE /v1/items,
with the API key when the server has one).

A report is computed once per (commit, threshold) and cached, so paging through it does not search
the collection again; the first request after a commit pays for the range search (exact up to
50,000 items: about n^2 * D multiply-adds).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from index.duplicates import LEVELS, MIN_THRESHOLD, DuplicateCache
from server.errors import ERROR_RESPONSES, ApiError
from server.items_view import thumbnail_url
from server.routes.page import STATIC_DIR
from server.schemas import DuplicateGroup, DuplicateItem, DuplicatesResponse
from server.state import Resources, get_resources

router = APIRouter(tags=["duplicates"], responses=ERROR_RESPONSES)

_reports = DuplicateCache()


@router.get(
    "/v1/duplicates",
    response_model=DuplicatesResponse,
    summary="Groups of exact and near-duplicate items",
    description="Items whose vectors have a cosine similarity >= the threshold (the `level`'s: measured by "
    "`index build` on the index's own model and images, else the defaults, "
    f"duplicate {LEVELS['duplicate']} or similar {LEVELS['similar']}; or an explicit `threshold`), grouped "
    "around a centre (every member is a copy of it); `keeper`, listed first, is the file proposed to keep "
    "(most pixels, then largest, then oldest). Items with the "
    "same bytes (sha256) are always grouped. Largest groups first; `offset`/`limit` page through them.",
)
async def duplicates(
    res: Annotated[Resources, Depends(get_resources)],
    level: Annotated[Literal["duplicate", "similar"] | None, Query(description="a default threshold")] = None,
    threshold: Annotated[float | None, Query(ge=MIN_THRESHOLD, le=1.0, description="instead of a level")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=500)] = 20,
) -> DuplicatesResponse:
    if threshold is not None and level is not None:
        raise ApiError(422, "invalid_request", "give a threshold or a level, not both")
    report = await run_in_threadpool(_reports.report, res.index.directory, threshold, level)
    page = report.groups[offset : offset + limit]
    groups = [
        DuplicateGroup(keeper=g.keeper, centre=g.centre, kind=g.kind, size=g.size, min_score=g.min_score, items=[
            DuplicateItem(id=m.id, path=m.path, sha256=m.sha256, width=m.width, height=m.height, size=m.size,
                          score=m.score, exact=m.exact, thumbnail_url=thumbnail_url(m.id)) for m in g.items])
        for g in page
    ]
    more = offset + limit < len(report.groups)
    return DuplicatesResponse(
        threshold=report.threshold, thresholds=report.thresholds, caution=report.caution,
        generation=report.generation, count=report.count,
        groups_total=len(report.groups), items_in_groups=report.items_in_groups, offset=offset, limit=limit,
        next_offset=offset + limit if more else None, groups=groups,
    )


@router.get("/duplicates", include_in_schema=False)
async def duplicates_page() -> FileResponse:
    return FileResponse(STATIC_DIR / "duplicates.html", media_type="text/html")
