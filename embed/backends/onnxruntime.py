"""OnnxRuntimeBackend: the default, in-process backend over a model directory's `model.onnx`.

Execution providers are chosen at run time: TensorRT, then CUDA, when this onnxruntime build has
them, CPU otherwise (ONNX Runtime itself falls back to the next provider when one fails to load).
Thread spinning is off, so idle inference threads do not burn CPU that decoding needs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from embed.backends import BackendError
from embed.backends.base import check_batch
from embed.spec import ModelDirError, ModelSpec, model_dir_fingerprint, onnx_path

logger = logging.getLogger(__name__)

PREFERRED_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


def _provider_options(name: str) -> dict[str, Any]:
    if name == "TensorrtExecutionProvider":
        cache = Path(tempfile.gettempdir()) / "simsearch-trt-cache"
        return {"trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache), "trt_fp16_enable": True}
    return {}


def choose_providers(requested: list[str] | None) -> list[str]:
    available = ort.get_available_providers()
    if requested is None:
        return [p for p in PREFERRED_PROVIDERS if p in available] or ["CPUExecutionProvider"]
    unknown = [p for p in requested if p not in available]
    if unknown:
        raise BackendError(f"execution providers {unknown} are not available here; available: {available}")
    return list(requested)


class OnnxRuntimeBackend:
    """uint8 [N, H, W, 3] -> float32 [N, D] with onnxruntime. Thread-safe (`InferenceSession.run` is)."""

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        providers: list[str] | None = None,
        intra_op_threads: int = 0,
        max_batch_size: int = 64,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        # resolved once, so model.json and model.onnx come from the same published version
        resolved = Path(model_dir).resolve()
        try:
            spec = ModelSpec.load(resolved)
            path = onnx_path(resolved)
            # model.json files written before fingerprints existed: the file itself gives it
            self.spec: ModelSpec = spec if spec.fingerprint else dataclasses.replace(
                spec, fingerprint=model_dir_fingerprint(resolved, spec))
        except ModelDirError as e:
            raise BackendError(str(e)) from None
        self.model_dir = Path(model_dir)
        self.max_batch_size = max_batch_size
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = intra_op_threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        names = choose_providers(providers)
        try:
            self._session: ort.InferenceSession | None = ort.InferenceSession(
                str(path), sess_options=opts, providers=[(n, _provider_options(n)) for n in names]
            )
        except Exception as e:  # onnxruntime raises its own exception types
            raise BackendError(f"cannot load {path}: {e}") from None
        self.providers = self._session.get_providers()
        self._lock = threading.Lock()
        self._check_signature()
        logger.info("ONNX Runtime backend for %s v%d on %s", self.spec.name, self.spec.version, self.providers)

    def _check_signature(self) -> None:
        assert self._session is not None
        spec = self.spec
        inputs = {i.name: i for i in self._session.get_inputs()}
        outputs = {o.name: o for o in self._session.get_outputs()}
        problems = []
        inp = inputs.get(spec.input_name)
        if inp is None:
            problems.append(f"no input {spec.input_name!r} (inputs: {sorted(inputs)})")
        else:
            if inp.type != "tensor(uint8)":
                problems.append(f"input {inp.name!r} is {inp.type}, expected tensor(uint8)")
            want = [None, spec.input_height, spec.input_width, 3]
            dims = list(inp.shape)
            fixed = [(d, w) for d, w in zip(dims, want, strict=False) if isinstance(d, int) and w is not None]
            if len(dims) != 4 or any(d != w for d, w in fixed):
                problems.append(f"input {inp.name!r} has shape {dims}, expected [N, {want[1]}, {want[2]}, 3]")
        out = outputs.get(spec.output_name)
        if out is None:
            problems.append(f"no output {spec.output_name!r} (outputs: {sorted(outputs)})")
        else:
            if out.type != "tensor(float)":
                problems.append(f"output {out.name!r} is {out.type}, expected tensor(float)")
            dims = list(out.shape)
            if len(dims) != 2 or (isinstance(dims[1], int) and dims[1] != spec.embedding_dim):
                problems.append(f"output {out.name!r} has shape {dims}, expected [N, {spec.embedding_dim}]")
        if problems:
            raise BackendError(f"{self.model_dir / 'model.onnx'} does not match model.json: " + "; ".join(problems))

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        session = self._session
        if session is None:
            raise BackendError("backend is closed")
        (out,) = session.run([self.spec.output_name], {self.spec.input_name: chunk})
        return np.asarray(out, dtype=np.float32)

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = check_batch(batch, self.spec)
        if len(batch) == 0:
            return np.zeros((0, self.spec.embedding_dim), dtype=np.float32)
        step = self.max_batch_size
        parts = [self._run(batch[i : i + step]) for i in range(0, len(batch), step)]
        out = parts[0] if len(parts) == 1 else np.concatenate(parts)
        if out.shape != (len(batch), self.spec.embedding_dim):
            raise BackendError(f"model returned {list(out.shape)} for a batch of {len(batch)}")
        return out

    def ready(self) -> bool:
        """Runs one blank image through the model and checks the output's shape and finiteness."""
        try:
            probe = np.zeros((1, self.spec.input_height, self.spec.input_width, 3), dtype=np.uint8)
            out = self._run(probe)
        except Exception as e:
            logger.warning("ONNX Runtime backend not ready: %s", e)
            return False
        return out.shape == (1, self.spec.embedding_dim) and bool(np.isfinite(out).all())

    def close(self) -> None:
        with self._lock:
            self._session = None

    def __repr__(self) -> str:
        return f"OnnxRuntimeBackend({str(self.model_dir)!r}, providers={self.providers})"
