"""Everything a training run holds, built once: model, optimizer, schedule, augmentation, resume state, DDP.

`build_run` is the one place a run's objects come from, in a fixed order (the seed, then the
model, ...) so that a resumed run and a fresh one hold the same things. Initial weights other than
the seeded ones (a file to start from) belong in `build_model_on`, before the optimizer sees the
parameters; a resumed run's checkpoint overrides them.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from pretrain import distributed
from pretrain.augment import SimCLRAugment
from pretrain.checkpoint import restore_run
from pretrain.config import ConfigError, PretrainConfig
from pretrain.data import DataError
from pretrain.distributed import DistInfo
from pretrain.init import load_init
from pretrain.lars import LARS, param_groups
from pretrain.loss import NTXentLoss
from pretrain.models import SimCLRModel, build_model
from pretrain.schedule import build_scheduler

logger = logging.getLogger(__name__)

ADAPTIVE_TOTAL_STEPS = 10**9  # until the first log point lays the cosine out over the time budget


@dataclass(frozen=True)
class StepLayout:
    """How the global batch splits over the ranks and the data over the steps."""

    local_batch: int  # this rank's share of the global batch
    steps_per_epoch: int
    adaptive: bool  # the schedule is laid out over the time budget (--epochs 0 with --time-budget-min)

    @classmethod
    def of(cls, cfg: PretrainConfig, n_images: int, world_size: int) -> StepLayout:
        t = cfg.train
        if t.batch_size % world_size:
            near = sorted({m for m in (t.batch_size // world_size * world_size, -(-t.batch_size // world_size) * world_size) if m})
            raise ConfigError(f"--batch-size {t.batch_size} (the global batch) is not divisible by the {world_size} "
                             f"processes; use a multiple of {world_size}, e.g. {' or '.join(map(str, near))}")
        steps_per_epoch = n_images // t.batch_size
        if steps_per_epoch < 1:
            fits = 2 ** max(1, (n_images // world_size).bit_length() - 1) * world_size
            raise DataError(f"{n_images} images are fewer than one batch of {t.batch_size}: "
                            + (f"pass --batch-size {fits} or fewer" if fits <= n_images
                               else f"SimCLR needs at least {fits} images"))
        return cls(t.batch_size // world_size, steps_per_epoch, t.time_budget_min > 0 and t.epochs <= 0)


@dataclass
class Run:
    """A run's objects and its position; what a step uses and what a checkpoint saves."""

    cfg: PretrainConfig
    dist: DistInfo
    layout: StepLayout
    raw: SimCLRModel  # the unwrapped model: what is saved and evaluated
    model: nn.Module  # what a step calls: `raw`, or `raw` inside DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    scheduler: LambdaLR
    scaler: torch.amp.GradScaler
    criterion: NTXentLoss
    augment: SimCLRAugment
    generator: torch.Generator  # the augmentation's, reseeded from (seed, step, rank) every step
    step: int = 0
    elapsed_before: float = 0.0  # training seconds of earlier invocations of this run


def build_model_on(cfg: PretrainConfig, device: torch.device) -> SimCLRModel:
    """Encoder + projection head with seeded initial weights, on `device` in the run's memory format."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: PretrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    lr = o.peak_lr(cfg.train.batch_size)
    groups = param_groups(model, o.weight_decay)
    if o.optimizer == "lars":
        return LARS(groups, lr=lr, momentum=o.momentum)
    if o.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=lr)


def build_augment(cfg: PretrainConfig) -> SimCLRAugment:
    a, size = cfg.augment, cfg.data.image_size
    return SimCLRAugment(
        a.view_size or size, cfg.data.mean, cfg.data.std, strength=a.strength, crop_scale=a.resolved_crop_scale(size),
        jitter_p=a.jitter_p, grayscale_p=a.grayscale_p, blur=a.resolved_blur(size), blur_p=a.blur_p, flip_p=a.flip_p,
    )


def wrap_model(raw: SimCLRModel, dist: DistInfo, compile: bool) -> nn.Module:
    """The model a step calls: SyncBatchNorm + DDP over several processes, then torch.compile if asked."""
    model: nn.Module = raw
    if dist.enabled:
        model = distributed.convert_sync_batchnorm(model, dist.device)  # in place: `raw` shares the layers
        device = dist.device
        model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    if compile:
        model = torch.compile(model)
    return model


def build_run(cfg: PretrainConfig, dist: DistInfo, n_images: int, *, resume: dict[str, Any] | None = None) -> Run:
    """A run on `n_images` images: a new one, or the one in the checkpoint `resume` continued exactly."""
    t, device = cfg.train, dist.device
    layout = StepLayout.of(cfg, n_images, dist.world_size)
    total_steps = ADAPTIVE_TOTAL_STEPS if layout.adaptive else max(1, round(t.epochs * layout.steps_per_epoch))
    warmup_steps = round(cfg.optim.warmup_epochs * layout.steps_per_epoch)
    raw = build_model_on(cfg, device)
    if t.init and resume is None:  # a head start: the encoder from a file; the head stays new, the step 0
        logger.info("--init %s", load_init(raw.encoder, t.init, cfg.model).summary())
    optimizer = build_optimizer(cfg, raw)
    run = Run(
        cfg, dist, layout, raw, raw, optimizer,
        scheduler=build_scheduler(optimizer, warmup_steps, total_steps, cfg.optim.final_lr_fraction),
        scaler=torch.amp.GradScaler(device.type, enabled=t.precision == "fp16"),
        criterion=NTXentLoss(t.temperature), augment=build_augment(cfg), generator=torch.Generator(device),
    )
    if resume is not None:
        restore_run(run, resume)  # weights, optimizer, schedule (with its lengths), scaler, RNG, step
    run.model = wrap_model(raw, dist, t.compile)
    return run
