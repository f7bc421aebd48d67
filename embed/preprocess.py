"""Image -> the uint8 [H, W, 3] array the model takes, following the resize rule in `model.json`.

`shorter_side_center_crop` matches torchvision's `Resize(S)` + `CenterCrop((H, W))` on a PIL image
(the longer side is `int(S * long / short)`, the crop offset `round((size - crop) / 2)`), so the
vectors of the exported model match the ones seen in evaluation. Normalisation is inside the ONNX
graph; nothing here divides by 255.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from embed.decode import DEFAULT_MAX_PIXELS, Source, decode_with_size
from embed.spec import ModelSpec

_RESAMPLE = {
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "nearest": Image.Resampling.NEAREST,
}


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


def preprocess(img: Image.Image, spec: ModelSpec) -> np.ndarray:
    """An RGB image -> uint8 [input_height, input_width, 3] per `spec`'s resize rule."""
    if img.mode != "RGB":
        img = img.convert("RGB")
    out_h, out_w = spec.input_size
    resample = _RESAMPLE[spec.interpolation]
    if spec.resize_mode == "stretch":
        if img.size != (out_w, out_h):
            img = img.resize((out_w, out_h), resample)
        return np.asarray(img, dtype=np.uint8)
    size = _shorter_side_size(img.width, img.height, spec.effective_resize_size)
    if img.size != size:
        img = img.resize(size, resample)
    img = _pad_to(img, out_w, out_h)
    left = int(round((img.width - out_w) / 2.0))
    top = int(round((img.height - out_h) / 2.0))
    if (left, top, img.width, img.height) != (0, 0, out_w, out_h):
        img = img.crop((left, top, left + out_w, top + out_h))
    return np.asarray(img, dtype=np.uint8)


def draft_size_for(spec: ModelSpec) -> tuple[int, int]:
    """The smallest upright (width, height) a decoder must keep for `spec`'s resize rule."""
    out_h, out_w = spec.input_size
    if spec.resize_mode == "stretch":
        return out_w, out_h
    short = spec.effective_resize_size
    return max(short, out_w), max(short, out_h)


def load_image_array(
    source: Source, spec: ModelSpec, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode (JPEG draft mode on) and preprocess; returns (array, original upright (width, height)).

    Raises `embed.decode.DecodeError` for a file that cannot be decoded.
    """
    img, original = decode_with_size(source, max_pixels=max_pixels, draft_size=draft_size_for(spec))
    return preprocess(img, spec), original
