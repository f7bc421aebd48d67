"""The duplicate thresholds of one index, measured on its own model and images.

The defaults (index/duplicates.py: `duplicate` 0.975, `similar` 0.955) were measured with one
well-trained model (bench/duplicates.py). Cosines are a property of the model: an encoder trained
for a few minutes on a user's photos puts distinct pictures much closer together; with the demo's
180-s model on 3,068 garment photos, 48% of them had a neighbour above 0.975, and the duplicates
page offered to delete them. So `index build` measures, on a sample of the folder's images:

- **copies**: each sampled image made into the near copies of index/near_copies.py (half size,
  JPEG q40, 10% crop, mirror, PNG), embedded with the index's model; their cosines to the
  original's stored vector say how close a real copy lands;
- **neighbours**: each sampled image's nearest other item, among the stored vectors (all of them
  up to `POOL` items, else a sample of that many), that has other bytes and is further from it than
  the farthest of its made copies and copies of copies (`COMPOUNDS`: two copies of one original
  are that far apart). Nearer ones may be copies the folder holds, and a collection full of copies
  must not raise its own threshold. The cosine says how close a different picture comes.

Each level is then raised above the default, never lowered below it: `duplicate` to the 95th
percentile of the neighbours (so at most ~5% of the pictures have a neighbour there), but not above
the 10th percentile of the copies (so at least ~90% of copies are still found); `similar` to the
80th percentile of the neighbours, but not above the 1st percentile of the copies. With a
well-trained model the neighbours sit below the defaults and nothing changes. The result is kept in
the index's info (`dup_levels`, with the model fingerprint and the item count it was measured at)
and measured again when the model changes or the index has grown `REMEASURE_GROWTH` times.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from embed.backends.base import Backend
from embed.decode import DecodeError
from embed.preprocess import ResizeRule, load_image_array
from index.duplicates import DUPLICATE_THRESHOLD, LEVELS, SIMILAR_THRESHOLD, vector_chunks
from index.near_copies import TRANSFORMS, crop10, flip, half, jpeg40
from index.schema import DB_FILE
from index.store import ImageIndex

logger = logging.getLogger(__name__)

SAMPLE = 200  # images made into copies
POOL = 50_000  # stored vectors searched for each sampled image's nearest neighbour
NEIGHBOURS = 32  # of them, the nearest looked at
MIN_ITEMS = 50  # below this, the defaults: too few pictures to say how close different ones come
REMEASURE_GROWTH = 4
COMPOUNDS = [(half, crop10), (jpeg40, flip), (crop10, flip), (half, jpeg40)]  # copies of copies


def levels_due(info: dict[str, Any], fingerprint: str, count: int) -> bool:
    """Whether the index's levels are missing, of another model, or measured on a much smaller index."""
    if count < MIN_ITEMS:
        return False
    kept = info.get("dup_levels") or {}
    return kept.get("fingerprint") != fingerprint or count >= REMEASURE_GROWTH * int(kept.get("count", 0))


