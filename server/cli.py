"""`simsearch serve`: run the HTTP API and search page with uvicorn: one process and one event loop,
or `--workers N` processes sharing the port and the index (server/workers.py).

Flags override SIMSEARCH_* environment variables and `.env`; anything not given as a flag comes
from there (see server/settings.py for every setting).
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pydantic import ValidationError

from server.auth import is_loopback, open_writes_refusal
from server.settings import Settings

log = logging.getLogger(__name__)

# flag dest -> Settings field (flags left at None are not passed, so the environment decides)
FLAG_FIELDS = {
    "model": "model_dir",
    "index": "index_dir",
    "images_dir": "images_dir",
    "triton_url": "triton_url",
    "triton_protocol": "triton_protocol",
    "triton_model": "triton_model_name",
    "host": "host",
    "port": "port",
    "batch_size": "batch_size",
    "batch_wait_ms": "batch_wait_ms",
    "queue_max": "queue_max",
    "ort_threads": "ort_intra_op_threads",
    "inference_nice": "inference_nice",
    "commit_interval_ms": "commit_interval_ms",
    "log_level": "log_level",
    "workers": "workers",
    "allow_open_writes": "allow_open_writes",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simsearch serve",
        description="Serve the embedding and search API. Unset flags fall back to SIMSEARCH_* "
        "environment variables, then .env, then the defaults of server/settings.py.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", help="model directory (ONNX Runtime in-process, the default backend)")
    p.add_argument("--index", help="index directory (created when missing)")
    p.add_argument("--images-dir", help="the indexed folder on this machine, when not where `index build` "
                   "read it (relative paths of folder-indexed items resolve here)")
    p.add_argument("--backend", choices=("onnxruntime", "triton"), help="default: from --model / --triton-url")
    p.add_argument("--triton-url", help="Triton address, e.g. localhost:8001 (gRPC) or localhost:8000 (HTTP)")
    p.add_argument("--triton-protocol", choices=("grpc", "http"))
    p.add_argument("--triton-model", help="served model name (default: the model's own)")
    p.add_argument("--host", help="address to listen on; other than loopback it needs SIMSEARCH_API_KEY")
    p.add_argument("--allow-open-writes", action="store_true", default=None,
                   help="start on a non-loopback address without an API key (writes open to anyone)")
    p.add_argument("--port", type=int)
    p.add_argument("--workers", type=int, help="server processes sharing the port and the index (default 1); "
                   "each gets cores/N ONNX Runtime threads unless --ort-threads is given")
    p.add_argument("--batch-size", type=int, help="largest batch sent to the model")
    p.add_argument("--batch-wait-ms", type=float, help="longest wait for a batch to fill")
    p.add_argument("--queue-max", type=int, help="queued images before 503")
    p.add_argument("--ort-threads", type=int, help="ONNX Runtime intra-op threads (0: ORT decides)")
    p.add_argument("--inference-nice", type=int, help="nice value added to the inference threads (Linux)")
    p.add_argument("--commit-interval-ms", type=int, help="0: commit every write before answering")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"))
    return p


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {
        field: getattr(args, dest) for dest, field in FLAG_FIELDS.items() if getattr(args, dest) is not None
    }
    if args.backend == "onnxruntime" and args.triton_url is None:
        overrides["triton_url"] = None
    if args.backend == "triton" and args.model is None:
        overrides["model_dir"] = None
    return Settings(**overrides)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except (ValidationError, ValueError) as e:
        print(f"simsearch serve: invalid settings:\n{e}", file=sys.stderr)
        return 2
    refusal = open_writes_refusal(settings)
    if refusal is not None:
        print(f"simsearch serve: {refusal}", file=sys.stderr)
        return 2
    from server.state import preflight

    mismatch = preflight(settings)  # an index of another model: this one line, not a traceback
    if mismatch is not None:
        print(f"simsearch serve: error: {mismatch}", file=sys.stderr)
        return 2
    configure_logging(settings)
    if settings.api_key is None and not is_loopback(settings.host):
        log.warning("listening on %s with writes open to anyone (SIMSEARCH_ALLOW_OPEN_WRITES)", settings.host)
    if settings.images_dir is not None and not settings.images_dir.is_dir():
        log.warning("images_dir %s is not a directory: thumbnails of folder-indexed items will be 404 "
                    "(uploaded items are unaffected)", settings.images_dir)
    options = {"log_level": settings.log_level, "timeout_graceful_shutdown": 10,
               "access_log": settings.log_level == "debug"}
    if settings.workers > 1:
        from server.workers import run_workers

        return run_workers(settings, **options)
    import uvicorn

    from server.app import create_app

    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, **options)
    return 0


def configure_logging(settings: Settings) -> None:
    """The log format of the server and of each worker process (their pid tells them apart)."""
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
    )


if __name__ == "__main__":
    raise SystemExit(main())
