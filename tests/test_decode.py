"""embed.decode on the messy sample: every file decoded correctly or failed with the right reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from embed.decode import REASONS, DecodeError, decode_image

MESSY = Path(__file__).parent / "data" / "messy"
CIFAR = Path(__file__).parent / "data" / "cifar10-sample"

EXPECTED_FAILURES = {
    "broken.png": "not_an_image",
    "decompression_bomb.gif": "too_large",
    "empty_file.jpg": "empty",
    "not_an_image.png": "not_an_image",
    "truncated_image.png": "truncated",
    "truncated_jpeg.jpg": "truncated",
}
IMAGE_FILES = sorted(p.name for p in MESSY.iterdir() if p.name != "README.md")


def _arr(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


def test_sample_is_complete() -> None:
    assert len(IMAGE_FILES) == 31


@pytest.mark.parametrize("name", IMAGE_FILES)
def test_every_messy_file(name: str) -> None:
    path = MESSY / name
    if name in EXPECTED_FAILURES:
        with pytest.raises(DecodeError) as info:
            decode_image(path)
        assert info.value.reason == EXPECTED_FAILURES[name]
        assert info.value.reason in REASONS
        assert str(info.value)
        return
    img = decode_image(path)
    assert img.mode == "RGB"
    arr = np.asarray(img)
    assert arr.ndim == 3 and arr.shape[2] == 3
    assert arr.std() > 5, "decoded to a flat image"
    # Bytes and paths decode the same.
    assert np.array_equal(arr, np.asarray(decode_image(path.read_bytes())))


def test_missing_file_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(DecodeError) as info:
        decode_image(tmp_path / "nope.jpg")
    assert info.value.reason == "unreadable"
    with pytest.raises(DecodeError) as info:
        decode_image(b"")
    assert info.value.reason == "empty"


def test_pixel_limit() -> None:
    with pytest.raises(DecodeError) as info:
        decode_image(MESSY / "flower.jpg", max_pixels=480 * 360 - 1)
    assert info.value.reason == "too_large"
    assert decode_image(MESSY / "flower.jpg", max_pixels=480 * 360).size == (480, 360)


@pytest.mark.parametrize("name", ["hopper_orientation_3.jpg", "hopper_orientation_6.jpg"])
def test_pillow_orientation_files_match_upright_hopper(name: str) -> None:
    upright = _arr(decode_image(MESSY / "hopper.bmp"))
    decoded = _arr(decode_image(MESSY / name))
    raw = _arr(Image.open(MESSY / name).convert("RGB"))  # stored pixels, no EXIF applied
    assert decoded.shape == upright.shape
    err_decoded = np.abs(decoded - upright).mean()
    err_raw = np.abs(raw - upright).mean()
    assert err_decoded < 8, err_decoded
    assert err_raw > 4 * err_decoded


def _with_orientation(stored: Image.Image, orientation: int, fmt: str) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    stored.save(buf, format=fmt, exif=exif, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


# Orientation tag -> how the upright picture was turned to get the stored pixels.
# 3: upside down; 6: stored turned 90° counter-clockwise (viewer rotates it 90° clockwise);
# 8: stored turned 90° clockwise. PIL's ROTATE_90 turns counter-clockwise.
STORE = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


@pytest.mark.parametrize("orientation", sorted(STORE))
def test_exif_orientation_exact_on_png(orientation: int) -> None:
    upright = Image.open(CIFAR / "test" / "cat" / "0000.jpg").convert("RGB").crop((0, 0, 32, 20))
    data = _with_orientation(upright.transpose(STORE[orientation]), orientation, "PNG")
    assert np.array_equal(np.asarray(decode_image(data)), np.asarray(upright))


def test_exif_orientation_jpeg_and_draft(tmp_path: Path) -> None:
    upright = decode_image(MESSY / "flower.jpg").resize((1600, 1200))  # landscape
    data = _with_orientation(upright.transpose(STORE[6]), 6, "JPEG")
    full = decode_image(data)
    assert full.size == (1600, 1200)
    assert np.abs(_arr(full) - _arr(upright)).mean() < 6
    small = decode_image(data, draft_size=(300, 300))
    # libjpeg scales by 1/2, 1/4 or 1/8: the coarsest that keeps both upright sides >= 300.
    assert small.size == (400, 300)
    ref = _arr(upright.resize((400, 300), Image.Resampling.BOX))
    assert np.abs(_arr(small) - ref).mean() < 8
    # A draft larger than the image leaves it at full size.
    assert decode_image(data, draft_size=(5000, 5000)).size == (1600, 1200)


@pytest.mark.parametrize("name", ["transparent.png", "transparent.gif", "transparent.webp", "pil123p.png"])
def test_transparency_composited_on_background(name: str) -> None:
    src = Image.open(MESSY / name)
    alpha = np.asarray(src.convert("RGBA"))[..., 3]
    assert (alpha == 0).any()
    white = np.asarray(decode_image(MESSY / name))
    green = np.asarray(decode_image(MESSY / name, background=(0, 255, 0)))
    clear = alpha == 0
    assert (white[clear] == 255).all()
    assert (green[clear] == [0, 255, 0]).all()
    opaque = alpha == 255
    assert np.array_equal(white[opaque], green[opaque])


def test_gray_with_trns_is_composited() -> None:
    src = Image.open(MESSY / "l_trns.png")
    trns = src.info["transparency"]
    gray = np.asarray(src)
    out = np.asarray(decode_image(MESSY / "l_trns.png", background=(0, 0, 255)))
    assert (out[gray == trns] == [0, 0, 255]).all()
    others = gray != trns
    assert np.array_equal(out[others][:, 0], gray[others])


def test_sixteen_bit_uses_its_range() -> None:
    raw = np.asarray(Image.open(MESSY / "16bit.cropped.tif"), dtype=np.float64)
    out = np.asarray(decode_image(MESSY / "16bit.cropped.tif"))
    assert out.min() == 0 and out.max() == 255
    expected = np.rint((raw - raw.min()) * 255 / (raw.max() - raw.min()))
    assert np.abs(out[..., 0] - expected).max() <= 1
    full = np.asarray(Image.open(MESSY / "gray16.png"), dtype=np.int32)
    out16 = np.asarray(decode_image(MESSY / "gray16.png"), dtype=np.int32)
    assert np.abs(out16[..., 0] - (full >> 8)).mean() < 3


def test_first_frame_of_animations() -> None:
    for name in ("iss634.gif", "iss634.apng"):
        src = Image.open(MESSY / name)
        assert src.n_frames > 1
        src.seek(0)
        first = np.asarray(src.convert("RGB"), dtype=np.int16)
        out = _arr(decode_image(MESSY / name))
        assert np.abs(out - first).mean() < 1


def test_cmyk_and_bilevel() -> None:
    cmyk = np.asarray(decode_image(MESSY / "pil_sample_cmyk.jpg"))
    assert cmyk.shape == (100, 100, 3)
    # The sample is red text on black: red dominates the bright pixels.
    bright = cmyk.max(axis=2) > 128
    assert bright.any() and (cmyk[bright][:, 0] > cmyk[bright][:, 1]).all()
    bw = np.asarray(decode_image(MESSY / "hopper_bw_500.png"))
    assert set(np.unique(bw)) <= {0, 255}


def _png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def test_synthetic_modes() -> None:
    gray = np.tile(np.arange(0, 256, 16, dtype=np.uint8), (16, 1))  # 16x16 ramp
    alpha = np.zeros_like(gray)
    alpha[:, 8:] = 255
    la = Image.fromarray(np.stack([gray, alpha], axis=2), mode="LA")
    out = np.asarray(decode_image(_png_bytes(la), background=(10, 20, 30)))
    assert (out[:, :8] == [10, 20, 30]).all()
    assert np.array_equal(out[:, 8:, 0], gray[:, 8:])
    # 32-bit integer and float grayscale (TIFF): stretched from their own range.
    wide = (gray.astype(np.int32) * 1000 + 5000)
    for img in (Image.fromarray(wide, mode="I"), Image.fromarray(wide.astype(np.float32), mode="F")):
        arr = np.asarray(decode_image(_png_bytes(img, "TIFF")))
        assert arr[..., 0].min() == 0 and arr[..., 0].max() == 255
        assert np.array_equal(arr[..., 0], np.rint(gray.astype(float) * 255 / 240))  # 0..240 stretched to 0..255
    flat = Image.fromarray(np.full((4, 4), 700, np.int32), mode="I")
    assert (np.asarray(decode_image(_png_bytes(flat, "TIFF"))) == 0).all()