def measure_levels(directory: str | Path, root: str | Path, backend: Backend, *, seed: int = 0) -> dict[str, Any] | None:
    """The levels of the index at `directory` (its committed rows), with what they rest on; None when
    too few of its folder's images can be read to say."""
    conn = sqlite3.connect(f"file:{Path(directory) / DB_FILE}?mode=ro", uri=True, timeout=60)
    try:
        dim = backend.spec.embedding_dim
        total = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
        keep_every = max(1, -(-total // POOL))
        ids, vecs = [], []
        for n, (chunk_ids, chunk) in enumerate(vector_chunks(conn, dim)):
            ids.append(chunk_ids[n % keep_every :: keep_every] if keep_every > 1 else chunk_ids)
            vecs.append(chunk[n % keep_every :: keep_every] if keep_every > 1 else chunk)
        pool_ids, pool = np.concatenate(ids), np.ascontiguousarray(np.concatenate(vecs), dtype=np.float32)
        rows = {int(i): (p, s) for i, p, s in conn.execute("SELECT id, path, sha256 FROM items")
                if not Path(p).is_absolute()}  # the folder's own files (uploads live elsewhere)
    finally:
        conn.close()
    rng = np.random.default_rng(seed)
    candidates = [i for i in pool_ids.tolist() if i in rows]
    chosen = rng.permutation(candidates)[: SAMPLE * 2].tolist()  # some files may be gone or unreadable
    rule = ResizeRule.of(backend.spec)
    position = {int(i): k for k, i in enumerate(pool_ids.tolist())}
    originals, copies, owners = [], [], []
    for item in chosen:
        if len(originals) == SAMPLE:
            break
        try:
            data = (Path(root) / rows[item][0]).read_bytes()
            made = [load_image_array(fn(data)[0], rule)[0] for fn in TRANSFORMS.values()]
            # two copies of one original are further apart than either is from it: what a copy of a copy is
            made += [load_image_array(g(f(data)[0])[0], rule)[0] for f, g in COMPOUNDS]
        except (OSError, DecodeError, ValueError):
            continue
        owners += [len(originals)] * len(made)
        originals.append(item)
        copies += made
    if len(originals) < min(SAMPLE, MIN_ITEMS // 2):
        return None
    copy_vecs = np.concatenate([backend.embed(np.stack(copies[k : k + 64])) for k in range(0, len(copies), 64)])
    mine = pool[[position[i] for i in originals]]
    cosines = np.einsum("ij,ij->i", mine[owners], copy_vecs)
    single = np.tile(np.arange(len(TRANSFORMS) + len(COMPOUNDS)) < len(TRANSFORMS), len(originals))
    positives = cosines[single]  # an original and one copy of it
    # each original's closest different picture: its nearest neighbour with other bytes that is
    # further from it than its farthest made copy, or copy of a copy (nearer ones may be copies of
    # it, or of the picture it is a copy of, that the folder holds)
    search = faiss.IndexFlatIP(dim)
    search.add(pool)
    scores, found = search.search(mine, NEIGHBOURS)
    owners_arr = np.asarray(owners)
    neighbours = []
    for k, item in enumerate(originals):
        sha, farthest_copy = rows[item][1], float(cosines[owners_arr == k].min())
        best = next((float(s) for s, j in zip(scores[k], found[k], strict=True)
                     if j >= 0 and int(pool_ids[j]) != item and rows.get(int(pool_ids[j]), ("", ""))[1] != sha
                     and s < farthest_copy - 1e-4), None)
        if best is not None:
            neighbours.append(best)
    neighbours_arr = np.array(neighbours or [0.0])
    duplicate = max(DUPLICATE_THRESHOLD, min(float(np.quantile(neighbours_arr, 0.95)), float(np.quantile(positives, 0.10))))
    similar = max(SIMILAR_THRESHOLD, min(float(np.quantile(neighbours_arr, 0.80)), float(np.quantile(positives, 0.01))))
    levels = {"duplicate": round(duplicate, 4), "similar": round(min(similar, duplicate), 4)}
    return {**levels, "defaults": dict(LEVELS), "fingerprint": backend.spec.fingerprint, "count": total,
            "sample": len(originals),
            "copies_found": {k: round(float(np.mean(positives >= v)), 3) for k, v in levels.items()},
            "pictures_with_a_neighbour_above": {k: round(float(np.mean(neighbours_arr >= v)), 3)
                                                for k, v in levels.items()}}


def measure_and_keep(index: ImageIndex, backend: Backend) -> dict[str, Any] | None:
    """The index's duplicate thresholds measured on its model and folder (`measure_levels`),
    when it has none for this model yet or has grown past them; committed with the index."""
    spec = backend.spec
    if not spec.fingerprint or not index.meta.get("root") or \
            not levels_due(index.info(), spec.fingerprint, len(index)):
        return None
    measured = measure_levels(index.directory, index.meta["root"], backend)
    if measured is None:
        return None
    index.set_info(dup_levels=measured)
    index.commit()
    logger.info("duplicate levels measured on %d of the folder's images: %s (defaults %s)", measured["sample"],
                {k: measured[k] for k in ("duplicate", "similar")}, measured["defaults"])
    return measured
