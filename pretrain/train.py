"""SimCLR pretraining: `simsearch pretrain FOLDER --out RUN_DIR [flags]`.

One code path for one process and many: under `torchrun` the environment switches DDP on
(see pretrain/distributed.py); only rank 0 logs and saves. The run directory holds:

    config.json      the full config
    last.pt          the latest checkpoint (atomic; everything needed to resume exactly)
    metrics.jsonl    one JSON object per log step / kNN evaluation
    tb/              TensorBoard event files
    summary.json     the final figures (also printed as one JSON line)

`--resume` continues the run in RUN_DIR from last.pt: same step counter, LR schedule and data
order (only when to stop and how often to log may change; everything else comes from the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from pretrain import distributed
from pretrain.augment import SimCLRAugment
from pretrain.checkpoint import load_checkpoint, save_checkpoint
from pretrain.config import PretrainConfig, add_config_flags, overrides_from_args
from pretrain.data import EpochSampler, ImageFolderData, StreamingImageFolder, load_folder
from pretrain.features import extract_features
from pretrain.knn import knn_accuracy
from pretrain.lars import LARS, param_groups
from pretrain.loss import NTXentLoss
from pretrain.models import build_model
from pretrain.rng import capture_rng, restore_rng
from pretrain.schedule import build_scheduler

logger = logging.getLogger(__name__)
RESUME_OVERRIDABLE = ("time_budget_min", "stop_after_steps", "log_every", "ckpt_every_min")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simsearch pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", help="image folder (recursive); class sub-folders are ignored for training")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs)")
    p.add_argument("--config", help="JSON config file (flags given on the command line override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p)
    return p


def build_optimizer(cfg: PretrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = o.peak_lr(cfg.train.batch_size)
    groups = param_groups(model, o.weight_decay)
    if o.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=o.momentum)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def knn_monitor(model: Any, cfg: PretrainConfig, val: tuple[ImageFolderData, ImageFolderData], device: torch.device) -> float:
    bank, queries = val
    kw = dict(device=device, precision=cfg.train.precision, channels_last=cfg.train.channels_last)
    ftr = extract_features(model.encoder, bank.images, cfg.data.mean, cfg.data.std, **kw)
    fte = extract_features(model.encoder, queries.images, cfg.data.mean, cfg.data.std, **kw)
    return knn_accuracy(ftr, bank.labels, fte, queries.labels, k=cfg.train.knn_k, temperature=cfg.train.knn_temperature)


def train(
    cfg: PretrainConfig,
    data: ImageFolderData | StreamingImageFolder,
    out_dir: str | Path,
    *,
    resume: dict[str, Any] | None = None,
    val: tuple[ImageFolderData, ImageFolderData] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on `data` (in memory or streamed), writing checkpoints and logs to `out_dir`; return the summary."""
    from torch.utils.tensorboard import SummaryWriter
    from tqdm import tqdm

    t = cfg.train
    dist = distributed.setup(t.device)
    device, out_dir = dist.device, Path(out_dir)
    if t.batch_size % dist.world_size:
        raise ValueError(f"batch size {t.batch_size} is not divisible by the {dist.world_size} processes")
    local_batch = t.batch_size // dist.world_size
    steps_per_epoch = len(data) // t.batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"{len(data)} images are fewer than one batch of {t.batch_size}")
    total_steps = max(1, round(t.epochs * steps_per_epoch))
    adaptive = t.time_budget_min > 0 and t.epochs <= 0  # the schedule is laid out over the time budget
    if adaptive:
        total_steps = 10**9
    warmup_steps = round(cfg.optim.warmup_epochs * steps_per_epoch)

    # model, optimizer, schedule
    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    raw = model  # the unwrapped model is what gets saved
    optimizer = build_optimizer(cfg, raw)
    scheduler = build_scheduler(optimizer, warmup_steps, total_steps, cfg.optim.final_lr_fraction)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    criterion = NTXentLoss(t.temperature)
    augment = SimCLRAugment(
        cfg.augment.view_size or cfg.data.image_size, cfg.data.mean, cfg.data.std, strength=cfg.augment.strength,
        crop_scale=cfg.augment.resolved_crop_scale(cfg.data.image_size), jitter_p=cfg.augment.jitter_p,
        grayscale_p=cfg.augment.grayscale_p, blur=cfg.augment.resolved_blur(cfg.data.image_size),
        blur_p=cfg.augment.blur_p, flip_p=cfg.augment.flip_p,
    )
    generator = torch.Generator(device)
    step, elapsed_before = 0, 0.0
    if resume is not None:
        raw.encoder.load_state_dict(resume["encoder"])
        raw.head.load_state_dict(resume["head"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        scaler.load_state_dict(resume["scaler"])
        restore_rng(resume["rng"], generator)
        step, elapsed_before = int(resume["step"]), float(resume.get("elapsed_s", 0.0))
        warmup_steps, total_steps = scheduler.lr_lambdas[0].warmup_steps, scheduler.lr_lambdas[0].total_steps
    if dist.enabled:
        model = distributed.convert_sync_batchnorm(model, device)
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if t.compile:
        model = torch.compile(model)

    # data: in memory, the whole uint8 set goes on the device when it is a GPU (CIFAR-10 is 150 MB)
    sampler = EpochSampler(len(data), dist.rank, dist.world_size, t.seed)
    streaming = isinstance(data, StreamingImageFolder)
    images = None if streaming else data.images.to(device) if device.type == "cuda" else data.images

    def epoch_batches(epoch: int, start: int) -> Iterator[torch.Tensor]:
        """This rank's uint8 batches of `epoch` from batch `start` on (same order whatever the start)."""
        sampler.set_epoch(epoch, start * local_batch)
        if streaming:
            loader = DataLoader(data, batch_size=local_batch, sampler=sampler, num_workers=cfg.data.workers,
                                drop_last=True, pin_memory=device.type == "cuda")
            yield from (x for x, _ in loader)
            return
        idx = sampler.indices().to(images.device)
        for k in range(steps_per_epoch - start):
            yield images[idx[k * local_batch : (k + 1) * local_batch]]

    batches, batch_epoch = iter(()), -1

    # logging (rank 0 only)
    writer, metrics_file = None, None
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
        writer = SummaryWriter(str(out_dir / "tb"), purge_step=step or None)
        metrics_file = (out_dir / "metrics.jsonl").open("a")

    def log(record: dict[str, Any]) -> None:
        if metrics_file is not None:
            metrics_file.write(json.dumps(record) + "\n")
            metrics_file.flush()
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    writer.add_scalar(key, value, record["step"])

    last_metrics: dict[str, Any] = {}

    def save() -> None:
        if not dist.is_main:
            return
        state = {
            "config": cfg.to_dict(), "encoder": raw.encoder.state_dict(), "head": raw.head.state_dict(),
            "step": step, "epoch": step / steps_per_epoch, "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": capture_rng(generator),
            "metrics": last_metrics, "elapsed_s": elapsed_before + (time.time() - start),
        }
        save_checkpoint(state, out_dir / "last.pt")

    # the loop
    model.train()
    start = time.time()
    last_save = start
    deadline = start + t.time_budget_min * 60 if t.time_budget_min > 0 else math.inf
    aug_time = step_time = 0.0
    window_loss, window_n, window_t = 0.0, 0, time.time()
    first_step, loss_first = step, None
    bar = tqdm(total=total_steps if not adaptive else None, initial=step, disable=not (progress and dist.is_main),
               unit="step", dynamic_ncols=True)
    stop_reason = "epochs"
    while step < total_steps:
        epoch, i = divmod(step, steps_per_epoch)
        if i == 0 and step > first_step and t.knn_every and val is not None and epoch % t.knn_every == 0 and dist.is_main:
            last_metrics["knn_top1"] = knn_monitor(raw, cfg, val, device)
            log({"step": step, "epoch": epoch, "knn_top1": last_metrics["knn_top1"]})
        if time.time() >= deadline:
            stop_reason = "time_budget"
            break
        if t.stop_after_steps and step >= t.stop_after_steps:
            stop_reason = "stop_after_steps"
            break
        t0 = time.perf_counter()
        if batch_epoch != epoch:
            batches, batch_epoch = epoch_batches(epoch, i), epoch
        x = next(batches).to(device, non_blocking=True)
        generator.manual_seed((t.seed * 1_000_003 + step) * 1009 + dist.rank)
        views = augment(torch.cat([x, x]), generator)  # two views per image, every row its own draws
        if t.channels_last:
            views = views.contiguous(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t1 = time.perf_counter()
        with torch.autocast(device.type, dtype=DTYPES[t.precision], enabled=t.precision != "fp32"):
            z1, z2 = model(views).float().chunk(2)
        loss = criterion(z1, z2)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        step += 1
        loss_value = loss.item()  # also synchronises the device, so the timing below is honest
        t2 = time.perf_counter()
        aug_time += t1 - t0
        step_time += t2 - t0
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at step {step}; lower the learning rate or use fp32")
        loss_first = loss_value if loss_first is None else loss_first
        window_loss, window_n = window_loss + loss_value, window_n + 1
        bar.update(1)
        if step % t.log_every == 0 or step == total_steps:
            now = time.time()
            ips = window_n * t.batch_size / max(now - window_t, 1e-9)
            if adaptive:  # lay the rest of the cosine out over the remaining budget
                total_steps = step + max(1, int((deadline - now) / max((now - window_t) / window_n, 1e-9)))
                scheduler.lr_lambdas[0].total_steps = total_steps
            last_metrics.update(loss=window_loss / window_n, lr=optimizer.param_groups[0]["lr"], images_per_s=ips,
                                epoch=step / steps_per_epoch, aug_share=aug_time / max(step_time, 1e-9))
            log({"step": step, **last_metrics})
            bar.set_postfix(loss=f"{last_metrics['loss']:.3f}", ep=f"{step / steps_per_epoch:.2f}", img_s=f"{ips:.0f}")
            window_loss, window_n, window_t = 0.0, 0, now
        if step % steps_per_epoch == 0 or time.time() - last_save > t.ckpt_every_min * 60:
            save()
            last_save = time.time()
    bar.close()
    if val is not None and dist.is_main:
        last_metrics["knn_top1"] = knn_monitor(raw, cfg, val, device)
        log({"step": step, "knn_top1": last_metrics["knn_top1"]})
    save()
    summary = {
        "step": step, "epochs": step / steps_per_epoch, "stop_reason": stop_reason,
        "train_seconds": time.time() - start, "total_train_seconds": elapsed_before + time.time() - start,
        "images_per_s": (step - first_step) * t.batch_size / max(step_time, 1e-9),
        "aug_share": aug_time / max(step_time, 1e-9), "first_loss": loss_first,
        "final_loss": last_metrics.get("loss"), "knn_top1": last_metrics.get("knn_top1"),
        "world_size": dist.world_size, "device": str(device), "checkpoint": str(out_dir / "last.pt"),
        "skipped_files": len(data.failures),  # streaming: those met by this process
    }
    if dist.is_main:
        from embed.spec import write_json_atomic

        write_json_atomic(out_dir / "summary.json", summary)
        writer.close()
        metrics_file.close()
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    out_dir = Path(args.out)
    overrides = overrides_from_args(args)
    resume = None
    if args.resume:
        resume = load_checkpoint(out_dir / "last.pt")
        cfg = PretrainConfig.from_dict(resume["config"])
        cfg.train.stop_after_steps = 0  # that limit was for the earlier invocation
        for key in RESUME_OVERRIDABLE:  # when to stop this invocation; the run itself stays the same
            if key in overrides.get("train", {}):
                setattr(cfg.train, key, overrides["train"][key])
        logger.info("resuming %s at step %d", out_dir / "last.pt", resume["step"])
    else:
        cfg = PretrainConfig.load(args.config) if args.config else PretrainConfig()
        cfg = cfg.updated(overrides)
    if cfg.data.in_memory:
        data = load_folder(args.folder, cfg.data.image_size, workers=cfg.data.workers, max_images=cfg.data.max_images,
                           progress=not args.no_progress)
    else:
        data = StreamingImageFolder(args.folder, cfg.data.image_size, cfg.data.max_images)
    val = None
    if cfg.train.val_train and cfg.train.val_test and int(os.environ.get("RANK", 0)) == 0:
        val = tuple(load_folder(f, cfg.data.image_size, workers=cfg.data.workers, progress=False)
                    for f in (cfg.train.val_train, cfg.train.val_test))
    try:
        summary = train(cfg, data, out_dir, resume=resume, val=val, progress=not args.no_progress)
    finally:
        distributed.cleanup()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
