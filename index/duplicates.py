"""Near-duplicate groups of an index: exact copies (same sha256) and near copies (resized,
re-encoded, lightly cropped or mirrored) whose vectors have a cosine similarity >= a threshold.

Two thresholds, because one cannot do both jobs (bench/duplicates.py measures them):

- `duplicate` (DUPLICATE_THRESHOLD): pairs above it are copies of one picture, nearly always;
  deleting all but one of a group loses nothing. Chosen as the lowest threshold whose pair
  precision is >= 0.95.
- `similar` (SIMILAR_THRESHOLD): lower, catches nearly every copy (pair recall >= 0.99) at the
  price of also grouping merely similar shots; a list to review, not to delete blindly.

Pairs are found with FAISS range search on the stored float32 vectors (the SQLite rows, never a
compressed index): exact (`IndexFlatIP`) up to EXACT_MAX items, above that an `IndexIVFFlat`
trained on a sample, whose scores are still exact but which may miss a pair whose two vectors fall
in lists more than `nprobe` apart. Exact duplicates come from the sha256 column, so they are
always found. Each item keeps its MAX_NEIGHBOURS best pairs (a folder of 10,000 blank frames
would otherwise make 10^8 pairs).

Grouping: around centres, not connected components. Items are taken most connected first (the sum
of their pairs' similarities: an original is closer to each of its copies than the copies are to
each other, so it comes before them); each joins the most similar centre already chosen that it is
a pair with, or else becomes a centre. So every member of a group is a direct copy of its centre,
and a chain a ~ b ~ c with a !~ c never puts a and c together just because b sits between them.
Connected components do: on 2,000 CIFAR-10 originals with 5 copies each, at 0.97, one component
held 44 different originals; the largest group here holds 7, and copies land with their original
as often (98.0% vs 99.0%; taking items by pixel count instead of connectedness: 93.6%, because a
mirrored copy indexed before its original became the centre). Within a group the `keeper`, the
item proposed to keep, is the best file: most pixels, then the largest, then the oldest.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from index import vector_index as vi
from index.schema import DB_FILE

DUPLICATE_THRESHOLD = 0.975  # bench/duplicates.py: the lowest threshold with pair precision >= 0.95
SIMILAR_THRESHOLD = 0.955  # bench/duplicates.py: the highest threshold with pair recall >= 0.99
LEVELS = {"duplicate": DUPLICATE_THRESHOLD, "similar": SIMILAR_THRESHOLD}
MIN_THRESHOLD = 0.5
CAUTION_SHARE = 0.15  # sampled pictures with a different picture above the duplicate level
MAX_NEIGHBOURS = 64
EXACT_MAX = vi.FLAT_MAX_VECTORS
IVF_NPROBE = 16
_CHUNK = 4096


@dataclass
class Member:
    id: int
    path: str
    sha256: str
    width: int
    height: int
    size: int
    score: float  # cosine similarity to the group's centre (1.0 for the centre)
    exact: bool  # the same bytes as the keeper


@dataclass
class Group:
    keeper: int  # proposed to keep: most pixels, then largest file, then oldest; listed first
    centre: int  # the item the group was built around: every member is a pair with it
    kind: str  # "exact": every member has the keeper's bytes; "duplicate": all >= duplicate; else "similar"
    min_score: float  # the lowest member's similarity to the centre
    items: list[Member] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.items)


@dataclass
class DuplicateReport:
    threshold: float
    generation: int
    count: int  # items in the index
    groups: list[Group]
    thresholds: dict[str, float] = field(default_factory=lambda: dict(LEVELS))  # the index's levels
    caution: str | None = None  # `caution_of`: the model tells copies from other pictures poorly

    @property
    def items_in_groups(self) -> int:
        return sum(g.size for g in self.groups)

    def to_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "thresholds": dict(self.thresholds), "caution": self.caution,
                "generation": self.generation,
                "count": self.count, "groups_total": len(self.groups), "items_in_groups": self.items_in_groups,
                "groups": [{**asdict(g), "size": g.size} for g in self.groups]}


def levels_of(meta: dict[str, Any]) -> dict[str, float]:
    """An index's levels (from its decoded meta): those `index build` measured on its own model and
    images (index/dup_calibration.py) while that model is still the index's, else the defaults."""
    kept = meta.get("info.dup_levels") or {}
    if kept.get("fingerprint") and kept["fingerprint"] == meta.get("model_fingerprint"):
        return {k: float(kept[k]) for k in LEVELS}
    return dict(LEVELS)


def caution_of(meta: dict[str, Any]) -> str | None:
    """A warning when the index's measured levels say its model puts many pictures as close to a
    different picture as their copies land (`CAUTION_SHARE` of the sample or more at `duplicate`)."""
    kept = meta.get("info.dup_levels") or {}
    share = float((kept.get("pictures_with_a_neighbour_above") or {}).get("duplicate", 0.0))
    if not kept.get("fingerprint") or kept["fingerprint"] != meta.get("model_fingerprint") or share < CAUTION_SHARE:
        return None
    return (f"this index's model puts {share:.0%} of its pictures as close to a different picture as a copy of "
            "them lands: review a group before deleting; a longer pretraining tells them apart better")


