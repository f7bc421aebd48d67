"""Request and response bodies of the HTTP API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.errors import ErrorItem


class ImageB64(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data: str = Field(description="the image file's bytes, base64-encoded (standard alphabet)")
    filename: str | None = Field(None, max_length=255)


class EmbedJSON(BaseModel):
    """JSON alternative to the multipart upload of /v1/embed."""

    model_config = ConfigDict(extra="forbid")

    images: list[ImageB64] = Field(min_length=1)


class EmbedResult(BaseModel):
    index: int = Field(description="position of the image in the request")
    filename: str | None = None
    embedding: list[float] | None = Field(None, description="l2-normalised vector; null when error is set")
    width: int | None = Field(None, description="original width in pixels (upright)")
    height: int | None = None
    error: ErrorItem | None = None


class EmbedResponse(BaseModel):
    model: str
    model_version: int
    dim: int
    results: list[EmbedResult]


class SearchFilter(BaseModel):
    """Only items that pass every condition are searched (inside the index scan: k results whenever k pass)."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, str | int | float | bool | None] = Field(
        default_factory=dict, description="equality on top-level keys of the item's metadata, JSON types respected"
    )
    path_prefix: str | None = Field(None, min_length=1, max_length=4096, description="the stored path starts with this")
    path_glob: str | None = Field(
        None, min_length=1, max_length=4096, description="SQLite GLOB on the stored path (* crosses /, case-sensitive)"
    )


class SearchJSON(BaseModel):
    """JSON alternative to the multipart upload of /v1/search: exactly one of image, vector, id."""

    model_config = ConfigDict(extra="forbid")

    image: ImageB64 | None = None
    vector: list[float] | None = Field(None, description="a query vector of the index's dimension")
    id: int | None = Field(None, ge=0, le=2**63 - 1, description="search with the vector of this indexed item")
    k: int = Field(10, ge=1)
    offset: int = Field(0, ge=0, description="skip the best `offset` results: the next page is offset + k")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="leave out neighbours under this cosine "
                                    "(the raw cosine, also when the index whitens)")
    filter: SearchFilter | None = None
    exclude: bool = Field(False, description="with `id`: leave the item itself out of its neighbours")

    @model_validator(mode="after")
    def _exactly_one_query(self) -> SearchJSON:
        given = [n for n in ("image", "vector", "id") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of image, vector, id (got {given or 'none'})")
        return self


class Item(BaseModel):
    id: int
    path: str
    width: int
    height: int
    size: int = Field(description="file size in bytes")
    sha256: str
    mtime: float
    added_at: float
    metadata: dict[str, Any] = Field(default_factory=dict)
    thumbnail_url: str


class Neighbour(BaseModel):
    id: int
    score: float = Field(description="inner product of l2-normalised vectors (cosine similarity); in the "
                         "whitened space when the index whitens (index/README.md, Whitening)")
    path: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    thumbnail_url: str


class SearchResponse(BaseModel):
    k: int
    query: str = Field(description="what was searched with: image, vector or id")
    neighbours: list[Neighbour]
    offset: int = 0
    next_offset: int | None = Field(None, description="the next page's offset; null when this page was not full "
                                    "or the next one would pass max_k")


class ItemJSON(BaseModel):
    """JSON alternative to the multipart upload of POST /v1/items."""

    model_config = ConfigDict(extra="forbid")

    image: ImageB64
    metadata: dict[str, Any] = Field(default_factory=dict)


class ItemCreated(BaseModel):
    item: Item
    duplicate_of: list[int] = Field(
        default_factory=list, description="ids of items already indexed with the same bytes"
    )


class Deleted(BaseModel):
    id: int
    deleted: bool


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, bool]
    detail: dict[str, str] = Field(default_factory=dict)
    model: str | None = None
    backend: str
    items: int | None = None


class DuplicateItem(BaseModel):
    id: int
    path: str
    sha256: str
    width: int
    height: int
    size: int = Field(description="file size in bytes")
    score: float = Field(description="cosine similarity to the group's centre (1 for the centre)")
    exact: bool = Field(description="the same bytes as the keeper (same sha256)")
    thumbnail_url: str


class DuplicateGroup(BaseModel):
    keeper: int = Field(description="the item proposed to keep: most pixels, then the largest file, then the "
                        "oldest; listed first")
    centre: int = Field(description="the item the group was built around: every member is a copy of it")
    kind: str = Field(description="exact (all the same bytes), duplicate (all >= the duplicate threshold) or similar")
    size: int
    min_score: float = Field(description="the lowest member's similarity to the centre")
    items: list[DuplicateItem]


class DuplicatesResponse(BaseModel):
    threshold: float = Field(description="the cosine similarity this report groups by")
    thresholds: dict[str, float] = Field(description="the index's value of each level, duplicate and similar: "
                                         "measured by `index build` on its model and images, else the defaults")
    caution: str | None = Field(None, description="set when the index's model puts many pictures as close to "
                                "a different picture as a copy of them lands: review before deleting")
    generation: int = Field(description="the index commit the report is from")
    count: int = Field(description="items in the index")
    groups_total: int
    items_in_groups: int
    offset: int
    limit: int
    next_offset: int | None = Field(None, description="the next page's offset; null on the last page")
    groups: list[DuplicateGroup]
