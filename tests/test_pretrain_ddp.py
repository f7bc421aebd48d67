"""Two CPU processes (gloo) give the loss and gradients of one process on the whole global batch."""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pretrain import distributed
from pretrain.loss import NTXentLoss

N, D, TAU, WORLD = 8, 12, 0.3, 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(D, 16), nn.ReLU(), nn.Linear(16, 6))


def make_views() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)


def worker(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    info = distributed.setup("cpu")
    try:
        model = DistributedDataParallel(make_model())
        v1, v2 = make_views()
        n = N // WORLD
        mine = slice(rank * n, (rank + 1) * n)
        loss = NTXentLoss(TAU)(model(v1[mine]), model(v2[mine]))
        loss.backward()
        mean_loss = distributed.all_reduce_mean(loss)
        if info.is_main:
            torch.save({"loss": mean_loss, "grads": [p.grad for p in model.module.parameters()]}, out)
    finally:
        distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(180)
def test_two_process_gloo_equals_single_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(worker, args=(free_port(), out), nprocs=WORLD, join=True)
    got = torch.load(out, weights_only=True)

    model = make_model()
    v1, v2 = make_views()
    loss = NTXentLoss(TAU)(model(v1), model(v2))
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    for g_ddp, p in zip(got["grads"], model.parameters(), strict=True):
        assert torch.allclose(g_ddp, p.grad, rtol=1e-4, atol=1e-6)
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())
