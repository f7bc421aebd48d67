"""embed.preprocess, the ONNX Runtime backend, open_backend and the streaming Embedder."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tinymodel import SlowBackend, write_tiny_model_dir

import embed.embedder as embedder_module
from embed.backends import BackendError, open_backend
from embed.backends.base import Backend
from embed.backends.onnxruntime import OnnxRuntimeBackend
from embed.decode import DecodeError
from embed.embedder import Embedder
from embed.preprocess import load_image_array, preprocess
from embed.spec import ModelSpec

DATA = Path(__file__).parent / "data"
MESSY = DATA / "messy"
CIFAR_FILES = sorted((DATA / "cifar10-sample" / "test").glob("*/*.jpg"))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def backend(tiny_dir: Path) -> OnnxRuntimeBackend:
    b = OnnxRuntimeBackend(tiny_dir, intra_op_threads=1, max_batch_size=8)
    yield b
    b.close()


def _spec(**kw) -> ModelSpec:
    base = dict(name="t", version=1, input_height=20, input_width=22, embedding_dim=4, resize_size=24)
    base.update(kw)
    return ModelSpec(**base)


@pytest.mark.parametrize("size", [(480, 360), (360, 480), (30, 30), (16, 12)])
@pytest.mark.parametrize("interp", ["bilinear", "bicubic"])
def test_preprocess_matches_torchvision(size: tuple[int, int], interp: str) -> None:
    tv = pytest.importorskip("torchvision.transforms")
    spec = _spec(interpolation=interp)
    img = Image.open(MESSY / "flower.jpg").convert("RGB").resize(size)
    mode = {"bilinear": tv.InterpolationMode.BILINEAR, "bicubic": tv.InterpolationMode.BICUBIC}[interp]
    ref = tv.Compose([tv.Resize(24, interpolation=mode), tv.CenterCrop((20, 22))])(img)
    out = preprocess(img, spec)
    assert out.shape == (20, 22, 3) and out.dtype == np.uint8
    assert np.array_equal(out, np.asarray(ref))


def test_preprocess_stretch() -> None:
    img = Image.open(MESSY / "flower.jpg").convert("RGB")
    out = preprocess(img, _spec(resize_mode="stretch"))
    assert np.array_equal(out, np.asarray(img.resize((22, 20), Image.Resampling.BILINEAR)))


def test_load_image_array_reports_original_upright_size() -> None:
    big = Image.open(MESSY / "flower.jpg").convert("RGB").resize((1600, 1200))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    big.transpose(Image.Transpose.ROTATE_90).save(buf, "JPEG", quality=92, exif=exif)
    arr, original = load_image_array(buf.getvalue(), _spec())
    assert original == (1600, 1200)
    assert arr.shape == (20, 22, 3)
    ref = preprocess(big, _spec()).astype(int)
    assert np.abs(arr.astype(int) - ref).mean() < 10  # draft decoding changes pixels only slightly
    with pytest.raises(DecodeError) as info:
        load_image_array(MESSY / "truncated_jpeg.jpg", _spec())
    assert info.value.reason == "truncated"


def test_backend_embeds_normalised_vectors(backend: OnnxRuntimeBackend) -> None:
    assert isinstance(backend, Backend)
    assert backend.ready()
    batch = np.stack([load_image_array(p, backend.spec)[0] for p in CIFAR_FILES[:19]])
    out = backend.embed(batch)
    assert out.shape == (19, 32) and out.dtype == np.float32
    assert np.allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    # max_batch_size=8: split into 8 + 8 + 3, same result as one image at a time.
    one_by_one = np.concatenate([backend.embed(batch[i : i + 1]) for i in range(19)])
    assert np.allclose(out, one_by_one, atol=1e-5)
    assert backend.embed(batch[:0]).shape == (0, 32)
    with pytest.raises(ValueError, match="uint8"):
        backend.embed(batch.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[N, 32, 32, 3\]"):
        backend.embed(batch[:, :16])


def test_backend_rejects_mismatching_spec(tiny_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes((tiny_dir / "model.onnx").read_bytes())
    spec = json.loads((tiny_dir / "model.json").read_text())
    spec["embedding_dim"] = 64
    (bad / "model.json").write_text(json.dumps(spec))
    with pytest.raises(BackendError, match="expected \\[N, 64\\]"):
        OnnxRuntimeBackend(bad)
    with pytest.raises(BackendError, match="model.json is missing"):
        OnnxRuntimeBackend(tmp_path / "nothing")
    with pytest.raises(BackendError, match="not available"):
        OnnxRuntimeBackend(tiny_dir, providers=["NoSuchExecutionProvider"])


def test_open_backend(tiny_dir: Path) -> None:
    with pytest.raises(BackendError, match="exactly one"):
        open_backend()
    with pytest.raises(BackendError, match="exactly one"):
        open_backend(model_dir=str(tiny_dir), triton_url="localhost:8001")
    with pytest.raises(BackendError, match="model_name only applies"):
        open_backend(model_dir=str(tiny_dir), model_name="x")
    with pytest.raises(BackendError, match="127.0.0.1:1"):  # dispatches to Triton; nothing listens there
        open_backend(triton_url="127.0.0.1:1", protocol="http", timeout_s=2)
    b = open_backend(model_dir=str(tiny_dir), max_batch_size=4)
    assert isinstance(b, OnnxRuntimeBackend) and b.max_batch_size == 4
    b.close()
    assert not b.ready()


def test_iter_embed_order_failures_and_equality(backend: OnnxRuntimeBackend) -> None:
    messy = sorted(p for p in MESSY.iterdir() if p.name != "README.md")
    items = [p for pair in zip(CIFAR_FILES[:31], messy, strict=True) for p in pair]
    embedder = Embedder(backend, batch_size=5, decode_workers=2)
    results = list(embedder.iter_embed(items))
    assert [r[0] for r in results] == items
    failures = {r[0].name: r[1].reason for r in results if isinstance(r[1], DecodeError)}
    assert failures == {
        "broken.png": "not_an_image", "decompression_bomb.gif": "too_large", "empty_file.jpg": "empty",
        "not_an_image.png": "not_an_image", "truncated_image.png": "truncated", "truncated_jpeg.jpg": "truncated",
    }
    ok = [r for r in results if not isinstance(r[1], DecodeError)]
    expected = backend.embed(np.stack([load_image_array(r[0], backend.spec)[0] for r in ok]))
    assert np.allclose(np.stack([r[1] for r in ok]), expected, atol=1e-5)
    for item, _, size in ok:
        assert size == Image.open(item).size or item.name.startswith("hopper_orientation_6")
    # embed_sources: bytes work too, one result per input.
    srcs = [CIFAR_FILES[0].read_bytes(), b"", CIFAR_FILES[1]]
    out = embedder.embed_sources(srcs)
    assert isinstance(out[1], DecodeError) and out[1].reason == "empty"
    assert np.allclose(out[0], expected[0], atol=1e-5)


def test_iter_embed_is_bounded_and_uses_load(backend: OnnxRuntimeBackend) -> None:
    pulled = 0
    n, bs = 200, 8

    def items():
        nonlocal pulled
        for i in range(n):
            pulled += 1
            yield i

    def load(i: int) -> bytes:
        if i == 7:
            raise FileNotFoundError(2, "No such file")
        return CIFAR_FILES[i % len(CIFAR_FILES)].read_bytes()

    embedder = Embedder(backend, batch_size=bs, decode_workers=2)
    stream = embedder.iter_embed(items(), load=load)
    first = next(stream)
    assert first[0] == 0
    assert pulled <= 3 * bs + 1  # never reads far ahead of the batch being embedded
    rest = list(stream)
    assert [r[0] for r in [first, *rest]] == list(range(n))
    assert rest[6][1].reason == "unreadable"


class _Concurrency:
    """`load` for iter_embed that spends `megabytes` of SHA-256 per item (CPU without the GIL, as
    libjpeg decodes; or holding one lock, as Pillow's Python parsing holds the GIL), then waits
    `wait_s` (as for a slow disk), and records how many items were being loaded at once."""

    def __init__(self, megabytes: float, serial: bool = False, wait_s: float = 0.0) -> None:
        self.data, self.wait_s, self.now, self.peak = bytes(int(megabytes * 1e6)), wait_s, 0, 0
        self._lock, self._serial = threading.Lock(), threading.Lock() if serial else contextlib.nullcontext()

    def __call__(self, i: int) -> bytes:
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)
        with self._serial:
            if self.data:
                hashlib.sha256(self.data).digest()
        time.sleep(self.wait_s)
        with self._lock:
            self.now -= 1
        return CIFAR_FILES[i % len(CIFAR_FILES)].read_bytes()


@pytest.fixture
def short_stretches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(embedder_module, "_STRETCH_S", 0.1)


def test_decoding_threads_grow_while_more_of_them_decode_faster(backend: OnnxRuntimeBackend,
                                                                 short_stretches: None) -> None:
    n = 240
    slow_decode = _Concurrency(2, wait_s=0.006)  # 2 ms of CPU a decode, mostly waiting: threads help on any machine
    embedder = Embedder(backend, batch_size=8, decode_workers=1, max_decode_workers=3)
    results = list(embedder.iter_embed(range(n), load=slow_decode))
    assert embedder.decoding_threads >= 2 and slow_decode.peak >= 2
    assert [r[0] for r in results] == list(range(n))
    expected = backend.embed(np.stack([load_image_array(CIFAR_FILES[i % len(CIFAR_FILES)], backend.spec)[0]
                                       for i in range(n)]))
    assert np.allclose(np.stack([r[1] for r in results]), expected, atol=1e-5)
    # without room to grow (max_decode_workers not given), the same starved stream keeps one thread
    fixed, fixed_decode = Embedder(backend, batch_size=8, decode_workers=1), _Concurrency(4)
    list(fixed.iter_embed(range(96), load=fixed_decode))
    assert fixed.decoding_threads == 1 and fixed_decode.peak == 1


def test_a_decoding_thread_that_brings_nothing_is_taken_back(backend: OnnxRuntimeBackend, short_stretches: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # what overlaps outside the lock (reading, Pillow) can gain a few percent: ask for a clear gain
    monkeypatch.setattr(embedder_module, "GAIN", 1.15)
    serial_decode = _Concurrency(16, serial=True)  # waited for, but a second thread cannot help
    embedder = Embedder(backend, batch_size=8, decode_workers=1, max_decode_workers=3)
    assert len(list(embedder.iter_embed(range(120), load=serial_decode))) == 120
    # tried, then taken back (a second thread may gain a little: the decode after the lock overlaps)
    assert serial_decode.peak >= 2 and embedder.decoding_threads < 3


def test_quick_decodes_keep_their_thread(backend: OnnxRuntimeBackend, short_stretches: None) -> None:
    # waited for, but each decode is short: mostly Python under the GIL, which more threads only share
    quick_decode = _Concurrency(0)
    embedder = Embedder(backend, batch_size=8, decode_workers=1, max_decode_workers=3)
    assert len(list(embedder.iter_embed(range(400), load=quick_decode))) == 400
    assert embedder.decoding_threads == 1 and quick_decode.peak == 1


def test_decoding_threads_stay_when_inference_is_the_bottleneck(backend: OnnxRuntimeBackend,
                                                                short_stretches: None) -> None:
    quick_decode = _Concurrency(0.5)
    embedder = Embedder(SlowBackend(backend, 0.03), batch_size=8, decode_workers=1, max_decode_workers=3)
    results = list(embedder.iter_embed(range(96), load=quick_decode))
    assert len(results) == 96
    assert embedder.decoding_threads == 1 and quick_decode.peak == 1


def test_exported_model_dir(model_dir: Path) -> None:
    """The export issue's real model directory works through open_backend and the Embedder."""
    backend = open_backend(model_dir=str(model_dir), max_batch_size=4)
    assert backend.ready() and backend.spec.embedding_dim == 64
    files = CIFAR_FILES[:10] + [MESSY / "hopper.heif", MESSY / "pil_sample_cmyk.jpg"]
    results = list(Embedder(backend, batch_size=4).iter_embed(files))
    vectors = np.stack([r[1] for r in results])
    assert vectors.shape == (12, 64)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    direct = backend.embed(np.stack([load_image_array(p, backend.spec)[0] for p in files]))
    assert np.allclose(vectors, direct, atol=1e-5)
    backend.close()
