"""Near-duplicate copies of an image, the kinds a collection accumulates: what an index's duplicate
thresholds are calibrated on (index/dup_calibration.py), and what the duplicate tests and
bench/duplicates.py measure, so the three agree.

Each transform takes the original file's bytes and returns the copy's bytes and its extension:
resized to half, re-encoded as JPEG quality 40, cropped by 10% of each side (5% off every edge),
mirrored, and re-encoded as PNG (lossless: the same pixels in another file). An exact duplicate
is the same bytes (the index knows those by sha256).
"""

from __future__ import annotations

import io
from collections.abc import Callable

from PIL import Image

CopyFn = Callable[[bytes], tuple[bytes, str]]


def _open(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _jpeg(img: Image.Image, quality: int = 90) -> tuple[bytes, str]:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue(), ".jpg"


def half(data: bytes) -> tuple[bytes, str]:
    img = _open(data)
    return _jpeg(img.resize((max(1, img.width // 2), max(1, img.height // 2)), Image.Resampling.LANCZOS))


def jpeg40(data: bytes) -> tuple[bytes, str]:
    return _jpeg(_open(data), quality=40)


def crop10(data: bytes) -> tuple[bytes, str]:
    img = _open(data)
    dx, dy = round(0.05 * img.width), round(0.05 * img.height)
    return _jpeg(img.crop((dx, dy, img.width - dx, img.height - dy)))


def flip(data: bytes) -> tuple[bytes, str]:
    return _jpeg(_open(data).transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def png(data: bytes) -> tuple[bytes, str]:
    buf = io.BytesIO()
    _open(data).save(buf, "PNG")
    return buf.getvalue(), ".png"


TRANSFORMS: dict[str, CopyFn] = {"half": half, "jpeg40": jpeg40, "crop10": crop10, "flip": flip, "png": png}
