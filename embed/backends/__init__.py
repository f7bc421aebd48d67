"""Inference backends: `open_backend` picks ONNX Runtime (a model directory) or Triton (a URL).

Backend modules are imported lazily, so importing this package loads neither onnxruntime nor
tritonclient.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from embed.backends.base import Backend

__all__ = ["BackendError", "open_backend"]


class BackendError(RuntimeError):
    """A backend that cannot start or serve: missing model, unreachable server, spec mismatch."""


def open_backend(
    *,
    model_dir: str | None = None,
    triton_url: str | None = None,
    protocol: str = "grpc",
    model_name: str | None = None,
    **kwargs: Any,
) -> Backend:
    """Exactly one of `model_dir` (ONNX Runtime in-process) or `triton_url` (Triton over tritonclient).

    Remaining keyword arguments go to the backend's constructor.
    """
    if (model_dir is None) == (triton_url is None):
        raise BackendError("give exactly one of model_dir (ONNX Runtime) or triton_url (Triton)")
    if model_dir is not None:
        if model_name is not None:
            raise BackendError("model_name only applies to a Triton backend (the model dir names its model)")
        from embed.backends.onnxruntime import OnnxRuntimeBackend

        return OnnxRuntimeBackend(model_dir, **kwargs)
    from embed.backends.triton import TritonBackend

    return TritonBackend(triton_url, protocol=protocol, model_name=model_name, **kwargs)
