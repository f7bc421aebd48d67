"""The checkpoint file: the contract between `pretrain/` and `export/`.

A checkpoint is a plain dict saved with `torch.save` and read back with `weights_only=True`
(tensors, numbers, strings, lists and dicts only; nothing is unpickled as code):

    format          CHECKPOINT_FORMAT
    format_version  CHECKPOINT_VERSION
    config          the whole training config as a dict; export reads
                    config["model"] (ModelConfig fields) and
                    config["data"]["image_size"], config["data"]["mean"], config["data"]["std"]
    encoder         encoder state_dict (no "module." prefix: the unwrapped model is saved)
    head            projection-head state_dict
    step, epoch     progress, for exact resumption
    optimizer, scheduler, scaler, rng   state for exact resumption (may be absent in an
                    encoder-only checkpoint)
    metrics         the last logged figures (loss, kNN accuracy, ...)
    elapsed_s       training seconds of the run so far (all invocations)

`run_state` writes that dict from a training run's objects and `restore_run` reads it back into them.

Written atomically: a temporary file in the same directory, fsync, then os.replace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from embed.atomic import atomic_write
from pretrain.rng import capture_rng, restore_rng

if TYPE_CHECKING:
    from pretrain.build import Run

CHECKPOINT_FORMAT = "simsearch-simclr-checkpoint"
CHECKPOINT_VERSION = 1
REQUIRED_KEYS = ("config", "encoder", "head", "step")


class CheckpointError(ValueError):
    """A checkpoint file that is missing, unreadable or not one of ours."""


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION, **state}
    missing = [k for k in REQUIRED_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint state lacks {missing}")
    atomic_write(path, lambda f: torch.save(payload, f), mode=0o600)
    return path


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means "not a checkpoint of ours"
        raise CheckpointError(
            f"{path} is not a readable {CHECKPOINT_FORMAT} file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} file (expected a dict with format={CHECKPOINT_FORMAT!r})")
    if ckpt.get("format_version") != CHECKPOINT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format_version {ckpt.get('format_version')!r} is not supported (expected {CHECKPOINT_VERSION})"
        )
    missing = [k for k in REQUIRED_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}")
    return ckpt


def run_state(run: Run, metrics: dict[str, Any], elapsed_s: float) -> dict[str, Any]:
    """The checkpoint dict of `run` at its current step (the unwrapped model; every state for exact resumption)."""
    return {
        "config": run.cfg.to_dict(), "encoder": run.raw.encoder.state_dict(), "head": run.raw.head.state_dict(),
        "step": run.step, "epoch": run.step / run.layout.steps_per_epoch, "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(), "rng": capture_rng(run.generator),
        "metrics": metrics, "elapsed_s": elapsed_s,
    }


def restore_run(run: Run, ckpt: dict[str, Any]) -> None:
    """Put a checkpoint's states back into a freshly built `run` (before it is wrapped for DDP)."""
    run.raw.encoder.load_state_dict(ckpt["encoder"])
    run.raw.head.load_state_dict(ckpt["head"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    run.scheduler.load_state_dict(ckpt["scheduler"])  # with the schedule's warmup and total steps
    run.scaler.load_state_dict(ckpt["scaler"])
    restore_rng(ckpt["rng"], run.generator)
    run.step, run.elapsed_before = int(ckpt["step"]), float(ckpt.get("elapsed_s", 0.0))
