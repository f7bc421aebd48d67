"""DDP set-up from torchrun's environment alone; one code path for one process and many.

`torchrun --nproc_per_node=8 -m pretrain.train ...` sets RANK, WORLD_SIZE, LOCAL_RANK (and
MASTER_ADDR/PORT); without them everything runs as rank 0 of 1 with no process group.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: str = "auto") -> DistInfo:
    """Start the process group when torchrun's variables say so; pick the device (cuda:LOCAL_RANK / cpu)."""
    rank = int(os.environ.get("RANK", 0))
    world = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank if dev.index is None else dev.index)
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistInfo(rank, world, local_rank, dev)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(device: torch.device) -> None:
    """Every rank waits here for the others (no-op in one process)."""
    if rank_and_world()[1] > 1:
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def convert_sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorm -> SyncBatchNorm when several GPU processes train (statistics over the global batch).

    PyTorch's SyncBatchNorm runs on accelerators only; CPU processes (gloo) keep per-process
    BatchNorm statistics, so a multi-process CPU run matches the single-process run exactly only
    for models without BatchNorm.
    """
    if rank_and_world()[1] > 1 and device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sends every rank the summed gradient of its own slice.

    Written out (instead of torch.distributed.nn.all_gather) because gloo has no reduce_scatter:
    backward all-reduces the full gradient and keeps this rank's rows, which works on every backend.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = rank_and_world()
        ctx.rank, ctx.n = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [n, ...] from every rank (rank-major) -> [world*n, ...]; gradients flow back."""
    if rank_and_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    if rank_and_world()[1] == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / rank_and_world()[1]


class RankZeroBroadcast:
    """Rank 0's few integers, delivered to every rank one call later without stalling a step.

    Every rank calls `exchange` once per training step, at the same step. The broadcast then runs
    while the next step computes; the next `exchange` collects it after that step's own collectives,
    which queue behind it on the same communicator, so the wait is already over: on NCCL nothing
    waits for the device beyond the step's own `loss.item()`, on gloo the round trip overlaps the
    step. `lag` says when a value takes effect: sent at step s, every rank has it at step s + lag.
    In one process the value is returned at once (lag 0) and nothing is sent.
    """

    def __init__(self, device: torch.device) -> None:
        self.lag = 1 if rank_and_world()[1] > 1 else 0
        # NCCL moves device tensors only; gloo (CPU processes) host tensors
        self.device = device if device.type == "cuda" else torch.device("cpu")
        self._in_flight: tuple[dist.Work, torch.Tensor] | None = None

    def exchange(self, values: Sequence[int]) -> list[int] | None:
        """Send `values` (rank 0's; the others' are ignored); return rank 0's values of the previous call.

        None on the first call of a multi-process run (nothing has been sent yet).
        """
        if self.lag == 0:
            return list(values)
        received = self.close()
        buf = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        self._in_flight = (dist.broadcast(buf, src=0, async_op=True), buf)
        return received

    def close(self) -> list[int] | None:
        """Wait for the broadcast in flight and return its values, so no rank leaves inside a collective."""
        if self._in_flight is None:
            return None
        work, buf = self._in_flight
        self._in_flight = None
        work.wait()
        return buf.tolist()
