"""The exported graph: uint8 NHWC images in, l2-normalised float32 embeddings out.

Everything a client would otherwise have to repeat lives inside the ONNX graph:

    images uint8 [N, H, W, 3] RGB -> float32 / 255 -> (x - mean) / std -> NCHW
        -> encoder (the projection head is not part of it) -> l2 normalise -> float32 [N, D]

`/255` and the mean/std are folded into one multiply-add (`x * scale - shift`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Sequence

import torch
from torch import nn

from embed.spec import INPUT_NAME, OUTPUT_NAME
from export.errors import ExportError

log = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
DEFAULT_OPSET = 18
L2_EPS = 1e-12


class ExportableEncoder(nn.Module):
    """Wrap an encoder with the preprocessing and the final l2 norm.

    `compute_dtype=torch.float16` runs the encoder in half precision (the FP16 variant); input
    scaling and the l2 norm stay in float32, so the graph's interface is the same either way.
    """

    def __init__(
        self,
        encoder: nn.Module,
        mean: Sequence[float],
        std: Sequence[float],
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if len(mean) != 3 or len(std) != 3:
            raise ExportError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        if min(std) <= 0:
            raise ExportError(f"std must be positive, got {list(std)}")
        self.encoder = copy.deepcopy(encoder).to(compute_dtype).eval()
        self.compute_dtype = compute_dtype
        m = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        s = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * s))
        self.register_buffer("shift", m / s)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        x = x * self.scale - self.shift
        features = self.encoder(x.to(self.compute_dtype)).to(torch.float32)
        # written out instead of F.normalize, whose expand_as exports as a Shape/Range/Expand tangle
        norm = torch.linalg.vector_norm(features, dim=1, keepdim=True).clamp_min(L2_EPS)
        return features / norm


def export_onnx(
    module: ExportableEncoder,
    path: str | os.PathLike[str],
    *,
    image_size: tuple[int, int],
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
) -> str:
    """Write `module` to `path` as one self-contained ONNX file with a dynamic batch dimension.

    `exporter="dynamo"` (torch.export + onnxscript; keeps parameter names) falls back to the
    TorchScript exporter if it fails. Returns the exporter actually used.
    """
    if exporter not in EXPORTERS:
        raise ExportError(f"unknown exporter {exporter!r}; choose one of {EXPORTERS}")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old; use 17 or newer")
    module = module.eval()
    h, w = image_size
    # batch 2, not 1: torch.export specialises a size-1 dimension to a constant
    example = torch.zeros((2, h, w, 3), dtype=torch.uint8)
    if exporter == "dynamo":
        try:
            _export_dynamo(module, example, path, opset)
            return "dynamo"
        except Exception as e:  # noqa: BLE001 - any exporter failure: try the other one
            log.warning("dynamo ONNX export failed (%s: %s); using the TorchScript exporter",
                        type(e).__name__, str(e).splitlines()[0][:200] if str(e) else "")
    _export_torchscript(module, example, path, opset)
    return "torchscript"


def _export_dynamo(module: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], opset: int) -> None:
    batch = torch.export.Dim("N", min=1)
    out = io.StringIO()
    # the dynamo exporter prints progress lines to stdout; keep them in the debug log instead
    with contextlib.redirect_stdout(out), torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=({0: batch},),
            external_data=False,
            optimize=True,
            verbose=False,
        )
    if out.getvalue().strip():
        log.debug("torch.onnx: %s", out.getvalue().strip())


def _export_torchscript(module: nn.Module, example: torch.Tensor, path: str | os.PathLike[str], opset: int) -> None:
    import warnings

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            opset_version=opset,
            dynamo=False,
            dynamic_axes={INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}},
            do_constant_folding=True,
        )
