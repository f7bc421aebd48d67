"""Bench: what rank 0's per-step stop/schedule broadcast (pretrain/stopping.py) costs a DDP step.

    .venv/bin/python bench/pretrain_ddp_agreement.py                     # 2 CPU processes, gloo
    python bench/pretrain_ddp_agreement.py --device cuda --world 2       # 2 GPUs, NCCL

Each process runs the collectives of a small SimCLR step (a DDP backward over a model of
--params parameters, the all-gather of the projections and its backward all-reduce) in three
ways, interleaved over --repeats rounds: without the agreement, with `RankZeroBroadcast` (what
training uses: sent asynchronously, collected after the next step) and with a blocking
broadcast read at once (the simple alternative); and a blocking broadcast with no step around
it (its bare round trip). Prints the time per step of each and the added microseconds; one
JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain import distributed  # noqa: E402
from pretrain.loss import NTXentLoss  # noqa: E402

MODES = ("none", "lagged", "blocking")


def one_round(mode: str, model: nn.Module, x: torch.Tensor, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps with the agreement done the `mode` way."""
    criterion, channel = NTXentLoss(0.5), distributed.RankZeroBroadcast(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    t0 = time.perf_counter()
    for step in range(steps):
        z1, z2 = model(x).chunk(2)
        loss = criterion(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the training loop's own host sync
        if mode == "lagged":
            channel.exchange([step, 10**9])
        elif mode == "blocking":
            buf = torch.tensor([step, 10**9], device=device)
            dist.broadcast(buf, src=0)
            buf.tolist()
    channel.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / steps


def broadcast_alone(steps: int, device: torch.device) -> float:
    """Seconds per blocking 2-integer broadcast with nothing else running: the agreement's bare round trip."""
    t0 = time.perf_counter()
    for step in range(steps):
        buf = torch.tensor([step, 10**9], device=device)
        dist.broadcast(buf, src=0)
        buf.tolist()
    return (time.perf_counter() - t0) / steps


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = distributed.setup(args.device)
    try:
        hidden = max(8, args.params // (2 * args.features))
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(args.features, hidden), nn.ReLU(), nn.Linear(hidden, args.features)).to(info.device)
        model = DistributedDataParallel(model, device_ids=[info.device.index] if info.device.type == "cuda" else None)
        x = torch.randn(2 * args.local_batch, args.features, device=info.device)
        one_round("none", model, x, 10, info.device)  # warm-up
        times: dict[str, list[float]] = {m: [] for m in (*MODES, "broadcast_alone")}
        for _ in range(args.repeats):
            for mode in MODES:
                times[mode].append(one_round(mode, model, x, args.steps, info.device))
            times["broadcast_alone"].append(broadcast_alone(args.steps, info.device))
        if info.is_main:
            Path(out).write_text(json.dumps(times))
    finally:
        distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="processes")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cpu: gloo; cuda: NCCL, one GPU per process")
    p.add_argument("--params", type=int, default=300_000, help="parameters of the model whose gradient DDP all-reduces")
    p.add_argument("--features", type=int, default=128, help="projection size (all-gathered every step)")
    p.add_argument("--local-batch", type=int, default=64, help="images per process (x2 views)")
    p.add_argument("--steps", type=int, default=200, help="steps per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds of the three modes, interleaved")
    args = p.parse_args(argv)
    out = Path(f"/tmp/pretrain_ddp_agreement_{os.getpid()}.json")
    mp.spawn(worker, args=(args.world, free_port(), args, str(out)), nprocs=args.world, join=True)
    times = json.loads(out.read_text())
    out.unlink()
    median = {m: statistics.median(v) for m, v in times.items()}
    print(f"{args.world} processes, {args.device}; median of {args.repeats} rounds of {args.steps} steps")
    for mode in MODES:
        added = (median[mode] - median["none"]) * 1e6
        print(f"  {mode:9s} {median[mode] * 1e3:8.3f} ms/step   added {added:+8.1f} us ({added / 1e4 / median['none']:+.2f}%)"
              f"   rounds: {', '.join(f'{t * 1e3:.3f}' for t in times[mode])}")
    print(f"  a blocking broadcast alone: {median['broadcast_alone'] * 1e6:.1f} us")
    print(json.dumps({"world": args.world, "device": args.device, "ms_per_step": {m: v * 1e3 for m, v in median.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
