"""The one interface every inference backend implements (ONNX Runtime in-process, Triton remote)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from embed.spec import ModelSpec


@runtime_checkable
class Backend(Protocol):
    """uint8 [N, H, W, 3] RGB (H, W from `spec`) -> float32 [N, D] l2-normalised embeddings.

    `embed` accepts any N >= 0 and splits batches larger than `max_batch_size` itself.
    `ready()` really asks the model (not just "was constructed"). Implementations are thread-safe.
    """

    spec: ModelSpec
    max_batch_size: int

    def embed(self, batch: np.ndarray) -> np.ndarray: ...

    def ready(self) -> bool: ...

    def close(self) -> None: ...


def check_batch(batch: np.ndarray, spec: ModelSpec) -> np.ndarray:
    """Validate a batch against the spec; raises ValueError naming the expected shape and dtype."""
    batch = np.asarray(batch)
    expected = (spec.input_height, spec.input_width, 3)
    if batch.dtype != np.uint8 or batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
        raise ValueError(
            f"expected a uint8 batch of shape [N, {expected[0]}, {expected[1]}, 3], "
            f"got {batch.dtype} {list(batch.shape)}"
        )
    return np.ascontiguousarray(batch)