def resolve_threshold(threshold: float | None = None, level: str | None = None,
                      levels: dict[str, float] = LEVELS) -> float:
    """An explicit threshold, or the `levels` value of `level` ("duplicate" when neither is given)."""
    if threshold is not None and level is not None:
        raise ValueError("give a threshold or a level, not both")
    if threshold is None:
        level = level or "duplicate"
        if level not in levels:
            raise ValueError(f"level {level!r} is not one of {sorted(levels)}")
        return levels[level]
    if not MIN_THRESHOLD <= threshold <= 1.0:
        raise ValueError(f"threshold must be between {MIN_THRESHOLD} and 1.0, got {threshold}")
    return float(threshold)


def _connect(directory: Path) -> sqlite3.Connection:
    db = Path(directory) / DB_FILE
    if not db.is_file():
        raise FileNotFoundError(f"{directory} is not an index directory ({DB_FILE} is missing)")
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, isolation_level=None, timeout=60)


def vector_chunks(conn: sqlite3.Connection, dim: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    cur = conn.execute("SELECT id, vector FROM items ORDER BY id")
    while rows := cur.fetchmany(_CHUNK):
        ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        yield ids, np.frombuffer(b"".join(r[1] for r in rows), dtype="<f4").reshape(len(rows), dim)


def _pair_index(conn: sqlite3.Connection, ids: np.ndarray, dim: int) -> faiss.Index:
    """The stored vectors in a FAISS index whose positions are the rows' order (id order)."""
    if len(ids) <= EXACT_MAX:
        index = faiss.IndexFlatIP(dim)
    else:
        sample = np.sort(np.random.default_rng(0).choice(ids, min(len(ids), 100_000), replace=False))
        vecs = []
        for start in range(0, len(sample), 500):
            chunk = sample[start : start + 500].tolist()
            rows = conn.execute(f"SELECT vector FROM items WHERE id IN ({','.join('?' * len(chunk))}) ORDER BY id",
                                chunk).fetchall()
            vecs.append(np.frombuffer(b"".join(r[0] for r in rows), dtype="<f4").reshape(len(rows), dim))
        index = vi.train_ivf(np.concatenate(vecs))
        index.nprobe = IVF_NPROBE
    for _, vecs in vector_chunks(conn, dim):
        index.add(np.ascontiguousarray(vecs, dtype=np.float32))
    return index


def find_pairs(conn: sqlite3.Connection, ids: np.ndarray, dim: int, threshold: float) -> tuple[np.ndarray, ...]:
    """(a, b, score) positions into `ids` with a < b, score >= threshold, each item's best MAX_NEIGHBOURS."""
    index = _pair_index(conn, ids, dim)
    pa, pb, ps = [], [], []
    start = 0
    for _, vecs in vector_chunks(conn, dim):
        lims, scores, found = index.range_search(np.ascontiguousarray(vecs, dtype=np.float32), threshold - 1e-6)
        for q in range(len(vecs)):
            s, j = scores[lims[q] : lims[q + 1]], found[lims[q] : lims[q + 1]]
            keep = (j != start + q) & (s >= threshold)
            s, j = s[keep], j[keep]
            if len(s) > MAX_NEIGHBOURS:
                top = np.argpartition(-s, MAX_NEIGHBOURS)[:MAX_NEIGHBOURS]
                s, j = s[top], j[top]
            pa.append(np.full(len(j), start + q, dtype=np.int64))
            pb.append(j.astype(np.int64))
            ps.append(s.astype(np.float32))
        start += len(vecs)
    if not pa:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    a, b, s = np.concatenate(pa), np.concatenate(pb), np.concatenate(ps)
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((-s, hi, lo))  # each pair once (found from both ends), its best score
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), dtype=bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], s[first]


