"""Image -> the uint8 [H, W, 3] array a model takes: the one preprocessing function of the project.

Pretraining and `simsearch eval` (`pretrain/data.py`), export verification, the folder indexer and
the server all turn a file into pixels through `load_image_array`, with a `ResizeRule`: pretraining
builds its rule from the training resolution (`pretrain.data.training_rule`), the export records
that rule in `model.json` (`resize_mode`, `resize_size`, `interpolation`), and every later stage
reads it back with `ResizeRule.of(spec)`. So the pixels an accuracy was measured on at training
time are the pixels the server feeds the exported model.

The steps, identical on every path:

1. decode (`embed.decode`), with JPEG draft mode on: libjpeg decodes at 1/2, 1/4 or 1/8 scale when
   both upright sides still cover `ResizeRule.draft_size` (large photos decode several times faster;
   the pixels differ slightly from a full decode, the same way for every caller);
2. `shorter_side_center_crop`: scale so the shorter side is `resize_size` (the longer side
   `int(resize_size * long / short)`), then the central `height` x `width` crop at offset
   `round((size - crop) / 2)`, zero-padded when the image is smaller: torchvision's `Resize(S)` +
   `CenterCrop((H, W))` on a PIL image. `stretch`: straight to `height` x `width`;
3. Pillow's resize, which is antialiased (its filter widens with the scale factor, so a photo
   scaled down 50x does not alias), exact: no `reducing_gap`. That shortcut (box-reduce first when
   scaling down 6x or more) would be faster on large PNG/WebP/HEIF files, but its pixels are
   Pillow's own; without it, the rule in `model.json` is what torchvision's transforms compute, so
   any client can reproduce it. Large JPEGs get their speed from draft mode (step 1) instead.

Normalisation is inside the ONNX graph; nothing here divides by 255.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from embed.decode import DEFAULT_MAX_PIXELS, Source, decode_with_size
from embed.spec import INTERPOLATIONS, RESIZE_MODES, ModelSpec

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


@dataclass(frozen=True)
class ResizeRule:
    """How a decoded image becomes the model input (`model.json` stores the same fields)."""

    height: int
    width: int
    mode: str = "shorter_side_center_crop"
    resize_size: int = 0  # 0: min(height, width)
    interpolation: str = "bicubic"

    def __post_init__(self) -> None:
        if self.mode not in RESIZE_MODES:
            raise ValueError(f"resize mode {self.mode!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.height <= 0 or self.width <= 0 or self.resize_size < 0:
            raise ValueError(f"bad sizes {self.height}x{self.width}, resize_size {self.resize_size}")

    @classmethod
    def of(cls, spec: ModelSpec | ResizeRule) -> ResizeRule:
        """The rule a model directory's `model.json` records (a rule is returned as it is)."""
        if isinstance(spec, ResizeRule):
            return spec
        return cls(spec.input_height, spec.input_width, spec.resize_mode, spec.resize_size, spec.interpolation)

    @property
    def effective_resize_size(self) -> int:
        return self.resize_size or min(self.height, self.width)

    @property
    def draft_size(self) -> tuple[int, int]:
        """The smallest upright (width, height) the decoder must keep."""
        if self.mode == "stretch":
            return self.width, self.height
        short = self.effective_resize_size
        return max(short, self.width), max(short, self.height)


def _shorter_side_size(width: int, height: int, short: int) -> tuple[int, int]:
    if width <= height:
        return short, int(short * height / width)
    return int(short * width / height), short


def _pad_to(img: Image.Image, width: int, height: int) -> Image.Image:
    """torchvision's CenterCrop pads with zeros when the crop is larger than the image."""
    if img.width >= width and img.height >= height:
        return img
    canvas = Image.new("RGB", (max(width, img.width), max(height, img.height)))
    canvas.paste(img, ((canvas.width - img.width) // 2, (canvas.height - img.height) // 2))
    return canvas


def _resize(img: Image.Image, size: tuple[int, int], interpolation: str) -> Image.Image:
    if img.size == size:
        return img
    return img.resize(size, _RESAMPLE[interpolation])


def preprocess(img: Image.Image, rule: ResizeRule | ModelSpec) -> np.ndarray:
    """An RGB image -> uint8 [height, width, 3] per the rule (a model's spec names its rule)."""
    rule = ResizeRule.of(rule)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if rule.mode == "stretch":
        return np.asarray(_resize(img, (rule.width, rule.height), rule.interpolation), dtype=np.uint8)
    img = _resize(img, _shorter_side_size(img.width, img.height, rule.effective_resize_size), rule.interpolation)
    img = _pad_to(img, rule.width, rule.height)
    left = int(round((img.width - rule.width) / 2.0))
    top = int(round((img.height - rule.height) / 2.0))
    if (left, top, img.width, img.height) != (0, 0, rule.width, rule.height):
        img = img.crop((left, top, left + rule.width, top + rule.height))
    return np.asarray(img, dtype=np.uint8)


def draft_size_for(rule: ResizeRule | ModelSpec) -> tuple[int, int]:
    """The smallest upright (width, height) a decoder must keep for the rule."""
    return ResizeRule.of(rule).draft_size


def load_image_array(
    source: Source, rule: ResizeRule | ModelSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode (JPEG draft mode on) and preprocess; returns (array, original upright (width, height)).

    The array is read-only (a view of Pillow's buffer); copy it before writing into it.
    Raises `embed.decode.DecodeError` for a file that cannot be decoded.
    """
    rule = ResizeRule.of(rule)
    img, original = decode_with_size(source, max_pixels=max_pixels, draft_size=rule.draft_size)
    return preprocess(img, rule), original
