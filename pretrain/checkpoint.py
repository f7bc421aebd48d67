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

Written atomically: a temporary file in the same directory, fsync, then os.replace.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from embed.atomic import atomic_write

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
