"""`simsearch index build|query|stats|remove`.

    simsearch index build FOLDER --model MODEL_DIR --out INDEX_DIR [--reembed]
    simsearch index build FOLDER --model MODEL_DIR --out INDEX_DIR --memory-budget 4GB [--retrain] [--index-type ivfpq]
    simsearch index build FOLDER --triton-url localhost:8001 [--protocol grpc|http] --out INDEX_DIR
    simsearch index build FOLDER --model MODEL_DIR --out INDEX_DIR --ray [ADDRESS]   (docs/distributed.md)
    simsearch index query IMAGE --index INDEX_DIR -k 10 [--json] [--nprobe N] [--k-factor F] [--no-rerank]
    simsearch index query --id 42 --exclude --index INDEX_DIR -k 10 --offset 10 --min-score 0.5 \
        --where label=cat --path-prefix holidays/ --path-glob '*.jpg'
    simsearch index dups --index INDEX_DIR [--threshold T | --level duplicate|similar] [--json]
    simsearch index export --index INDEX_DIR --out F.parquet|F.npy
    simsearch index stats --index INDEX_DIR
    simsearch index remove --index INDEX_DIR ID... | --path PATH...

`query` embeds with the model that built the index (remembered in the index) unless --model or
--triton-url says otherwise. An index belongs to one model (its fingerprint, index/identity.py):
another model is refused with a one-line error (exit 2); `build --reembed` re-embeds every item
with the new model and switches the index to it atomically.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from embed.backends import BackendError, open_backend
from embed.backends.base import Backend
from embed.decode import DEFAULT_MAX_PIXELS, DecodeError
from embed.embedder import default_decode_workers, default_max_decode_workers
from embed.preprocess import load_image_array
from embed.spec import ModelDirError
from index import identity
from index.builder import BuildConfig, build_index, decode_threads, resolve_model_source
from index.duplicates import LEVELS, find_duplicates
from index.export import export_index
from index.filters import ItemFilter, matching_ids, parse_where
from index.ray_config import add_ray_arguments, ray_config_from_args
from index.schema import IndexDirError
from index.store import ImageIndex
from index.vector_index import INDEX_MODES
from index.whitening import WHITEN_MODES

logger = logging.getLogger(__name__)


def _add_model_flags(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--model", metavar="MODEL_DIR", help="model directory (ONNX Runtime in-process)")
    g.add_argument("--triton-url", help="Triton server address, e.g. localhost:8001 (gRPC) or localhost:8000 (HTTP)")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc", help="protocol for --triton-url")
    p.add_argument("--model-name", default=None, help="model name on the Triton server; none: the only model it serves")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="simsearch index", description=__doc__.split("\n\n")[0], formatter_class=fmt)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    b = sub.add_parser("build", help="index a folder (incremental, resumable)", formatter_class=fmt)
    b.add_argument("folder", help="folder of images (recursive)")
    b.add_argument("--out", required=True, help="index directory (created if missing)")
    _add_model_flags(b, required=True)
    b.add_argument("--batch-size", type=int, default=64, help="images per inference call")
    b.add_argument("--decode-workers", type=int, default=None, metavar="N",
                   help=f"decoding threads (default: {default_decode_workers()}, one per core but one, and up to "
                   f"{default_max_decode_workers()} while inference waits for decoding)")
    b.add_argument("--commit-every", type=int, default=512, help="commit after this many embedded files")
    b.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    b.add_argument("--index-type", choices=INDEX_MODES, default="auto",
                   help="auto: exact (flat) up to 50,000 vectors, IVF-PQ (fast-scan, re-ranked) above; ivf: "
                   "IVF-Flat; set when the index is created, or again with --retrain (index/README.md)")
    b.add_argument("--memory-budget", default=None, metavar="SIZE",
                   help="RAM the vector index may use once warm, e.g. 4GB, 512MiB (recorded in the index; "
                   "default: the index's own, for a new one half of this machine's memory)")
    b.add_argument("--recall-target", type=float, default=None,
                   help="recall@10 the search parameters are tuned for (default: the index's own, 0.95)")
    b.add_argument("--whiten", choices=WHITEN_MODES, default=None,
                   help="PCA whitening fitted on the indexed vectors: auto (from 4 x dim items), on, off; "
                   "default: the index's own setting (a new index: auto). Scores are then cosines in the "
                   "whitened space (index/README.md)")
    b.add_argument("--retrain", action="store_true",
                   help="after indexing, train the vector index again on all vectors and re-tune nprobe/k_factor "
                   "(it retrains by itself past 4x growth)")
    b.add_argument("--rehash", action="store_true",
                   help="read and sha256 every file, also those whose size and mtime did not change")
    b.add_argument("--reembed", action="store_true",
                   help="the index belongs to another model (e.g. before retraining): re-embed every item, "
                   "uploads included, with this model, then switch to it atomically; readers keep the old "
                   "vectors until then, and a killed run resumes")
    b.add_argument("--summary", default=None, help="write the JSON summary to this file instead of stdout")
    b.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_ray_arguments(b)

    q = sub.add_parser("query", help="nearest neighbours of an image or an indexed item", formatter_class=fmt)
    q.add_argument("image", nargs="?", help="image file (or --id)")
    q.add_argument("--id", type=int, default=None, help="search with the stored vector of this item instead")
    q.add_argument("--index", required=True, help="index directory")
    q.add_argument("-k", type=int, default=10, help="number of neighbours")
    _add_search_option_flags(q)
    q.add_argument("--nprobe", type=int, default=None, help="IVF lists to scan (default: the index's own)")
    q.add_argument("--k-factor", type=int, default=None,
                   help="IVF-PQ: candidates re-ranked with exact vectors = k x this (default: the index's own)")
    q.add_argument("--no-rerank", action="store_true", help="IVF-PQ: rank by the PQ codes alone")
    q.add_argument("--json", action="store_true", help="JSON instead of a table")
    _add_model_flags(q, required=False)

    d = sub.add_parser("dups", help="groups of exact and near duplicates", formatter_class=fmt)
    d.add_argument("--index", required=True, help="index directory")
    level = d.add_mutually_exclusive_group()
    level.add_argument("--threshold", type=float, default=None,
                       help="cosine similarity that makes two items copies (default: the --level's)")
    level.add_argument("--level", choices=sorted(LEVELS), default=None,
                       help="the index's threshold for this level: measured by `index build` on the index's own "
                       f"model and images, else the default ({', '.join(f'{k} {v}' for k, v in sorted(LEVELS.items()))}); "
                       "none given: duplicate")
    d.add_argument("--json", action="store_true", help="the whole report as JSON instead of a table")
    d.add_argument("--limit", type=int, default=50, help="groups shown in the table (JSON: all)")

    e = sub.add_parser("export", help="ids, paths, metadata and vectors to Parquet or .npy", formatter_class=fmt)
    e.add_argument("--index", required=True, help="index directory")
    e.add_argument("--out", required=True, help="F.parquet (one file), or F.npy (+ F.ids.npy and F.jsonl beside it)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")

    s = sub.add_parser("stats", help="size, type and model of an index", formatter_class=fmt)
    s.add_argument("--index", required=True, help="index directory")

    r = sub.add_parser("remove", help="remove items by id or path", formatter_class=fmt)
    r.add_argument("ids", nargs="*", type=int, help="item ids")
    r.add_argument("--path", action="append", default=[], help="item path (relative to the indexed folder, or absolute)")
    r.add_argument("--index", required=True, help="index directory")
    return parser


def _add_search_option_flags(q: argparse.ArgumentParser) -> None:
    q.add_argument("--offset", type=int, default=0, help="skip the best OFFSET results (the next page: offset + k)")
    q.add_argument("--min-score", type=float, default=None, help="leave out neighbours under this cosine similarity")
    q.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only items whose metadata KEY equals VALUE (JSON scalar, else text); repeat for AND")
    q.add_argument("--path-prefix", default=None, help="only items whose stored path starts with this")
    q.add_argument("--path-glob", default=None, help="only items whose stored path matches this glob (* crosses /)")
    q.add_argument("--exclude", action="store_true", help="with --id: leave the item itself out")


def _open_backend(args: argparse.Namespace, index: ImageIndex | None = None) -> tuple[Backend, dict[str, Any]]:
    if args.model is None and args.triton_url is None:
        source = index.info().get("model_source") if index is not None else None
        if not source:
            raise BackendError("the index does not say which model built it: pass --model or --triton-url")
        args.model, args.triton_url = source.get("model_dir"), source.get("triton_url")
        args.protocol, args.model_name = source.get("protocol", "grpc"), source.get("model_name")
    if args.model is not None:
        return open_backend(model_dir=args.model), resolve_model_source(args.model, None, "grpc", None)
    backend = open_backend(triton_url=args.triton_url, protocol=args.protocol, model_name=args.model_name)
    return backend, resolve_model_source(None, args.triton_url, args.protocol, args.model_name)


def _cmd_build(args: argparse.Namespace) -> int:
    ray_cfg = ray_config_from_args(args)  # a flag error before the model loads
    backend, source = _open_backend(args)
    try:
        cfg = BuildConfig(
            folder=args.folder, out=args.out, batch_size=args.batch_size, **decode_threads(args.decode_workers),
            commit_every=args.commit_every, max_pixels=args.max_pixels, index_mode=args.index_type,
            memory_budget=args.memory_budget, recall_target=args.recall_target, retrain=args.retrain,
            whiten=args.whiten,
            rehash=args.rehash, reembed=args.reembed, progress=not args.no_progress,
        )
        if ray_cfg is None:
            summary = build_index(cfg, backend, source)
        else:  # imported only here: a build without --ray never loads Ray or pyarrow
            from index.ray_build import build_index_on_ray

            summary = build_index_on_ray(cfg, backend, source, ray_cfg)
    finally:
        backend.close()
    text = json.dumps(summary, indent=2)
    if args.summary:
        from embed.atomic import write_json_atomic

        write_json_atomic(args.summary, summary)
    else:
        print(text)
    logger.info("added %d, updated %d, removed %d, failed %d, %.1f images/s", summary["added"], summary["updated"],
                summary["removed"], len(summary["failed"]), summary["images_per_s"])
    return 0


def _cmd_query(args: argparse.Namespace) -> int:
    if (args.image is None) == (args.id is None):
        raise ValueError("give an image file or --id ITEM, not both")
    if args.exclude and args.id is None:
        raise ValueError("--exclude leaves out the item searched by: it needs --id")
    flt = ItemFilter.build(parse_where(args.where), args.path_prefix, args.path_glob)
    with ImageIndex.open(args.index) as index:
        if args.id is not None:
            vector = index.vector(args.id)
            if vector is None:
                raise ValueError(f"no item with id {args.id} in {args.index}")
        else:
            backend, _ = _open_backend(args, index)
            try:
                identity.check(index.meta, backend.spec, directory=args.index)
                array, _ = load_image_array(args.image, backend.spec)
                vector = backend.embed(array[None])
            finally:
                backend.close()
        params = {k: v for k, v in (("nprobe", args.nprobe), ("k_factor", args.k_factor)) if v is not None}
        if args.no_rerank:
            params["rerank"] = False
        allowed = matching_ids(args.index, flt) if flt is not None else None
        hits = index.search(vector, args.k, params=params, allowed_ids=allowed, offset=args.offset,
                            min_score=args.min_score, exclude_ids=[args.id] if args.exclude else None)[0]
        root = index.stats()["root"]
    rows = [{"rank": args.offset + i + 1, "id": h.id, "score": round(h.score, 6), "path": h.record.path,
             "abs_path": str(Path(root) / h.record.path) if root else h.record.path, "metadata": h.record.metadata}
            for i, h in enumerate(hits)]
    if args.json:
        query = args.image if args.id is None else {"id": args.id}
        print(json.dumps({"query": query, "k": args.k, "offset": args.offset, "min_score": args.min_score,
                          "filter": flt.describe() if flt else None, "results": rows}, indent=2))
    else:
        print(f"{'rank':>4}  {'score':>8}  {'id':>8}  path")
        for row in rows:
            print(f"{row['rank']:>4}  {row['score']:>8.4f}  {row['id']:>8}  {row['path']}")
    return 0


def _cmd_dups(args: argparse.Namespace) -> int:
    report = find_duplicates(args.index, args.threshold, args.level)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
        return 0
    levels = report.thresholds
    measured = "" if levels == LEVELS else " measured on this index's model and images"
    print(f"{len(report.groups)} groups, {report.items_in_groups} of {report.count} items, "
          f"cosine >= {report.threshold} (duplicate {levels['duplicate']}, similar {levels['similar']}{measured})")
    if report.caution:
        print(f"note: {report.caution}")
    for n, group in enumerate(report.groups[: args.limit]):
        print(f"\ngroup {n + 1}: {group.kind}, {group.size} items, min score {group.min_score:.4f}")
        for m in group.items:
            role = "keep" if m.id == group.keeper else ("same bytes" if m.exact else f"{m.score:.4f}")
            print(f"  {m.id:>8}  {role:>10}  {m.width}x{m.height}  {m.path}")
    if len(report.groups) > args.limit:
        print(f"\n... {len(report.groups) - args.limit} more groups (--limit, or --json for all)")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    with tqdm(unit="rows", disable=args.no_progress, desc="export") as bar:
        summary = export_index(args.index, args.out, progress=bar.update)
    print(json.dumps(summary, indent=2))
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    with ImageIndex.open(args.index) as index:
        print(json.dumps(index.stats(), indent=2))
    return 0


def _cmd_remove(args: argparse.Namespace) -> int:
    if not args.ids and not args.path:
        raise ValueError("give item ids and/or --path PATH")
    with ImageIndex.open(args.index) as index:
        root = Path(index.stats()["root"] or ".")
        ids, missing = list(args.ids), []
        for p in args.path:
            rel = Path(p).resolve().relative_to(root).as_posix() if Path(p).is_absolute() else p
            rec = index.get_by_path(rel)
            (ids.append(rec.id) if rec is not None else missing.append(p))
        removed = index.remove(ids)
        index.commit()
    print(json.dumps({"removed": removed, "requested": len(ids), "unknown_paths": missing}))
    return 0 if not missing and removed == len(set(ids)) else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # which backend loaded is -v detail; an error then stays the one line on stderr
        logging.getLogger("embed").setLevel(logging.WARNING)
    commands = {"build": _cmd_build, "query": _cmd_query, "stats": _cmd_stats, "remove": _cmd_remove,
                "dups": _cmd_dups, "export": _cmd_export}
    try:
        return commands[args.command](args)
    except (BackendError, ModelDirError, IndexDirError, DecodeError, FileNotFoundError, FileExistsError,
            NotADirectoryError, ValueError) as e:
        print(f"simsearch index {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: one line, not a traceback
        resume = "; what it committed is kept: run it again to continue" if args.command == "build" else ""
        print(f"simsearch index {args.command}: interrupted{resume}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
