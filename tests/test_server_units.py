"""The server's small parts on their own: micro-batcher, committer, settings, CLI flags."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from server.batcher import MicroBatcher, QueueFull
from server.cli import build_parser, settings_from_args
from server.committer import Committer
from server.settings import Settings


class Model:
    """Vector = the mean pixel value (so results can be checked); records every batch size."""

    def __init__(self, delay_s: float = 0.0, fail: bool = False) -> None:
        self.batches: list[int] = []
        self.threads: set[int] = set()
        self.delay_s, self.fail = delay_s, fail

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.batches.append(len(batch))
        self.threads.add(threading.get_ident())
        time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("model exploded")
        return batch.reshape(len(batch), -1).mean(axis=1, keepdims=True).astype(np.float32)


def _img(v: int) -> np.ndarray:
    return np.full((2, 2, 3), v, np.uint8)


def _run(coro):  # noqa: ANN001, ANN202
    return asyncio.run(coro)


def test_batcher_groups_concurrent_requests_and_keeps_order() -> None:
    model = Model(delay_s=0.02)

    async def main() -> list[np.ndarray]:
        b = MicroBatcher(model, max_batch_size=4, max_wait_s=0.05, queue_max=100)
        b.start()
        try:
            return await asyncio.gather(*(b.submit(_img(i)) for i in range(10)))
        finally:
            await b.stop()

    out = _run(main())
    assert [float(v[0]) for v in out] == [float(i) for i in range(10)]
    assert sum(model.batches) == 10 and max(model.batches) == 4 and len(model.batches) < 10
    assert threading.get_ident() not in model.threads  # inference ran off the event loop's thread


def test_batcher_does_not_block_the_event_loop() -> None:
    model = Model(delay_s=0.2)

    async def main() -> int:
        b = MicroBatcher(model, max_batch_size=2, max_wait_s=0.0, queue_max=10)
        b.start()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await b.submit(_img(1))
        t.cancel()
        await b.stop()
        return ticks

    assert _run(main()) >= 5  # the loop kept running while the model slept 0.2 s


def test_batcher_queue_full_and_errors() -> None:
    async def main() -> None:
        b = MicroBatcher(Model(delay_s=0.2), max_batch_size=1, max_wait_s=0.0, queue_max=2)
        b.start()
        first = asyncio.create_task(b.submit(_img(0)))
        await asyncio.sleep(0.05)  # the first is in the model now; the queue is empty
        queued = [asyncio.create_task(b.submit(_img(i))) for i in (1, 2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as e:
            await b.submit(_img(3))
        assert e.value.retry_after_s >= 1
        with pytest.raises(QueueFull):  # all-or-nothing for a multi-image request
            await b.submit_many([_img(4), _img(5)])
        await asyncio.gather(first, *queued)
        await b.stop()

        broken = MicroBatcher(Model(fail=True), max_batch_size=4, max_wait_s=0.0, queue_max=4)
        broken.start()
        with pytest.raises(RuntimeError, match="exploded"):
            await broken.submit(_img(1))
        await broken.stop()

    _run(main())


def test_committer_sync_mode_groups_writes_and_waits_for_the_commit() -> None:
    commits: list[float] = []

    def commit() -> None:
        time.sleep(0.05)
        commits.append(time.monotonic())

    async def main() -> list[float]:
        c = Committer(commit, interval_s=0.0)
        c.start()
        done = []

        async def write() -> None:
            await c.wrote()
            done.append(time.monotonic())

        await asyncio.gather(*(write() for _ in range(10)))
        await c.stop()
        return done

    done = _run(main())
    assert 1 <= len(commits) <= 3  # ten writes, a few shared commits
    assert all(any(t_commit <= t_done for t_commit in commits) for t_done in done)


def test_committer_interval_mode_acknowledges_at_once_and_commits_on_stop() -> None:
    commits: list[int] = []

    async def main() -> int:
        c = Committer(lambda: commits.append(1), interval_s=60.0)
        c.start()
        for _ in range(5):
            await c.wrote()  # returns without waiting a minute
        pending = c.pending
        await c.stop()
        return pending

    t0 = time.monotonic()
    assert _run(main()) == 5
    assert time.monotonic() - t0 < 30 and commits == [1]


def test_settings_reject_unknown_keys_and_need_one_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in __import__("os").environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValidationError, match="bach_size"):
        Settings(model_dir="m", index_dir="i", bach_size=3)
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(index_dir="i")
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(model_dir="m", triton_url="localhost:8001", index_dir="i")
    monkeypatch.setenv("SIMSEARCH_BATCH_SIZE", "7")
    assert Settings(model_dir="m", index_dir="i").batch_size == 7
    monkeypatch.setenv("SIMSEARCH_BATCHSIZE", "7")
    with pytest.raises(ValueError, match="SIMSEARCH_BATCHSIZE"):
        Settings(model_dir="m", index_dir="i")
    monkeypatch.delenv("SIMSEARCH_BATCHSIZE")
    (tmp_path / ".env").write_text("SIMSEARCH_INDEX_DIR=from-dotenv\nSIMSEARCH_PORT=9001\n")
    s = Settings(model_dir="m")
    assert s.index_dir == Path("from-dotenv") and s.port == 9001 and s.batch_size == 7


def test_cli_flags_override_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for k in [k for k in __import__("os").environ if k.startswith("SIMSEARCH_")]:
        monkeypatch.delenv(k)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SIMSEARCH_PORT", "9000")
    monkeypatch.setenv("SIMSEARCH_TRITON_URL", "localhost:8001")
    args = build_parser().parse_args(["--model", "m", "--index", "i", "--port", "8123", "--backend", "onnxruntime"])
    s = settings_from_args(args)
    assert (s.port, s.backend_name, s.model_dir, s.triton_url) == (8123, "onnxruntime", Path("m"), None)
    args = build_parser().parse_args(["--index", "i", "--batch-size", "16"])
    s = settings_from_args(args)
    assert (s.backend_name, s.batch_size, s.port) == ("triton", 16, 9000)
