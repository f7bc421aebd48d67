"""`simsearch serve --workers N`: N server processes on one port, sharing one index.

Processes: uvicorn's own supervisor (`uvicorn.supervisors.Multiprocess`, what `uvicorn --workers`
runs). The parent binds the listening socket once and spawns N workers that inherit it; the kernel
hands each new connection to a worker waiting in accept, so a busy worker takes fewer. The parent
restarts a worker that dies (kill -9, out of memory) and, on SIGTERM or Ctrl-C, stops every worker
cleanly (each finishes its requests, then commits everything: server/committer.py) before it
exits. Workers are spawned, not forked: the parent has imported FAISS and ONNX Runtime, whose
thread pools do not survive a fork. Each worker gets the settings as the argument of its app
factory (pickled by multiprocessing), not through the environment, so the API key is not copied
into the children's environment.

The index: every worker opens it and may write; there is no designated writer to forward to.
SQLite serialises the workers' write transactions, and a worker that finds another's commit
catches up before it writes (index/store.py), so ids are never given out twice (AUTOINCREMENT) and
no write lands on a stale copy; with the default commit policy each write is committed before it is
acknowledged, so kill -9 of one worker loses nothing acknowledged. Reads follow the other workers'
commits through the live-index watcher (server/live_index.py): searchable within its 2 s. Upload
files, shared by content hash, are created and removed under a lock all workers take
(server/upload_store.py).

Cores: unless `ort_intra_op_threads` is set, each of N workers runs ONNX Runtime with cores / N
intra-op threads, so N workers together use the cores once rather than N times over.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import tempfile
from typing import Any

from fastapi import FastAPI

from embed.embedder import available_cores
from server.metrics import MULTIPROC_ENV
from server.settings import Settings

log = logging.getLogger(__name__)

# a worker that does not answer the supervisor's ping for this long is killed and replaced; generous,
# because a worker's ping thread competes for the GIL with its requests on a loaded machine
HEALTHCHECK_TIMEOUT_S = 30


def worker_settings(settings: Settings) -> Settings:
    """What one of `settings.workers` processes runs with: its share of the cores for ONNX Runtime."""
    if settings.workers > 1 and settings.ort_intra_op_threads == 0:
        threads = max(1, available_cores() // settings.workers)
        return settings.model_copy(update={"ort_intra_op_threads": threads})
    return settings


def worker_app(settings: Settings) -> FastAPI:
    """The app factory every worker process calls (uvicorn `factory=True`)."""
    from server.app import create_app
    from server.cli import configure_logging

    configure_logging(settings)  # a spawned process starts with no logging set up
    mine = worker_settings(settings)
    log.info("worker %d: ONNX Runtime intra-op threads %d", os.getpid(), mine.ort_intra_op_threads)
    return create_app(mine)


def run_workers(settings: Settings, **uvicorn_options: Any) -> int:
    """Serve with `settings.workers` processes until SIGTERM/SIGINT; 1 when a worker failed to start."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    from server.state import prepare_index

    prepare_index(settings)  # created (or bound to the model) once, not by N processes at once
    # the workers' metrics add up in one directory (server/metrics.py); set before they are spawned,
    # since prometheus_client reads it when a worker imports it. A directory given by the operator
    # is theirs to empty between runs (as prometheus_client asks); ours is new and removed after.
    own_metrics_dir = None
    if not os.environ.get(MULTIPROC_ENV):
        own_metrics_dir = tempfile.mkdtemp(prefix="simsearch-metrics-")
        os.environ[MULTIPROC_ENV] = own_metrics_dir
    config = uvicorn.Config(
        functools.partial(worker_app, settings),
        factory=True,
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_worker_healthcheck=HEALTHCHECK_TIMEOUT_S,
        **uvicorn_options,
    )
    sock = config.bind_socket()
    supervisor = Multiprocess(config, sockets=[sock])
    try:
        supervisor.run()
    finally:
        sock.close()
        if own_metrics_dir is not None:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
    failed = [p.pid for p in supervisor.processes if p.exitcode == STARTUP_FAILURE]
    if failed:
        log.error("worker(s) %s failed to start; see the log above", failed)
        return 1
    return 0
