"""Decode one image file (bytes or a path) into an upright RGB `PIL.Image`, or fail with a reason.

Every caller (the folder indexer, the server, the pretraining loader) decodes through
`decode_image`, so the same file gives the same pixels everywhere.

What it does, in order:

1. Opens the file by content (not by extension). HEIF/HEIC opens through pillow-heif when it is
   installed (a base dependency); AVIF through Pillow itself.
2. Refuses images with more than `max_pixels` pixels *before* decoding them ("too_large"); Pillow's
   own decompression-bomb check (raised on open) gives the same reason.
3. For JPEG, when `draft_size` is given, asks libjpeg to decode at a reduced scale (1/2, 1/4, 1/8)
   that still leaves both sides at least `draft_size` (in the upright orientation): large photos
   then decode several times faster.
4. Decodes the first frame; truncated data is an error ("truncated"); `ImageFile.LOAD_TRUNCATED_IMAGES`
   is never touched, since it is process-wide.
5. Applies the EXIF orientation (`ImageOps.exif_transpose`).
6. Converts every mode to RGB:
   - 16-bit and 32-bit grayscale ("I;16*", "I", "F") are stretched from the image's own minimum..maximum
     to 0..255. Such files rarely use the full range (tests/data/messy/16bit.cropped.tif spans
     291..694, which `/65535` or `>> 8` turns black); a constant image maps to 0.
   - Anything with transparency (RGBA, LA, PA, P or L or RGB with a tRNS colour) is composited over
     `background` (white by default), never over black by accident.
   - CMYK, YCbCr, 1-bit, palette, LAB, HSV: Pillow's `convert("RGB")`.
"""

from __future__ import annotations

import io
import logging
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

REASONS = ("empty", "not_an_image", "unreadable", "truncated", "too_large")
DEFAULT_MAX_PIXELS = 50_000_000

Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_WIDE_GRAY_MODES = ("I", "F")
_heif_registered: bool | None = None


class DecodeError(Exception):
    """A file that could not be decoded; `.reason` is one of `REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown decode failure reason {reason!r}; valid: {REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def _register_heif() -> None:
    """Register the HEIF opener once (lazily: nothing happens at import time)."""
    global _heif_registered
    if _heif_registered is None:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            _heif_registered = True
        except ImportError:
            logger.info("pillow-heif is not installed: HEIF/HEIC files will be reported as not_an_image")
            _heif_registered = False


def _open(source: Source) -> Image.Image:
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise DecodeError("empty", "zero bytes")
        fp = io.BytesIO(bytes(source))
        name = "<bytes>"
    else:
        name = os.fspath(source)
        try:
            # Read the whole file: no file handle outlives this call (animated files keep theirs open).
            with open(name, "rb") as f:
                data = f.read()
        except OSError as e:
            raise DecodeError("unreadable", f"{name}: {e.strerror or e}") from None
        if not data:
            raise DecodeError("empty", f"{name} is an empty file")
        fp = io.BytesIO(data)
    try:
        return Image.open(fp)
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", f"{name}: {e}") from None
    except UnidentifiedImageError:
        raise DecodeError("not_an_image", f"{name} is not an image Pillow can identify") from None
    except OSError as e:
        if _is_truncation(e):
            raise DecodeError("truncated", f"{name}: {e}") from None
        raise DecodeError("unreadable", f"{name}: {e}") from None
    except (ValueError, SyntaxError, EOFError) as e:
        raise DecodeError("unreadable", f"{name}: {type(e).__name__}: {e}") from None


def _is_truncation(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, EOFError) or "truncated" in text or "broken data stream" in text


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # a malformed EXIF block must not fail the image
        return 1


def _apply_draft(img: Image.Image, draft_size: tuple[int, int], orientation: int) -> None:
    if img.format != "JPEG":
        return
    w, h = draft_size
    if orientation in (5, 6, 7, 8):  # stored sideways: the upright width is the stored height
        w, h = h, w
    img.draft("RGB", (max(1, w), max(1, h)))


def _wide_gray_to_l(img: Image.Image) -> Image.Image:
    arr = np.asarray(img if img.mode in _WIDE_GRAY_MODES else img.convert("I"), dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        out = np.zeros(arr.shape, dtype=np.uint8)
    else:
        out = np.clip(np.rint((arr - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)
    return Image.fromarray(out, mode="L")


def to_rgb(img: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited over `background`."""
    mode = img.mode
    if mode.startswith("I;16") or mode in _WIDE_GRAY_MODES:
        return _wide_gray_to_l(img).convert("RGB")
    has_alpha = mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in img.info)
    if not has_alpha:
        return img if mode == "RGB" else img.convert("RGB")
    rgba = img.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


def decode_image(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode `source` (bytes or a file path) to an RGB image, upright, first frame.

    `draft_size` (width, height) is the smallest size the caller needs in the upright orientation;
    JPEGs are then decoded at the coarsest libjpeg scale that still covers it.
    Raises `DecodeError` with `.reason` in `REASONS`; never anything else for a bad file.
    """
    return decode_with_size(source, max_pixels=max_pixels, draft_size=draft_size, background=background)[0]


def decode_with_size(
    source: Source,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: tuple[int, int] | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> tuple[Image.Image, tuple[int, int]]:
    """`decode_image`, plus the upright (width, height) of the full-size image (before any draft)."""
    _register_heif()
    img = _open(source)
    w, h = img.size
    if w <= 0 or h <= 0:
        raise DecodeError("unreadable", f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError("too_large", f"{w}x{h} = {w * h} pixels exceeds the limit of {max_pixels}")
    orientation = _orientation(img)
    original = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
    if draft_size is not None:
        _apply_draft(img, draft_size, orientation)
    try:
        img.seek(0)
        img.load()
    except Image.DecompressionBombError as e:
        raise DecodeError("too_large", str(e)) from None
    except (OSError, EOFError) as e:
        if _is_truncation(e):
            raise DecodeError("truncated", str(e)) from None
        raise DecodeError("unreadable", f"{type(e).__name__}: {e}") from None
    except (ValueError, SyntaxError, MemoryError) as e:
        raise DecodeError("unreadable", f"{type(e).__name__}: {e}") from None
    if orientation != 1:
        try:
            img = ImageOps.exif_transpose(img)
        except Exception as e:  # broken EXIF: keep the stored orientation rather than fail
            logger.warning("ignoring unreadable EXIF orientation: %s", e)
    try:
        return to_rgb(img, background), original
    except (OSError, ValueError) as e:
        raise DecodeError("unreadable", f"cannot convert mode {img.mode} to RGB: {e}") from None
