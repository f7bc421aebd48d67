"""The pretraining config: one typed dataclass with nested sections, strict about unknown keys.

Saved as `config.json` beside the checkpoints and, as a plain dict, inside every checkpoint.
`export/` reads `config["model"]` and `config["data"]["image_size" | "mean" | "std" | "folder"]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pretrain.models import ModelConfig

OPTIMIZERS = ("lars", "sgd", "adamw")
LR_SCALINGS = ("linear", "sqrt")
PRECISIONS = ("bf16", "fp16", "fp32")
BLUR_MODES = ("auto", "on", "off")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class ConfigError(ValueError):
    """A setting (config file or flag) that is unknown or out of range."""


@dataclass
class DataConfig:
    image_size: int = 32  # training resolution S; images are stored at S x S (shorter side + centre crop)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    in_memory: bool = True  # decode once into one uint8 tensor [N, 3, S, S]; else stream with workers
    workers: int = 2  # decode threads (in-memory) or DataLoader workers (streaming)
    max_images: int = 0  # 0: all
    # the folder trained on (absolute), set by `simsearch pretrain` from its argument, not a flag:
    # `simsearch export` verifies the exported model on these images when given no --verify-images
    folder: str = field(default="", metadata={"flag": False})

    def __post_init__(self) -> None:
        if self.image_size < 8:
            raise ConfigError("data.image_size must be >= 8")
        self.mean = tuple(float(v) for v in self.mean)  # type: ignore[assignment]
        self.std = tuple(float(v) for v in self.std)  # type: ignore[assignment]
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ConfigError("data.mean and data.std need 3 values each (std > 0)")


@dataclass
class AugmentConfig:
    strength: float = 0.5  # colour-jitter strength s (the paper uses 0.5 on CIFAR, 1.0 on ImageNet)
    crop_scale: tuple[float, float] = (0.0, 1.0)  # (0, 1): auto = (0.08, 1), or (0.2, 1) below 96 px
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur: str = "auto"  # auto: on for image_size >= 96
    blur_p: float = 0.5
    flip_p: float = 0.5
    view_size: int = 0  # side of the augmented views; 0: data.image_size (smaller trains faster on a CPU)

    def __post_init__(self) -> None:
        self.crop_scale = tuple(float(v) for v in self.crop_scale)  # type: ignore[assignment]
        if self.blur not in BLUR_MODES:
            raise ConfigError(f"augment.blur {self.blur!r}; choose one of {BLUR_MODES}")
        lo, hi = self.crop_scale
        if not 0 <= lo <= hi <= 1:
            raise ConfigError("augment.crop_scale must satisfy 0 <= lo <= hi <= 1")

    def resolved_crop_scale(self, image_size: int) -> tuple[float, float]:
        if self.crop_scale[0] > 0:
            return self.crop_scale  # type: ignore[return-value]
        return (0.08, 1.0) if image_size >= 96 else (0.2, 1.0)

    def resolved_blur(self, image_size: int) -> bool:
        return self.blur == "on" or (self.blur == "auto" and image_size >= 96)


@dataclass
class OptimConfig:
    optimizer: str = "lars"
    base_lr: float = 0.3  # lr = base_lr * batch/256 (linear) or base_lr * sqrt(batch) (sqrt)
    lr_scaling: str = "linear"
    weight_decay: float = 1e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    final_lr_fraction: float = 0.0  # cosine decays to this fraction of the peak

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optim.optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr_scaling not in LR_SCALINGS:
            raise ConfigError(f"optim.lr_scaling {self.lr_scaling!r}; choose one of {LR_SCALINGS}")

    def peak_lr(self, batch_size: int) -> float:
        if self.lr_scaling == "sqrt":
            return self.base_lr * math.sqrt(batch_size)
        return self.base_lr * batch_size / 256


@dataclass
class TrainConfig:
    epochs: float = 100.0  # with a time budget: the epochs the LR schedule is laid out for
    time_budget_min: float = 0.0  # > 0: stop after this many minutes of training, with a checkpoint
    stop_after_steps: int = 0  # > 0: stop this invocation at this global step (resume continues)
    batch_size: int = 256  # GLOBAL batch (all ranks together); the negatives come from all of it
    temperature: float = 0.5
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    device: str = "auto"  # auto: cuda:LOCAL_RANK when available, else cpu
    seed: int = 0
    log_every: int = 20  # steps
    ckpt_every_min: float = 10.0  # also a checkpoint at every epoch end when an epoch is longer
    knn_every: int = 0  # epochs; 0: only at the end (when a val folder is given)
    knn_k: int = 20
    knn_temperature: float = 0.07
    val_train: str = ""  # labelled folder for the kNN monitor's memory bank
    val_test: str = ""  # labelled folder for the kNN monitor's queries
    init: str = ""  # initial encoder weights: a torchvision ResNet state dict or a simsearch checkpoint (new head, step 0)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision {self.precision!r}; choose one of {PRECISIONS}")
        if self.batch_size < 2:
            raise ConfigError("train.batch_size must be >= 2")
        if self.temperature <= 0:
            raise ConfigError("train.temperature must be > 0")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "augment": AugmentConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (lists, not tuples) that survives JSON and `torch.load(weights_only=True)`."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainConfig:
        unknown = sorted(set(d) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section(s) {unknown}; valid: {sorted(SECTIONS)}")
        return cls(**{name: _section(name, d.get(name, {})) for name in SECTIONS})

    def save(self, path: str | Path) -> None:
        from embed.atomic import write_json_atomic

        write_json_atomic(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> PretrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def updated(self, overrides: dict[str, dict[str, Any]]) -> PretrainConfig:
        """A copy with `{"section": {"key": value}}` applied (unknown keys are errors)."""
        d = self.to_dict()
        for name, values in overrides.items():
            if name not in SECTIONS:
                raise ConfigError(f"unknown config section {name!r}; valid: {sorted(SECTIONS)}")
            d[name].update(values)
        return PretrainConfig.from_dict(d)


def _section(name: str, values: dict[str, Any]) -> Any:
    cls = SECTIONS[name]
    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in config section {name!r}; valid: {sorted(valid)}")
    return cls(**values)


def add_config_flags(parser: Any) -> None:
    """One flag per config field (`--batch-size`, `--arch`, ...), all defaulting to None (= the config's value).

    Each help text shows the field's default; only flags given on the command line override a config.
    """
    defaults = PretrainConfig()
    for name, cls in SECTIONS.items():
        group = parser.add_argument_group(name)
        for f in dataclasses.fields(cls):
            if not f.metadata.get("flag", True):
                continue
            value = getattr(getattr(defaults, name), f.name)
            flag = "--" + f.name.replace("_", "-")
            kw: dict[str, Any] = {"dest": f"{name}.{f.name}", "default": None, "help": f"{name}.{f.name} (default: {value})"}
            if isinstance(value, bool):
                kw["action"] = argparse.BooleanOptionalAction
            elif isinstance(value, tuple):
                kw.update(nargs=len(value), type=type(value[0]), metavar="V")
            else:
                kw.update(type=type(value), metavar=f.name.upper())
            group.add_argument(flag, **kw)


def overrides_from_args(args: Any) -> dict[str, dict[str, Any]]:
    """{"section": {"key": value}} for every config flag given on the command line."""
    out: dict[str, dict[str, Any]] = {}
    for dest, value in vars(args).items():
        if "." in dest and value is not None:
            section, key = dest.split(".", 1)
            out.setdefault(section, {})[key] = list(value) if isinstance(value, list) else value
    return out