def _exact_pairs(conn: sqlite3.Connection, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions of items with the same bytes: each to the first (oldest) of its sha256."""
    a, b = [], []
    for (group,) in conn.execute("SELECT group_concat(id) FROM items WHERE sha256 != '' "
                                 "GROUP BY sha256 HAVING COUNT(*) > 1"):
        pos = np.searchsorted(ids, np.sort(np.array([int(x) for x in group.split(",")], dtype=np.int64)))
        a += [pos[0]] * (len(pos) - 1)
        b += pos[1:].tolist()
    return np.array(a, dtype=np.int64), np.array(b, dtype=np.int64)


def centred_groups(a: np.ndarray, b: np.ndarray, s: np.ndarray, n: int, ids: np.ndarray) -> dict[int, list[tuple[int, float]]]:
    """Grouping around centres (module docstring); pairs (a, b, s) of positions 0..n-1.
    Returns {centre position: [(member position, score to centre), ...]}, groups of two or more."""
    weight = np.bincount(np.concatenate([a, b]), weights=np.concatenate([s, s]).astype(np.float64), minlength=n)
    order = np.lexsort((ids, -np.round(weight, 4)))  # most connected first, then oldest (sums differ in the last bits)
    both_a, both_b = np.concatenate([a, b]), np.concatenate([b, a])
    both_s = np.concatenate([s, s])
    srt = np.argsort(both_a, kind="stable")
    nb, ns = both_b[srt], both_s[srt]
    starts = np.searchsorted(both_a[srt], np.arange(n + 1))
    centre_of = np.full(n, -1, dtype=np.int64)
    score_to = np.zeros(n, dtype=np.float32)
    has_pairs = starts[1:] > starts[:-1]
    for v in order[has_pairs[order]]:
        js, ss = nb[starts[v] : starts[v + 1]], ns[starts[v] : starts[v + 1]]
        leaders = centre_of[js] == js  # neighbours that are centres (so came earlier)
        if leaders.any():
            best = int(np.argmax(np.where(leaders, ss, -np.inf)))
            centre_of[v], score_to[v] = js[best], ss[best]
        else:
            centre_of[v], score_to[v] = v, 1.0
    groups: dict[int, list[tuple[int, float]]] = {}
    for v in np.flatnonzero(centre_of >= 0):
        groups.setdefault(int(centre_of[v]), []).append((int(v), float(score_to[v])))
    return {k: m for k, m in groups.items() if len(m) > 1}


def find_duplicates(directory: str | Path, threshold: float | None = None, level: str | None = None) -> DuplicateReport:
    """Groups of copies among the committed items of the index in `directory` (read-only), at
    `threshold`, or at the index's value of `level` (`levels_of`; "duplicate" when neither is given)."""
    resolve_threshold(threshold, level)  # a wrong argument fails before the index is read
    conn = _connect(Path(directory))
    try:
        conn.execute("BEGIN")  # one commit's rows throughout
        meta = {k: json.loads(v) for k, v in conn.execute("SELECT key, value FROM meta")}
        levels, caution = levels_of(meta), caution_of(meta)
        threshold = resolve_threshold(threshold, level, levels)
        dim, generation = int(meta["dim"]), int(meta["generation"])
        ids = np.fromiter((r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")), dtype=np.int64)
        if not len(ids):
            return DuplicateReport(threshold, generation, 0, [], levels, caution)
        a, b, s = find_pairs(conn, ids, dim, threshold)
        ea, eb = _exact_pairs(conn, ids)
        a, b = np.concatenate([ea, a]), np.concatenate([eb, b])
        s = np.concatenate([np.ones(len(ea), np.float32), s])  # same bytes: the same vector
        grouped = centred_groups(a, b, s, len(ids), ids)
        members = sorted({ids[p] for m in grouped.values() for p, _ in m})
        records = _records(conn, [int(i) for i in members])
        conn.execute("ROLLBACK")
    finally:
        conn.close()
    groups = []
    for centre, found in grouped.items():
        score = {int(ids[p]): min(sc, 1.0) for p, sc in found}
        best = max(score, key=lambda i: (records[i]["width"] * records[i]["height"], records[i]["size"], -i))
        order = sorted(score, key=lambda i: (i != best, -score[i], i))
        items = [Member(i, records[i]["path"], records[i]["sha256"], records[i]["width"], records[i]["height"],
                        records[i]["size"], round(score[i], 6), records[i]["sha256"] == records[best]["sha256"])
                 for i in order]
        cid = int(ids[centre])
        low = min(v for i, v in score.items() if i != cid)
        kind = ("exact" if all(m.exact for m in items) else "duplicate" if low >= levels["duplicate"] else "similar")
        groups.append(Group(best, cid, kind, round(low, 6), items))
    groups.sort(key=lambda g: (-g.size, g.keeper))
    return DuplicateReport(threshold, generation, len(ids), groups, levels, caution)


def _records(conn: sqlite3.Connection, ids: list[int]) -> dict[int, dict[str, Any]]:
    out: dict[int, dict[str, Any]] = {}
    for start in range(0, len(ids), 500):
        chunk = ids[start : start + 500]
        for rid, path, sha, w, h, size in conn.execute(
                f"SELECT id, path, sha256, width, height, size FROM items WHERE id IN ({','.join('?' * len(chunk))})",
                chunk):
            out[int(rid)] = {"path": path, "sha256": sha, "width": int(w), "height": int(h), "size": int(size)}
    return out


class DuplicateCache:
    """The last few reports per (index, commit, threshold): the server pages through one report
    instead of searching the collection again for every page. One computation at a time."""

    def __init__(self, entries: int = 4) -> None:
        self.entries = entries
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, int, float | None, str | None], DuplicateReport] = OrderedDict()

    def report(self, directory: str | Path, threshold: float | None = None, level: str | None = None) -> DuplicateReport:
        """`find_duplicates(directory, threshold, level)`, or the same report made earlier for this commit."""
        conn = _connect(Path(directory))
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        finally:
            conn.close()
        # the levels are the commit's (index meta): the same commit, the same levels
        key = (str(Path(directory).resolve()), int(json.loads(row[0])) if row else 0, threshold, level)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
            found = find_duplicates(directory, threshold, level)
            self._cache[(key[0], found.generation, threshold, level)] = found
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)
            return found
