"""The Triton model repository inside a model directory: triton/<name>/config.pbtxt + <version>/model.onnx.

The config is built with Triton's own protobuf schema (`tritonclient.grpc.model_config_pb2`) and
printed with `text_format`, so a misspelt field cannot get in. Besides the usual settings it
carries the whole `model.json` as the `simsearch_model_json` parameter: a client that only knows
a Triton URL recovers the ModelSpec from `get_model_config`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from embed.spec import MODEL_ONNX, TRITON_DIR, ModelSpec
from export.errors import ExportError

log = logging.getLogger(__name__)

CONFIG_PBTXT = "config.pbtxt"
SPEC_PARAMETER = "simsearch_model_json"
INSTANCE_KINDS = ("KIND_GPU", "KIND_CPU")


@dataclass(frozen=True)
class TritonOptions:
    max_batch_size: int = 64
    preferred_batch_sizes: tuple[int, ...] = (8, 16, 32, 64)
    max_queue_delay_us: int = 2000
    instance_kind: str = "KIND_GPU"
    instance_count: int = 1
    tensorrt: bool = True  # the TensorRT execution accelerator (GPU instances only)
    tensorrt_fp16: bool = True
    workspace_bytes: int = 1 << 30
    warmup: bool = True

    def __post_init__(self) -> None:
        if self.instance_kind not in INSTANCE_KINDS:
            raise ExportError(f"instance kind {self.instance_kind!r} is not one of {INSTANCE_KINDS}")
        if self.max_batch_size < 1:
            raise ExportError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        bad = [b for b in self.preferred_batch_sizes if not 1 <= b <= self.max_batch_size]
        if bad:
            raise ExportError(f"preferred batch sizes {bad} are outside 1..max_batch_size={self.max_batch_size}")
        if self.instance_count < 1 or self.max_queue_delay_us < 0 or self.workspace_bytes < 1:
            raise ExportError("instance_count and workspace_bytes must be >= 1, max_queue_delay_us >= 0")


def build_model_config(spec: ModelSpec, options: TritonOptions):  # -> model_config_pb2.ModelConfig
    from tritonclient.grpc import model_config_pb2 as pb

    cfg = pb.ModelConfig(name=spec.name, platform="onnxruntime_onnx", max_batch_size=options.max_batch_size)
    # with max_batch_size > 0 Triton adds the batch dimension itself: dims exclude it
    cfg.input.append(pb.ModelInput(name=spec.input_name, data_type=pb.TYPE_UINT8, dims=[*spec.input_size, 3]))
    cfg.output.append(pb.ModelOutput(name=spec.output_name, data_type=pb.TYPE_FP32, dims=[spec.embedding_dim]))
    cfg.dynamic_batching.preferred_batch_size.extend(sorted(set(options.preferred_batch_sizes)))
    cfg.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    kind = pb.ModelInstanceGroup.Kind.Value(options.instance_kind)
    cfg.instance_group.append(pb.ModelInstanceGroup(kind=kind, count=options.instance_count))
    if options.tensorrt and options.instance_kind == "KIND_GPU":
        trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters["precision_mode"] = "FP16" if options.tensorrt_fp16 else "FP32"
        trt.parameters["max_workspace_size_bytes"] = str(options.workspace_bytes)
    if options.warmup:
        # the largest batch first, then one image: TensorRT widens its shape profile to both
        for batch in sorted({options.max_batch_size, 1}, reverse=True):
            warm = cfg.model_warmup.add(name=f"zeros_batch_{batch}", batch_size=batch)
            warm.inputs[spec.input_name].CopyFrom(
                pb.ModelWarmup.Input(data_type=pb.TYPE_UINT8, dims=[*spec.input_size, 3], zero_data=True)
            )
    cfg.parameters[SPEC_PARAMETER].string_value = json.dumps(spec.to_dict(), sort_keys=True)
    return cfg


def write_triton_repository(
    out_dir: str | os.PathLike[str],
    spec: ModelSpec,
    onnx_file: str | os.PathLike[str],
    *,
    max_batch_size: int = 64,
    preferred_batch_sizes: Sequence[int] = (8, 16, 32, 64),
    max_queue_delay_us: int = 2000,
    instance_kind: str = "KIND_GPU",
    instance_count: int = 1,
    tensorrt: bool = True,
    tensorrt_fp16: bool = True,
    workspace_bytes: int = 1 << 30,
    warmup: bool = True,
) -> Path:
    """Write `<out_dir>/triton/<name>/{config.pbtxt, <version>/model.onnx}`; returns the config path.

    `onnx_file` is hard-linked when it can be (same file system), else copied.
    """
    options = TritonOptions(
        max_batch_size=max_batch_size,
        preferred_batch_sizes=tuple(preferred_batch_sizes),
        max_queue_delay_us=max_queue_delay_us,
        instance_kind=instance_kind,
        instance_count=instance_count,
        tensorrt=tensorrt,
        tensorrt_fp16=tensorrt_fp16,
        workspace_bytes=workspace_bytes,
        warmup=warmup,
    )
    return write_triton_repository_from(out_dir, spec, onnx_file, options)


def write_triton_repository_from(
    out_dir: str | os.PathLike[str], spec: ModelSpec, onnx_file: str | os.PathLike[str], options: TritonOptions
) -> Path:
    from google.protobuf import text_format

    model_dir = Path(out_dir) / TRITON_DIR / spec.name
    version_dir = model_dir / str(spec.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    target = version_dir / MODEL_ONNX
    target.unlink(missing_ok=True)
    try:
        os.link(onnx_file, target)
    except OSError:
        shutil.copyfile(onnx_file, target)
    config_path = model_dir / CONFIG_PBTXT
    config_path.write_text(text_format.MessageToString(build_model_config(spec, options)))
    log.info("wrote Triton model %s (%s, max batch %d)", config_path, options.instance_kind, options.max_batch_size)
    return config_path
