"""When index writes reach the disk (`ImageIndex.commit`), per the `commit_interval_ms` setting.

- interval 0 (default): `await wrote()` returns only after a commit that includes the write, so an
  acknowledged write survives a crash. Writes that arrive while a commit runs share the next one
  (group commit), so concurrent writers do not pay one full commit each.
- interval N ms: `wrote()` returns at once; a commit runs at most every N ms while there are
  uncommitted writes. A crash (kill -9, power loss) can lose the writes of the last N ms or so;
  a clean shutdown (`stop()`) commits everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)


class Committer:
    def __init__(self, commit: Callable[[], None], *, interval_s: float = 0.0) -> None:
        self._commit = commit
        self.interval_s = interval_s
        self._written = 0  # writes made so far (a generation counter)
        self._committed = 0  # writes covered by the last successful commit
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        return self._written - self._committed

    def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="simsearch-committer")

    async def stop(self) -> None:
        """Stop the loop, then commit whatever is left (clean shutdown loses nothing)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.pending or self._waiters:
            await self._commit_now()

    async def wrote(self) -> None:
        """Record one write that has been applied to the index; see the module doc for when it returns."""
        self._written += 1
        assert self._wake is not None, "Committer.start() was not called"
        self._wake.set()
        if self.interval_s > 0:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((self._written, fut))
        await fut

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self.interval_s > 0:
                await asyncio.sleep(self.interval_s)
            if self.pending:
                await self._commit_now()

    async def _commit_now(self) -> None:
        target = self._written
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._commit)
        except Exception as e:
            log.error("index commit failed: %s", e)
            self._settle(target, e)
            return
        self._committed = max(self._committed, target)
        self._settle(target, None)

    def _settle(self, target: int, error: Exception | None) -> None:
        keep = []
        for gen, fut in self._waiters:
            if gen > target:
                keep.append((gen, fut))
            elif not fut.done():
                if error is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(error)
        self._waiters = keep
