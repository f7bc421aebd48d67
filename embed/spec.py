"""The model directory: the contract between `export/` and every stage after it.

    model/
      model.onnx   input  INPUT_NAME  uint8   [N, H, W, 3] RGB, N dynamic
                   output OUTPUT_NAME float32 [N, D], l2-normalised
                   (/255, mean/std, NHWC->NCHW and the final l2 norm are inside the graph)
      model.json   a ModelSpec (below)
      triton/      <name>/config.pbtxt, <name>/1/model.onnx

Everything downstream reads `model.json` through `ModelSpec.load` and never hard-codes a size,
a mean or a dimension. Pure Python: importable without PyTorch or ONNX Runtime.

The model's identity is its `fingerprint` (see `compute_fingerprint`): what an index records so
that vectors of two different models are never mixed in it.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from embed.atomic import write_json_atomic

MODEL_FORMAT = "simsearch-model"
FORMAT_VERSION = 1
INPUT_NAME = "images"
OUTPUT_NAME = "embeddings"
MODEL_ONNX = "model.onnx"
MODEL_FP16_ONNX = "model.fp16.onnx"
MODEL_JSON = "model.json"
TRITON_DIR = "triton"
RESIZE_MODES = ("shorter_side_center_crop", "stretch")
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")
FINGERPRINT_SCHEME = "simsearch-fingerprint-v1"
# The spec fields that decide which uint8 pixels a file becomes before the ONNX graph sees it.
# Two model directories with the same model.onnx but another resize rule give other vectors, so
# these are part of the fingerprint. A new preprocessing field belongs here too.
PIXEL_FIELDS = ("input_height", "input_width", "resize_mode", "resize_size", "interpolation")


class ModelDirError(ValueError):
    """A model directory that is missing, incomplete or not ours."""


@dataclass(frozen=True)
class ModelSpec:
    """What a consumer needs to feed the model; stored as `model.json`.

    Resize rule: `shorter_side_center_crop` scales the image so its shorter side is `resize_size`
    pixels, then takes the central `input_height` x `input_width` crop; `stretch` resizes straight to
    `input_height` x `input_width`. The resulting uint8 RGB array is the ONNX input as it is.
    """

    name: str
    version: int
    input_height: int
    input_width: int
    embedding_dim: int
    resize_mode: str = "shorter_side_center_crop"
    resize_size: int = 0  # 0: same as min(input_height, input_width)
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    format: str = MODEL_FORMAT
    format_version: int = FORMAT_VERSION
    checkpoint_sha256: str = ""
    fingerprint: str = ""  # "" in model.json files written before fingerprints existed
    training_config: dict[str, Any] = field(default_factory=dict)
    parity: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ModelDirError(f"resize_mode {self.resize_mode!r} is not one of {RESIZE_MODES}")
        if self.interpolation not in INTERPOLATIONS:
            raise ModelDirError(f"interpolation {self.interpolation!r} is not one of {INTERPOLATIONS}")
        if self.input_height <= 0 or self.input_width <= 0 or self.embedding_dim <= 0:
            raise ModelDirError("input size and embedding dimension must be positive")

    @property
    def input_size(self) -> tuple[int, int]:
        return (self.input_height, self.input_width)

    @property
    def effective_resize_size(self) -> int:
        return self.resize_size or min(self.input_height, self.input_width)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        if d.get("format") != MODEL_FORMAT:
            raise ModelDirError(f"not a {MODEL_FORMAT} model.json (format={d.get('format')!r})")
        if d.get("format_version") != FORMAT_VERSION:
            raise ModelDirError(
                f"model.json format_version {d.get('format_version')!r} is not supported (expected {FORMAT_VERSION})"
            )
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise ModelDirError(f"unknown keys in model.json: {unknown}")
        d = dict(d)
        d["mean"], d["std"] = tuple(d.get("mean", cls.mean)), tuple(d.get("std", cls.std))
        return cls(**d)

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str]) -> ModelSpec:
        path = Path(model_dir) / MODEL_JSON
        if not path.is_file():
            raise ModelDirError(f"{model_dir} is not a model directory: {MODEL_JSON} is missing")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ModelDirError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)

    def save(self, model_dir: str | os.PathLike[str]) -> Path:
        """Write model.json atomically (temporary file, then os.replace)."""
        path = Path(model_dir) / MODEL_JSON
        write_json_atomic(path, self.to_dict())
        return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compute_fingerprint(onnx_sha256: str, spec: ModelSpec) -> str:
    """The model's identity: sha256 over model.onnx's sha256 and the pixel rule (`PIXEL_FIELDS`).

    Same fingerprint = same vectors for the same file. The fp32 `model.onnx` decides it; the
    fp16 variant and TensorRT FP16 execution of the same file count as the same model (their
    vectors agree within the export's fp16 parity tolerance, cosine >= 0.999), so a GPU server
    can search an index built on a CPU. Export records it in model.json (`fingerprint`).
    """
    pixels = {k: getattr(spec, k) for k in PIXEL_FIELDS}
    text = f"{FINGERPRINT_SCHEME}\n{onnx_sha256}\n{json.dumps(pixels, sort_keys=True)}"
    return hashlib.sha256(text.encode()).hexdigest()


def model_dir_fingerprint(model_dir: str | os.PathLike[str], spec: ModelSpec | None = None) -> str:
    """The fingerprint recorded in model.json, or computed from model.onnx for older exports."""
    spec = spec if spec is not None else ModelSpec.load(model_dir)
    return spec.fingerprint or compute_fingerprint(sha256_file(onnx_path(model_dir)), spec)


def onnx_path(model_dir: str | os.PathLike[str]) -> Path:
    path = Path(model_dir) / MODEL_ONNX
    if not path.is_file():
        raise ModelDirError(f"{model_dir} is not a model directory: {MODEL_ONNX} is missing")
    return path
