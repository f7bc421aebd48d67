"""When a run stops and how long its cosine schedule is: rank 0 decides, every rank obeys at the same step.

Epochs and `--stop-after-steps` name a step, so every rank reaches it by itself. A time budget
and the schedule laid out over it (`--time-budget-min` with `--epochs 0`) depend on a clock, and
each rank's clock and pace differ: left to themselves, ranks stop at different steps and the rank
that goes on waits forever in its next all-gather. So only rank 0 reads the clock. After every
step it proposes (the step to stop at, the schedule's total steps); a `RankZeroBroadcast` carries
the proposal, and every rank, rank 0 included, applies what it receives at the same step.

Ctrl-C (`interrupt()`, from `train`'s SIGINT handler) is decided the same way: rank 0 proposes to
stop after the step in progress, and every rank stops there, so the checkpoint is of a whole step.
"""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import threading
import time
from collections.abc import Iterator

import torch

from pretrain.config import TrainConfig
from pretrain.distributed import RankZeroBroadcast
from pretrain.schedule import WarmupCosine

NEVER = 2**62  # "no stop step yet" (an int64, since it travels in a tensor)

logger = logging.getLogger(__name__)


class StopPlan:
    """The steps at which this invocation stops; the length of the LR schedule (`schedule.total_steps`).

    Call `stop_reason(step)` before each step and `after_step(step)` after it, on every rank, then
    `close()` once the loop is left.
    """

    def __init__(self, t: TrainConfig, schedule: WarmupCosine, *, adaptive: bool, first_step: int,
                 device: torch.device) -> None:
        self.schedule = schedule
        self.adaptive = adaptive  # the cosine is laid out over the time budget (epochs <= 0)
        self.stop_after_steps = t.stop_after_steps
        self.log_every = t.log_every
        self.channel = RankZeroBroadcast(device)
        self.start = time.monotonic()
        self.deadline = self.start + t.time_budget_min * 60 if t.time_budget_min > 0 else math.inf
        self.stop_at = NEVER  # the agreed step at which the time budget ends (or Ctrl-C stops the run)
        self.interrupted = False  # rank 0's Ctrl-C, proposed with the stop step
        self._stop_interrupted = 0  # the agreed stop is Ctrl-C's (1), not the budget's (0)
        # rank 0's proposal, and the pace it is measured from (steps since the last log point)
        self._propose_stop, self._propose_total = NEVER, schedule.total_steps
        self._pace_t, self._pace_step = self.start, first_step

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def stop_reason(self, step: int) -> str | None:
        """Why the loop stops before `step`, or None to run it: the same answer on every rank."""
        if step >= self.schedule.total_steps:
            return "time_budget" if self.adaptive else "epochs"
        if step >= self.stop_at:
            return "interrupted" if self._stop_interrupted else "time_budget"
        if self.stop_after_steps and step >= self.stop_after_steps:
            return "stop_after_steps"
        return None

    def after_step(self, step: int) -> None:
        """`step` steps are done: rank 0 proposes from its clock; every rank applies the agreed plan."""
        now = time.monotonic()
        if self.adaptive and step % self.log_every == 0 and step > self._pace_step:
            # lay the rest of the cosine out over the remaining budget at the pace since the last log point
            pace = (now - self._pace_t) / (step - self._pace_step)
            self._propose_total = step + max(1, int((self.deadline - now) / max(pace, 1e-9)))
            self._pace_t, self._pace_step = now, step
        if (now >= self.deadline or self.interrupted) and self._propose_stop == NEVER:
            self._propose_stop = step + self.channel.lag  # the first step every rank can still stop at
        agreed = self.channel.exchange([self._propose_stop, self._propose_total, int(self.interrupted)])
        if agreed is not None:
            self.stop_at, self.schedule.total_steps, self._stop_interrupted = agreed

    def interrupt(self) -> None:
        """Stop after the step in progress (rank 0's call decides for every rank)."""
        self.interrupted = True

    def close(self) -> None:
        """Collect the last broadcast: every rank has sent and received the same number."""
        self.channel.close()


@contextlib.contextmanager
def ctrl_c_stops(plan: StopPlan, *, is_main: bool) -> Iterator[None]:
    """Inside, the first Ctrl-C (SIGINT) asks `plan` to stop after the step in progress, so the run
    ends with a checkpoint of a whole step; a second one raises KeyboardInterrupt at once."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def on_sigint(signum: int, frame: object) -> None:
        if plan.interrupted:
            raise KeyboardInterrupt
        plan.interrupt()
        if is_main:
            logger.warning("Ctrl-C: stopping after this step and saving the checkpoint (Ctrl-C again: stop at once)")

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
