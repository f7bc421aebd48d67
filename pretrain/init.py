"""Initial encoder weights for a new run (`simsearch pretrain --init FILE`): a head start from a file.

Two kinds of file, told apart by their content:

- a torchvision-format ResNet state dict (`torch.save(resnet18().state_dict(), f)`, or the same
  inside {"state_dict": ...} / {"model": ...}, or saved from a DDP model with "module." prefixes):
  the keys are the encoder's own (`ResNetEncoder` is a torchvision ResNet), the classifier
  (`fc.*`) is dropped;
- a simsearch checkpoint (`last.pt` of another run): its encoder; its head, optimizer and step
  are not used, so the new run starts at step 0 with a new head.

Every key is checked: a file that does not fit the encoder (other architecture, width, or not a
state dict at all) raises `InitError` with one line naming the missing, unexpected and mismatched
keys. One mismatch is allowed on purpose: the stem. A 7x7 ImageNet stem does not fit the 3x3 CIFAR
stem (`--cifar-stem`, the option is respected), and the reverse; the new run then keeps its freshly
initialised stem convolution and loads everything else, and the report says so. Nothing is
downloaded: the file is the user's. Files are read with `weights_only=True` (no code is unpickled).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pretrain.checkpoint import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint
from pretrain.models import ModelConfig, build_encoder

STEM_KEY = "conv1.weight"
CLASSIFIER_PREFIX = "fc."
WRAPPER_KEYS = ("state_dict", "model")
PREFIXES = ("module.",)  # DDP / DataParallel
SHOWN = 6  # keys named per kind in an error; the rest are counted


class InitError(ValueError):
    """An --init file that cannot be read or does not fit the encoder (one line)."""


@dataclass
class InitReport:
    source: str  # "torchvision state dict" or "simsearch checkpoint"
    loaded: list[str] = field(default_factory=list)  # keys taken from the file
    kept_new: list[str] = field(default_factory=list)  # keys left at their fresh values (the stem)
    dropped: list[str] = field(default_factory=list)  # keys in the file not used (the classifier)

    def summary(self) -> str:
        text = f"{len(self.loaded)} tensors from a {self.source}"
        if self.kept_new:
            text += f"; kept new: {', '.join(self.kept_new)}"
        if self.dropped:
            text += f"; dropped: {_names(self.dropped)}"
        return text


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:SHOWN])
    return shown + (f" (+{len(keys) - SHOWN} more)" if len(keys) > SHOWN else "")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) and torch.is_tensor(v) for k, v in obj.items())


def read_init_state(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str, dict[str, Any] | None]:
    """(encoder state dict with the file's own keys, source kind, the checkpoint's model config or None)."""
    path = Path(path)
    if not path.is_file():
        raise InitError(f"--init {path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - whatever failed, the file is not a weights file we can read
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise InitError(f"--init {path}: not a readable PyTorch weights file ({type(e).__name__}: {first})") from None
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        try:
            ckpt = load_checkpoint(path)
        except CheckpointError as e:
            raise InitError(f"--init {e}") from None
        return dict(ckpt["encoder"]), "simsearch checkpoint", ckpt["config"].get("model")
    for key in WRAPPER_KEYS:
        if isinstance(obj, dict) and _is_state_dict(obj.get(key)):
            obj = obj[key]
            break
    if not _is_state_dict(obj):
        raise InitError(
            f"--init {path}: neither a simsearch checkpoint nor a state dict of tensors "
            f"(a torchvision ResNet's state_dict(), optionally under {' or '.join(map(repr, WRAPPER_KEYS))})"
        )
    return dict(obj), "torchvision state dict", None


def map_torchvision_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the state with "module." prefixes removed and the classifier dropped, the dropped keys)."""
    mapped, dropped = {}, []
    for key, value in state.items():
        for prefix in PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(CLASSIFIER_PREFIX):
            dropped.append(key)
        else:
            mapped[key] = value
    return mapped, dropped


def load_init(encoder: nn.Module, path: str | os.PathLike[str], model_cfg: ModelConfig | None = None) -> InitReport:
    """Load the encoder weights in `path` into `encoder` (in place); raise InitError when they do not fit.

    `model_cfg` (the run's model config) only makes the error clearer for a simsearch checkpoint of
    another architecture.
    """
    state, source, file_model = read_init_state(path)
    report = InitReport(source)
    if source == "torchvision state dict":
        state, report.dropped = map_torchvision_keys(state)
    target = encoder.state_dict()
    if STEM_KEY in state and STEM_KEY in target and state[STEM_KEY].shape != target[STEM_KEY].shape \
            and state[STEM_KEY].shape[:2] == target[STEM_KEY].shape[:2]:
        # the same stem channels with another kernel: ImageNet 7x7 vs CIFAR 3x3; the run's choice wins
        del state[STEM_KEY]
        report.kept_new.append(STEM_KEY)
    missing = [k for k in target if k not in state and k not in report.kept_new]
    unexpected = [k for k in state if k not in target]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(target[k].shape)}"
                  for k in state if k in target and state[k].shape != target[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{len(missing)} missing [{_names(missing)}]" if missing else "",
                 f"{len(unexpected)} unexpected [{_names(unexpected)}]" if unexpected else "",
                 f"{len(mismatched)} of another shape (file vs encoder) [{_names(mismatched)}]" if mismatched else ""]
        hint = ""
        if file_model is not None and model_cfg is not None:
            ours = {k: getattr(model_cfg, k) for k in ("arch", "width", "cifar_stem")}
            theirs = {k: file_model.get(k) for k in ours}
            if ours != theirs:
                hint = f"; the checkpoint's encoder is {theirs}, this run's {ours}"
        raise InitError(
            f"--init {path}: the {source}'s keys do not fit the encoder: "
            + "; ".join(p for p in parts if p) + hint
        )
    for key in report.kept_new:
        state[key] = target[key]
    encoder.load_state_dict(state, strict=True)
    report.loaded = [k for k in state if k not in report.kept_new]
    return report


def init_encoder(path: str | os.PathLike[str]) -> tuple[str, float]:
    """(arch, width) of the encoder whose weights `path` holds, for a caller that builds the run
    around the file (`simsearch demo --init`). A simsearch checkpoint says so in its config; a
    torchvision state dict is told by its keys: Bottleneck blocks (`conv3`) make a ResNet-50,
    else the blocks in layer3 (2: ResNet-18, 6: ResNet-34); the width is the stem's channels / 64.
    The stem's kernel is not decided here (`load_init` keeps the run's own stem when they differ)."""
    state, source, file_model = read_init_state(path)
    if file_model is not None:
        return str(file_model.get("arch")), float(file_model.get("width", 1.0))
    state, _ = map_torchvision_keys(state)
    if "layer3.0.conv1.weight" not in state or STEM_KEY not in state:
        raise InitError(f"--init {path}: a state dict, but not of a torchvision ResNet (no {STEM_KEY} / layer3.0.conv1.weight)")
    blocks = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("layer3."))
    arch = "resnet50" if "layer1.0.conv3.weight" in state else {2: "resnet18", 6: "resnet34"}.get(blocks, "")
    if not arch:
        raise InitError(f"--init {path}: a torchvision ResNet with {blocks} blocks in layer3 (ResNet-18, 34 and 50 are supported)")
    return arch, state[STEM_KEY].shape[0] / 64


def check_init(path: str | os.PathLike[str], model_cfg: ModelConfig) -> InitReport:
    """Whether `path` fits an encoder built from `model_cfg` (raises InitError if not); for early CLI checks."""
    return load_init(build_encoder(model_cfg), path, model_cfg)
