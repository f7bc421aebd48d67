"""Index a folder incrementally and resumably.

One run:

1. scan the folder (recursive) and compare with the index: a file whose path, size and mtime are
   all unchanged is skipped without being read;
2. read and sha256 the others (threads): same content as before (only touched) -> the record's
   mtime is updated; the content of a file that has disappeared from its old path -> the record
   moves to the new path; the content of a file already indexed elsewhere or seen earlier in this
   run -> reported as a duplicate, not embedded; otherwise it is decoded and embedded
   (`embed.Embedder`, decoding overlapped with inference);
3. commit every `commit_every` embedded files (and at least every `commit_interval_s` seconds), so
   a killed run loses at most that much work and a rerun continues from there; vectors taken from
   a vector source cost nothing to take again, so they commit in batches `INGEST_COMMIT_FACTOR`
   times as large (a commit's cost is mostly per commit: the pages of the sha256 index it rewrites
   and its fsync);
4. drop the records of files that are gone; commit; return the JSON summary.

Nothing that is committed is embedded again by a rerun, since its path, size and mtime match.

The folder's items are those with paths relative to the indexed root. Items added through the
server have absolute paths (their bytes are under INDEX/uploads/): a build never treats them as
files gone from the folder, and an index the server created (no root yet) takes the folder as its
root on the first build.

The index must belong to the model (index/identity.py), else the build stops with a one-line
error; with `reembed` every item is first re-embedded with the new model and the index switched
to it atomically (index/reembed.py), then the folder is brought up to date as usual.

A `VectorSource` (index/vector_source.py; the Parquet shards of `index build --ray`) may supply
what step 2 reads and computes: a file it knows under the same (path, size, mtime) takes its
sha256, vector or failure from it, unread, and goes through the same decisions; the others are
read and embedded here.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from embed.backends.base import Backend
from embed.decode import DEFAULT_MAX_PIXELS, DecodeError
from embed.embedder import Embedder, default_decode_workers, default_max_decode_workers
from embed.spec import ModelSpec
from index import dup_calibration, identity, whitening
from index.build_lock import exclusive_build
from index.identity import IndexModelMismatch
from index.records import IndexedFile
from index.reembed import reembed_index
from index.scan import IMAGE_EXTENSIONS, FileJob, FileStat, read_and_hash, scan_folder
from index.schema import DB_FILE, IndexDirError
from index.store import ImageIndex
from index.vector_source import Precomputed, VectorSource

logger = logging.getLogger(__name__)

# Rows per commit when ingesting a vector source, in units of `commit_every`: 512 rows a commit cost
# 70 us a row in SQLite, 5,000 rows 32 us (the sha256 index's random pages, rewritten per commit).
INGEST_COMMIT_FACTOR = 16


@dataclass
class BuildConfig:
    folder: str
    out: str
    batch_size: int = 64
    decode_workers: int = field(default_factory=default_decode_workers)
    max_decode_workers: int = field(default_factory=default_max_decode_workers)  # while decoding is the bottleneck
    commit_every: int = 512
    commit_interval_s: float = 30.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    extensions: tuple[str, ...] = IMAGE_EXTENSIONS
    index_mode: str = "auto"  # applied when the index is created, and by `retrain`
    memory_budget: int | str | None = None  # None: the index's own (a new one: the default, index/budget.py)
    recall_target: float | None = None  # None: the index's own (a new one: 0.95)
    whiten: str | None = None  # auto|on|off; None: the index's own (a new one: auto, index/whitening.py)
    retrain: bool = False  # at the end, train the vector index again and tune it (index/compaction.py)
    rehash: bool = False  # hash every file, not only those whose size or mtime changed
    reembed: bool = False  # an index of another model: re-embed every item with this one first
    progress: bool = True


def open_index_for(cfg: BuildConfig, spec: ModelSpec) -> tuple[ImageIndex, bool]:
    """The index at `cfg.out` opened (or created) for this folder and model, and whether it must be
    re-embedded first (only with `cfg.reembed`; without it another model's index is refused)."""
    root = str(Path(cfg.folder).resolve())
    created = not (Path(cfg.out) / DB_FILE).is_file()
    if created:
        index = ImageIndex.create(cfg.out, spec.embedding_dim, model_name=spec.name, model_version=spec.version,
                                  root=root, index_mode=cfg.index_mode, memory_budget=cfg.memory_budget,
                                  whiten=cfg.whiten or whitening.DEFAULT_MODE)
    else:
        index = ImageIndex.open(cfg.out)
    try:
        index.configure(memory_budget=cfg.memory_budget, recall_target=cfg.recall_target,
                        index_mode=cfg.index_mode if cfg.retrain else None,  # recorded with the next commit
                        whiten=cfg.whiten)
        reembed = False
        if cfg.reembed and not created:
            try:  # a legacy index (no fingerprint) cannot prove it is this model's: re-embed it too
                reembed = identity.check(index.meta, spec, directory=cfg.out) != identity.SAME
            except IndexModelMismatch:
                reembed = True
        if not reembed:
            index.bind_model(spec)  # IndexModelMismatch: the one-line error of `index build`
        indexed_root = index.meta.get("root") or ""
        if indexed_root != root:
            if indexed_root:
                raise IndexDirError(f"{cfg.out} indexes the folder {indexed_root}, not {root}")
            index.adopt_root(root)  # created by the server, which has no folder
            index.commit()
    except BaseException:
        index.rollback()
        index.close()
        raise
    return index, reembed


@dataclass
class _Run:
    """Counters and the work not yet committed."""

    summary: dict[str, Any]
    vectors: list[np.ndarray] = field(default_factory=list)
    records: list[dict[str, Any]] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    embedded_here: int = 0  # of the records: embedded by this process (the rest came from a vector source)
    last_commit: float = field(default_factory=time.monotonic)

    def commit_due(self, cfg: BuildConfig) -> bool:
        return (self.embedded_here >= cfg.commit_every
                or len(self.records) >= cfg.commit_every * INGEST_COMMIT_FACTOR
                or time.monotonic() - self.last_commit > cfg.commit_interval_s)


def decode_threads(n: int | None) -> dict[str, int]:
    """BuildConfig's decoding threads for `--decode-workers N`: fixed at N; None: the defaults, which
    adapt (embed/embedder.py)."""
    if n is None:
        return {}
    if n < 1:
        raise ValueError(f"--decode-workers must be at least 1, got {n}")
    return {"decode_workers": n, "max_decode_workers": n}


def build_index(cfg: BuildConfig, backend: Backend, model_source: dict[str, Any] | None = None,
                vectors: VectorSource | None = None, on_disk: dict[str, FileStat] | None = None) -> dict[str, Any]:
    """Bring the index at `cfg.out` up to date with `cfg.folder`; returns the summary (also logged).

    `vectors`: embeddings made elsewhere for this model (the builder never checks their model: the
    source must only answer with this model's vectors), used instead of reading and embedding.
    `on_disk`: the folder's listing (`scan_folder`) when the caller has just walked it, so the folder
    is walked (and its skipped entries reported) once. One build per index at a time: IndexBusy
    while another process builds it (index/build_lock.py).
    """
    with exclusive_build(cfg.out):
        return _build(cfg, backend, model_source, vectors, on_disk)


def _build(cfg: BuildConfig, backend: Backend, model_source: dict[str, Any] | None, vectors: VectorSource | None,
           on_disk: dict[str, FileStat] | None) -> dict[str, Any]:
    start = time.monotonic()
    spec = backend.spec
    root = Path(cfg.folder)
    if on_disk is None:
        on_disk = scan_folder(root, cfg.extensions, index_dir=cfg.out)
    embedder = Embedder(backend, batch_size=cfg.batch_size, decode_workers=cfg.decode_workers,
                        max_decode_workers=cfg.max_decode_workers, max_pixels=cfg.max_pixels)
    index, needs_reembed = open_index_for(cfg, spec)
    try:
        reembedded: dict[str, Any] | None = None
        if needs_reembed:
            reembedded = reembed_index(index, embedder, root=index.meta["root"], commit_every=cfg.commit_every,
                                       progress=cfg.progress)
        elif cfg.reembed:
            reembedded = {"skipped": "the index already belongs to this model"}
        if index.info().get("model_source") != (model_source or {}):
            index.set_info(model_source=model_source or {})
        # the folder's items only: uploads through the server (absolute paths) are not its files
        files = index.files()
        indexed = {f.path: f for f in files if not os.path.isabs(f.path)}
        # contents the index held when the run began: a file whose sha256 is not among them (nor among
        # this run's, `seen`) has no copy in the index, and needs no query (a query per file took a
        # fifth of the main thread's time on 32-px images: each one gave the GIL to the decoding threads)
        shas_at_start = {f.sha256 for f in files}
        del files
        gone = {p: r for p, r in indexed.items() if p not in on_disk}
        gone_by_sha = {r.sha256: r for r in gone.values()}
        todo = [FileJob(p, s.size, s.mtime) for p, s in on_disk.items()
                if cfg.rehash or p not in indexed or (indexed[p].size, indexed[p].mtime) != (s.size, s.mtime)]
        summary: dict[str, Any] = {
            "folder": str(root.resolve()), "index": str(Path(cfg.out).resolve()),
            "model": {"name": spec.name, "version": spec.version, "dim": spec.embedding_dim,
                      "fingerprint": spec.fingerprint},
            "scanned": len(on_disk), "unchanged": len(on_disk) - len(todo), "added": 0, "updated": 0,
            "touched": 0, "moved": 0, "removed": 0, "embedded": 0,
            "skipped_duplicates": [], "failed": [],
        }
        if reembedded is not None:
            summary["reembed"] = reembedded
        run = _Run(summary)
        seen: dict[str, str] = {}
        pre = _Known(vectors)
        if vectors is not None:
            summary["from_vector_source"] = 0

        def to_embed():
            for job in _hashed(root, todo, pre, window=2 * cfg.batch_size):
                if job.error is not None:
                    summary["failed"].append({"path": job.path, "reason": "unreadable", "message": str(job.error)})
                    bar.update()
                    continue
                old = indexed.get(job.path)
                if old is not None and old.sha256 == job.sha256:
                    if (old.size, old.mtime) != (job.size, job.mtime):
                        index.update(old.id, size=job.size, mtime=job.mtime)
                        summary["touched"] += 1
                    else:
                        summary["unchanged"] += 1
                elif job.sha256 in gone_by_sha:  # the content of a file that left its old path
                    moved = gone_by_sha.pop(job.sha256)
                    gone.pop(moved.path, None)
                    if old is not None:  # it landed on an indexed path: that path's old content goes
                        summary["removed"] += index.remove([old.id])
                    index.update(moved.id, path=job.path, size=job.size, mtime=job.mtime)
                    summary["moved"] += 1
                elif (dup := seen.get(job.sha256)) or (dup := _indexed_copy(index, job, old, gone, shas_at_start)):
                    summary["skipped_duplicates"].append({"path": job.path, "duplicate_of": dup})
                    if old is not None:  # this path now holds a copy of another file: drop its old vector
                        summary["removed"] += index.remove([old.id])
                else:
                    seen[job.sha256] = job.path
                    known = pre.get(job)
                    if known is None:
                        yield job
                        continue
                    _take_precomputed(index, run, cfg, job, known, vectors, indexed.get(job.path))
                bar.update()

        with tqdm(total=len(todo), unit="img", desc="indexing", disable=not cfg.progress, smoothing=0.1) as bar:
            for job, result, size in embedder.iter_embed(to_embed(), load=lambda j: j.data):
                job.data = None
                bar.update()
                if isinstance(result, DecodeError):
                    summary["failed"].append({"path": job.path, "reason": result.reason, "message": result.message})
                    continue
                _stage(run, job, result, size, indexed.get(job.path))
                run.embedded_here += 1
                if run.commit_due(cfg):
                    _flush(index, run)
            _flush(index, run)
        if gone:
            summary["removed"] += index.remove(r.id for r in gone.values())
        index.commit()
        if cfg.retrain:
            summary["retrained"] = index.compact(retrain=True) is not None
        levels = dup_calibration.measure_and_keep(index, backend)
        if levels is not None:
            summary["duplicate_levels"] = {k: levels[k] for k in ("duplicate", "similar")}
        elapsed = time.monotonic() - start
        summary.update(count=len(index), elapsed_s=round(elapsed, 3),
                       images_per_s=round(summary["embedded"] / elapsed, 2) if elapsed > 0 else 0.0,
                       decode_threads=embedder.decoding_threads)
        return summary
    except BaseException:
        index.rollback()  # keep the last commit; a rerun redoes the rest
        raise
    finally:
        index.close()


class _Known:
    """The vector source's answer for each file, asked once, when the build reaches the file (a source
    may wait there for a file still being embedded elsewhere: index/shards.py, `LiveShards`)."""

    def __init__(self, vectors: VectorSource | None) -> None:
        self._vectors = vectors
        self._source_ready = getattr(vectors, "ready", None)  # only a source that may wait has it
        self._answers: dict[str, Precomputed | None] = {}

    def get(self, job: FileJob) -> Precomputed | None:
        if self._vectors is None:
            return None
        try:
            return self._answers[job.path]
        except KeyError:
            answer = self._answers[job.path] = self._vectors.lookup(job.path, job.size, job.mtime)
            return answer

    def ready(self, job: FileJob) -> bool:
        """Whether `get` answers without waiting."""
        return self._source_ready is None or job.path in self._answers or self._source_ready(job.path)


def _hashed(root: Path, todo: list[FileJob], pre: _Known, window: int):
    """The jobs in scan order (it decides which of two copies is the duplicate), each with its sha256:
    from the vector source unread, else read and hashed here (in threads)."""

    def to_read():
        # The reader looks ahead for files to read; past a file its source cannot answer yet (a
        # shard still to land) it hands back what it has instead of waiting there. It only asks for
        # a file when this loop has reached one to read, and every file before that one has an answer.
        for job in todo:
            while not pre.ready(job):
                yield None
            if pre.get(job) is None:
                yield job

    reader = read_and_hash(root, to_read(), workers=2, window=window)
    for job in todo:
        known = pre.get(job)
        if known is None:
            yield next(reader)  # the reader keeps the order of the jobs it is given: this one
        elif not known.sha256:  # the file could not be read where it was embedded
            job.error = OSError(known.message or known.reason)
            yield job
        else:
            job.sha256 = known.sha256
            yield job


def _take_precomputed(index: ImageIndex, run: _Run, cfg: BuildConfig, job: FileJob, known: Precomputed,
                      vectors: VectorSource | None, old: IndexedFile | None) -> None:
    """Stage a vector made elsewhere (or record its failure), as the embedding loop would."""
    if known.failed:
        run.summary["failed"].append({"path": job.path, "reason": known.reason, "message": known.message})
        return
    assert vectors is not None
    _stage(run, job, vectors.vector(job.path), (known.width, known.height), old)
    run.summary["from_vector_source"] += 1
    if run.commit_due(cfg):
        _flush(index, run)


def _indexed_copy(index: ImageIndex, job: FileJob, old: IndexedFile | None, gone: dict[str, IndexedFile],
                  shas_at_start: set[str]) -> str | None:
    """The path of another indexed file with this content that stays in the index, if any (one the
    run added itself is the caller's `seen`)."""
    if job.sha256 not in shas_at_start:
        return None
    for rec in index.find_by_sha256(job.sha256):
        if (old is None or rec.id != old.id) and rec.path not in gone:
            return rec.path
    return None


def _stage(run: _Run, job: FileJob, vector: np.ndarray, size: tuple[int, int] | None, old: IndexedFile | None) -> None:
    width, height = size or (0, 0)
    run.vectors.append(vector)
    run.records.append({"path": job.path, "size": job.size, "mtime": job.mtime, "sha256": job.sha256,
                        "width": width, "height": height})
    if old is not None:
        run.replaced.append(old.id)
        run.summary["updated"] += 1
    else:
        run.summary["added"] += 1


def _flush(index: ImageIndex, run: _Run) -> None:
    """One commit: the replaced records out, the new ones in, atomically."""
    if run.replaced:
        index.remove(run.replaced)
    if run.records:
        index.add(np.stack(run.vectors), run.records)
    index.commit()
    run.summary["embedded"] += len(run.records)
    run.vectors, run.records, run.replaced = [], [], []
    run.embedded_here = 0
    run.last_commit = time.monotonic()
    logger.debug("committed; %d embedded so far", run.summary["embedded"])


def resolve_model_source(model_dir: str | None, triton_url: str | None, protocol: str,
                         model_name: str | None) -> dict[str, Any]:
    if model_dir is not None:
        return {"model_dir": os.path.abspath(model_dir)}
    return {"triton_url": triton_url, "protocol": protocol, "model_name": model_name}
