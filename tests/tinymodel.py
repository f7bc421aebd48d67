"""A tiny model directory built straight with onnx.helper (no PyTorch export): for embed/index tests.

uint8 [N, 32, 32, 3] -> /255, mean/std -> NCHW -> conv 4x4 stride 4 (seeded weights) -> ReLU ->
flatten -> matmul -> l2 -> float32 [N, 32]. It keeps spatial detail, so different images get
different vectors.

`SlowBackend` wraps a real backend to make its model calls slower (inference as the bottleneck).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np

from embed.backends.base import Backend
from embed.spec import MODEL_ONNX, ModelSpec


def write_tiny_model_dir(directory: Path, *, size: int = 32, dim: int = 32, seed: int = 0,
                         name: str = "tiny", version: int = 1, common: float = 0.0) -> Path:
    """`common` > 0 adds that much of one fixed direction to every vector before the l2 norm: all
    pictures then look alike to it, as to an encoder trained for too short a time."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    channels, stride = 8, 4
    cells = (size // stride) ** 2 * channels
    mean = np.array([0.485, 0.456, 0.406], np.float32).reshape(1, 1, 1, 3)
    std = np.array([0.229, 0.224, 0.225], np.float32).reshape(1, 1, 1, 3)
    inits = [
        numpy_helper.from_array(np.float32(255.0).reshape(()), "k255"),
        numpy_helper.from_array(mean, "mean"),
        numpy_helper.from_array(std, "std"),
        numpy_helper.from_array(rng.standard_normal((channels, 3, stride, stride)).astype(np.float32), "w"),
        numpy_helper.from_array(np.array([-1, cells], np.int64), "flat"),
        numpy_helper.from_array(rng.standard_normal((cells, dim)).astype(np.float32) / np.sqrt(cells), "proj"),
        numpy_helper.from_array(np.full((1, dim), common / np.sqrt(dim), np.float32), "common"),
    ]
    nodes = [
        helper.make_node("Cast", ["images"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Div", ["f", "k255"], ["f1"]),
        helper.make_node("Sub", ["f1", "mean"], ["f2"]),
        helper.make_node("Div", ["f2", "std"], ["f3"]),
        helper.make_node("Transpose", ["f3"], ["x"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["x", "w"], ["c"], strides=[stride, stride], kernel_shape=[stride, stride]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Reshape", ["r", "flat"], ["v"]),
        helper.make_node("MatMul", ["v", "proj"], ["e0"]),
        helper.make_node("Add", ["e0", "common"], ["e"]),
        helper.make_node("LpNormalization", ["e"], ["embeddings"], p=2, axis=1),
    ]
    graph = helper.make_graph(
        nodes, "tiny",
        [helper.make_tensor_value_info("images", TensorProto.UINT8, ["N", size, size, 3])],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["N", dim])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / MODEL_ONNX))
    ModelSpec(name=name, version=version, input_height=size, input_width=size, embedding_dim=dim).save(directory)
    return directory


class SlowBackend:
    """A real backend whose model calls take `delay_s` longer; records batch sizes."""

    def __init__(self, inner: Backend, delay_s: float, ready: bool = True) -> None:
        self.inner, self.delay_s, self._ready = inner, delay_s, ready
        self.spec, self.max_batch_size = inner.spec, inner.max_batch_size
        self.batches: list[int] = []
        self.lock = threading.Lock()

    def embed(self, batch: np.ndarray) -> np.ndarray:
        with self.lock:
            self.batches.append(len(batch))
        time.sleep(self.delay_s)
        return self.inner.embed(batch)

    def ready(self) -> bool:
        return self._ready and self.inner.ready()

    def close(self) -> None:
        self.inner.close()
