"""One optimisation step: this rank's batch -> two augmented views -> forward -> NT-Xent -> backward -> update.

`SIMSEARCH_TEST_SLOW_RANK=RANK:SECONDS` makes that rank sleep SECONDS at the end of every step,
after its collectives: fault injection for the multi-process tests (a rank that is slower than
the others must still stop at the same step as they do). Unset, it costs nothing.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from pretrain.batches import RankBatches
from pretrain.build import Run

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SLOW_RANK_ENV = "SIMSEARCH_TEST_SLOW_RANK"


@dataclass(frozen=True)
class StepResult:
    loss: float  # the global batch's NT-Xent loss (the same on every rank)
    data_aug_s: float  # taking this rank's batch and augmenting it
    total_s: float  # the whole step, device work included


def injected_delay(rank: int) -> float:
    """Seconds this rank sleeps per step, from SIMSEARCH_TEST_SLOW_RANK ("RANK:SECONDS"); 0 when unset."""
    value = os.environ.get(SLOW_RANK_ENV, "")
    if not value:
        return 0.0
    try:
        slow_rank, seconds = value.split(":")
        return float(seconds) if int(slow_rank) == rank else 0.0
    except ValueError:
        raise ValueError(f"{SLOW_RANK_ENV}={value!r}; expected RANK:SECONDS, e.g. 1:0.2") from None


def train_step(run: Run, batches: RankBatches, delay_s: float = 0.0) -> StepResult:
    """Run step `run.step` and advance `run.step`; raise FloatingPointError on a non-finite loss."""
    t, device = run.cfg.train, run.dist.device
    t0 = time.perf_counter()
    x = batches.batch(run.step).to(device, non_blocking=True)
    # every step, rank and view its own draws, reproducible from (seed, step, rank) after a resume
    run.generator.manual_seed((t.seed * 1_000_003 + run.step) * 1009 + run.dist.rank)
    views = run.augment(torch.cat([x, x]), run.generator)
    if t.channels_last:
        views = views.contiguous(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # so the augmentation's share of the step time is honest
    t1 = time.perf_counter()
    with torch.autocast(device.type, dtype=DTYPES[t.precision], enabled=t.precision != "fp32"):
        z1, z2 = run.model(views).float().chunk(2)
    loss = run.criterion(z1, z2)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    loss_value = loss.item()  # also synchronises the device, so the timing below is honest
    if delay_s:
        time.sleep(delay_s)
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"loss is {loss_value} at step {run.step}; lower the learning rate or use fp32")
    return StepResult(loss_value, t1 - t0, time.perf_counter() - t0)
