"""Index records -> API models (one place that knows how an item looks on the wire)."""

from __future__ import annotations

from index.store import Hit, ItemRecord
from server.schemas import Item, Neighbour


def thumbnail_url(item_id: int) -> str:
    return f"/v1/items/{item_id}/thumbnail"


def item_out(record: ItemRecord) -> Item:
    return Item(
        id=record.id,
        path=record.path,
        width=record.width,
        height=record.height,
        size=record.size,
        sha256=record.sha256,
        mtime=record.mtime,
        added_at=record.added_at,
        metadata=dict(record.metadata or {}),
        thumbnail_url=thumbnail_url(record.id),
    )


def neighbour_out(hit: Hit) -> Neighbour:
    return Neighbour(
        id=hit.id,
        score=float(hit.score),
        path=hit.record.path,
        metadata=dict(hit.record.metadata or {}),
        thumbnail_url=thumbnail_url(hit.id),
    )
