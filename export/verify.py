"""Verification that is part of every export: ONNX checker, then ONNX Runtime against PyTorch.

Both sides see the same uint8 arrays: real images (at least one is required) put through the model
directory's own resize rule (`embed.preprocess`, the code every client and pretraining use), plus a
few synthetic ones as an addition (noise and gradients: inputs far from any training image). The
PyTorch reference normalises with its own code (not the exported wrapper), so a wrong mean/std order
or layout inside the graph shows up as a parity failure too.

Figures, per variant: worst and mean cosine similarity between the two embeddings of each image,
max abs difference of the (l2-normalised) values, and the max abs difference between a row
computed alone (N=1) and inside the full batch (dynamic batch check).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embed.spec import ModelSpec
from export.errors import ExportError, VerificationError

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Tolerance:
    """Pass bounds for one variant: cosine at least `min_cosine`, |diff| at most `max_abs_diff`."""

    min_cosine: float
    max_abs_diff: float


FP32_TOLERANCE = Tolerance(min_cosine=0.9999, max_abs_diff=1e-4)
# half-precision activations: ~3 significant digits per value
FP16_TOLERANCE = Tolerance(min_cosine=0.999, max_abs_diff=5e-3)


def list_images(sources: Sequence[str | os.PathLike[str]], limit: int) -> list[Path]:
    """Image files named by `sources` (files, or folders walked by `embed.files`), about `limit` in all.

    Each folder gets an equal share of `limit`, taken evenly spread over its sorted listing, so
    every folder, and every class subfolder of a dataset, is represented.
    """
    from embed.files import walk_images

    folders = [Path(s) for s in sources if Path(s).is_dir()]
    share = max(1, limit // max(1, len(folders)))
    found: list[Path] = []
    for src in sources:
        p = Path(src)
        if p.is_dir():
            files = [f.path for f in walk_images(p).files]
            if len(files) > share:
                step = len(files) / share
                files = [files[int(i * step)] for i in range(share)]
            found += files
        elif p.is_file():
            found.append(p)
        else:
            raise ExportError(f"verification image source not found: {p}")
    return found


def load_images(paths: Sequence[Path], spec: ModelSpec) -> tuple[np.ndarray, list[str], list[tuple[str, str]]]:
    """Decode + resize (the clients' rule); returns (arrays, their paths, (path, reason) of the files skipped)."""
    from embed.decode import DecodeError
    from embed.preprocess import load_image_array

    arrays, names, skipped = [], [], []
    for p in paths:
        try:
            arr, _ = load_image_array(p, spec)
        except DecodeError as e:
            log.debug("verification: skipping %s (%s)", p, e)
            skipped.append((str(p), str(e)))
            continue
        arrays.append(arr)
        names.append(str(p))
    h, w = spec.input_size
    if not arrays:
        return np.zeros((0, h, w, 3), np.uint8), names, skipped
    return np.stack(arrays), names, skipped


def synthetic_images(spec: ModelSpec, n: int = 4, seed: int = 0) -> np.ndarray:
    """Uniform noise and smooth colour gradients: inputs far from any training image."""
    h, w = spec.input_size
    rng = np.random.default_rng(seed)
    out = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(n - n // 2)]
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n // 2):
        img = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1), (xx + yy + 40 * i) % 256], -1)
        out.append(img.astype(np.uint8))
    return np.stack(out)


@torch.no_grad()
def torch_reference(encoder: nn.Module, images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """The PyTorch FP32 embeddings of uint8 [N, H, W, 3] images, computed without the export wrapper."""
    encoder = encoder.eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255.0)
    x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    f = encoder(x).double()
    return (f / f.norm(dim=1, keepdim=True).clamp_min(1e-12)).float().numpy()


def onnx_embeddings(onnx_file: str | os.PathLike[str], spec: ModelSpec, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the whole batch in one run, each image run alone with N=1) through ONNX Runtime on the CPU."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(onnx_file), opts, providers=["CPUExecutionProvider"])
    batch = sess.run([spec.output_name], {spec.input_name: images})[0]
    single = np.concatenate([sess.run([spec.output_name], {spec.input_name: images[i : i + 1]})[0]
                             for i in range(len(images))])
    return batch, single


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    cos = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1)).clip(1e-12)
    return {
        "worst_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "max_abs_diff": float(np.abs(ref - cand).max()),
    }


def check_graph(onnx_file: str | os.PathLike[str], spec: ModelSpec) -> None:
    """onnx.checker (with shape inference) and the interface the model-directory contract promises."""
    import onnx

    try:
        onnx.checker.check_model(str(onnx_file), full_check=True)
    except onnx.checker.ValidationError as e:
        raise VerificationError(f"{onnx_file} fails the ONNX checker: {str(e).splitlines()[0]}") from None
    graph = onnx.load(str(onnx_file), load_external_data=False).graph
    want = {
        "input": (spec.input_name, onnx.TensorProto.UINT8, [None, *spec.input_size, 3]),
        "output": (spec.output_name, onnx.TensorProto.FLOAT, [None, spec.embedding_dim]),
    }
    for kind, values in (("input", graph.input), ("output", graph.output)):
        name, dtype, dims = want[kind]
        if [v.name for v in values] != [name]:
            raise VerificationError(f"ONNX {kind}s are {[v.name for v in values]}, expected [{name!r}]")
        t = values[0].type.tensor_type
        got = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if t.elem_type != dtype or got != dims:
            raise VerificationError(
                f"ONNX {kind} {name!r} is {onnx.TensorProto.DataType.Name(t.elem_type)} {got}, "
                f"expected {onnx.TensorProto.DataType.Name(dtype)} {dims} (None = dynamic batch)"
            )


def verify_onnx(
    onnx_file: str | os.PathLike[str],
    spec: ModelSpec,
    images: np.ndarray,
    reference: np.ndarray,
    tolerance: Tolerance,
) -> dict[str, Any]:
    """Check `onnx_file` and compare it with `reference`; raise ExportError outside `tolerance`."""
    import onnxruntime as ort

    check_graph(onnx_file, spec)
    batch, single = onnx_embeddings(onnx_file, spec, images)
    figures: dict[str, Any] = compare(reference, batch)
    figures["batch_vs_single_max_abs_diff"] = float(np.abs(batch - single).max())
    figures.update(
        n_images=len(images),
        min_cosine_required=tolerance.min_cosine,
        max_abs_diff_allowed=tolerance.max_abs_diff,
        runtime=f"onnxruntime {ort.__version__} CPUExecutionProvider",
    )
    if figures["worst_cosine"] < tolerance.min_cosine:
        raise VerificationError(
            f"{Path(onnx_file).name}: ONNX Runtime and PyTorch disagree: worst cosine "
            f"{figures['worst_cosine']:.6f} < {tolerance.min_cosine}"
        )
    worst_abs = max(figures["max_abs_diff"], figures["batch_vs_single_max_abs_diff"])
    if worst_abs > tolerance.max_abs_diff:
        raise VerificationError(
            f"{Path(onnx_file).name}: ONNX Runtime and PyTorch disagree: max abs difference "
            f"{worst_abs:.3g} > {tolerance.max_abs_diff}"
        )
    log.info("%s parity: worst cosine %.7f, max abs diff %.3g over %d images",
             Path(onnx_file).name, figures["worst_cosine"], figures["max_abs_diff"], len(images))
    return figures
