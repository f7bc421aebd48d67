"""Learning-rate schedule: linear warmup, then cosine decay, as a function of the optimizer step."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, final_fraction: float = 0.0) -> float:
    """Multiplier of the peak LR at `step`: (step+1)/warmup during warmup, then cosine to `final_fraction`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine:
    """The callable inside LambdaLR; LambdaLR saves and restores its attributes with the scheduler state."""

    def __init__(self, warmup_steps: int, total_steps: int, final_fraction: float = 0.0) -> None:
        self.warmup_steps, self.total_steps, self.final_fraction = warmup_steps, total_steps, final_fraction

    def __call__(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.total_steps, self.final_fraction)


def build_scheduler(optimizer: Optimizer, warmup_steps: int, total_steps: int, final_fraction: float = 0.0) -> LambdaLR:
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, final_fraction))


def schedule_of(scheduler: LambdaLR) -> WarmupCosine:
    """The WarmupCosine inside a scheduler from `build_scheduler` (its lengths are restored with its state)."""
    schedule = scheduler.lr_lambdas[0]
    if not isinstance(schedule, WarmupCosine):
        raise TypeError(f"expected a scheduler from build_scheduler, got one with {type(schedule).__name__}")
    return schedule
