"""checkpoint -> verified model directory: the steps of `simsearch export`, top to bottom."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from embed.spec import MODEL_FP16_ONNX, MODEL_ONNX, ModelSpec, compute_fingerprint, sha256_file
from export import publish
from export.errors import ExportError
from export.graph import DEFAULT_OPSET, ExportableEncoder, export_onnx
from export.triton_repo import TritonOptions, write_triton_repository_from
from export.verify import (
    FP16_TOLERANCE,
    FP32_TOLERANCE,
    Tolerance,
    list_images,
    load_images,
    synthetic_images,
    torch_reference,
    verify_onnx,
)

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# config entries that may name image folders: the default verification images when none are given
# (the first that exists here): the training folder, then the kNN monitor's folders
IMAGE_DIR_KEYS = (("data", "folder"), ("train", "val_train"), ("train", "val_test"))


@dataclass(frozen=True)
class ExportConfig:
    name: str | None = None  # None: "simclr-<arch>"
    version: int = 1
    fp16: bool = False
    opset: int = DEFAULT_OPSET
    exporter: str = "dynamo"
    verify_images: tuple[str, ...] = ()  # files or folders; empty: a folder named in the training config (required)
    verify_limit: int = 64
    fp32_tolerance: Tolerance = FP32_TOLERANCE
    fp16_tolerance: Tolerance = FP16_TOLERANCE
    triton: TritonOptions | None = field(default_factory=TritonOptions)  # None: no triton/ folder


def load_encoder(checkpoint: str | os.PathLike[str]) -> tuple[nn.Module, dict[str, Any]]:
    """The checkpoint's encoder (eval mode, head left behind) and its training config."""
    from pretrain.checkpoint import CheckpointError, load_checkpoint
    from pretrain.models import ModelConfig, build_encoder

    try:
        ckpt = load_checkpoint(checkpoint)
    except CheckpointError as e:
        raise ExportError(str(e)) from None
    config = ckpt["config"]
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict) or not isinstance(config.get("data"), dict):
        raise ExportError(f"{checkpoint}: checkpoint config lacks the 'model' and 'data' sections")
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(config["model"]) - fields)
    if unknown:
        raise ExportError(f"{checkpoint}: unknown model config keys {unknown}; expected some of {sorted(fields)}")
    try:
        encoder = build_encoder(ModelConfig(**config["model"]))
    except ValueError as e:
        raise ExportError(f"{checkpoint}: {e}") from None
    state = ckpt["encoder"]
    for prefix in ("module.", "_orig_mod."):  # DDP / torch.compile wrappers, should one slip through
        if state and all(k.startswith(prefix) for k in state):
            state = {k.removeprefix(prefix): v for k, v in state.items()}
    try:
        encoder.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ExportError(f"{checkpoint}: encoder weights do not fit the {config['model'].get('arch')} "
                          f"architecture in its config ({str(e).splitlines()[0]})") from None
    return encoder.eval(), config


def build_spec(config: dict[str, Any], encoder: nn.Module, checkpoint: Path, cfg: ExportConfig) -> ModelSpec:
    data = config["data"]
    try:
        size = int(data["image_size"])
        mean, std = tuple(float(v) for v in data["mean"]), tuple(float(v) for v in data["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise ExportError(f"{checkpoint}: config['data'] needs image_size, mean and std ({e!r})") from None
    if len(mean) != 3 or len(std) != 3:
        raise ExportError(f"{checkpoint}: mean and std need 3 values each, got {mean} and {std}")
    name = cfg.name or f"simclr-{config['model']['arch']}"
    if not NAME_RE.match(name):
        raise ExportError(f"model name {name!r} must match {NAME_RE.pattern} (it names a Triton model)")
    if cfg.version < 1:
        raise ExportError(f"version must be >= 1, got {cfg.version}")
    from pretrain.data import training_rule

    rule = training_rule(size)  # the pixels pretraining and `eval` saw: every consumer applies it from model.json
    return ModelSpec(
        name=name,
        version=cfg.version,
        input_height=rule.height,
        input_width=rule.width,
        embedding_dim=int(encoder.feature_dim),
        resize_mode=rule.mode,
        resize_size=rule.resize_size,
        interpolation=rule.interpolation,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        checkpoint_sha256=sha256_file(checkpoint),
        training_config=json.loads(json.dumps(config, default=str)),
    )


def verification_sources(config: dict[str, Any], cfg: ExportConfig) -> list[str]:
    """`verify_images`, else the first image folder the training config names that exists here."""
    if cfg.verify_images:
        return list(cfg.verify_images)
    named = [(f"{section}.{key}", s.get(key)) for section, key in IMAGE_DIR_KEYS
             if isinstance(s := config.get(section), dict)]
    named = [(k, v) for k, v in named if isinstance(v, str) and v]
    for _key, folder in named:
        if Path(folder).is_dir():
            return [folder]
    tried = ", ".join(f"{k}={v} (not found)" for k, v in named) or "it names none"
    raise ExportError("no images to verify the export on: the checkpoint's config names no image folder "
                      f"that exists here ({tried}); pass --verify-images FOLDER_OR_FILES")


def verification_set(spec: ModelSpec, config: dict[str, Any], cfg: ExportConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Real images (required: at least one must decode) plus synthetic extras for odd inputs."""
    sources = verification_sources(config, cfg)
    paths = list_images(sources, cfg.verify_limit)
    real, _names, skipped = load_images(paths, spec)
    if not len(real):
        why = f"none of the {len(paths)} image files could be decoded" if paths else "no image files found"
        first = f" (first: {skipped[0][0]}: {' '.join(skipped[0][1].split())})" if skipped else ""  # one line
        raise ExportError(f"no images to verify the export on: {why} in {', '.join(map(str, sources))}{first}; "
                          "pass --verify-images with real images")
    images = np.concatenate([real, synthetic_images(spec)])
    return images, {"real": len(real), "synthetic": len(images) - len(real), "skipped": len(skipped),
                    "sources": sources}


def make_config(**options: Any) -> ExportConfig:
    """An ExportConfig from flat keyword options; TritonOptions fields (max_batch_size, ...) are accepted too."""
    triton_fields = {f.name for f in dataclasses.fields(TritonOptions)}
    triton_kw = {k: options.pop(k) for k in list(options) if k in triton_fields}
    if "triton" in options and triton_kw:
        raise ExportError("pass either triton=TritonOptions(...) or its fields, not both")
    if triton_kw:
        options["triton"] = TritonOptions(**triton_kw)
    if options.get("verify_images") is not None:
        options["verify_images"] = tuple(str(p) for p in options["verify_images"])
    else:
        options.pop("verify_images", None)
    known = {f.name for f in dataclasses.fields(ExportConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ExportError(f"unknown export options {unknown}; choose from {sorted(known | triton_fields)}")
    return ExportConfig(**options)


def export_model(
    checkpoint: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    config: ExportConfig | None = None,
    **options: Any,
) -> ModelSpec:
    """Export `checkpoint`'s encoder to the model directory `out_dir`, replacing it atomically.

    Options are an ExportConfig or its fields as keywords (name, version, fp16, verify_images,
    triton=None for no Triton repository, or TritonOptions fields such as max_batch_size).
    Raises ExportError for a bad checkpoint or option, or a model that fails verification.
    """
    if config is not None and options:
        raise ExportError("pass either an ExportConfig or keyword options, not both")
    cfg = config or make_config(**options)
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    encoder, train_config = load_encoder(checkpoint)
    spec = build_spec(train_config, encoder, checkpoint, cfg)
    staging = publish.staging_dir(out_dir)
    try:
        images, image_info = verification_set(spec, train_config, cfg)
        reference = torch_reference(encoder, images, spec.mean, spec.std)
        parity: dict[str, Any] = {"images": image_info}
        files: dict[str, str] = {}
        variants = [(MODEL_ONNX, torch.float32, cfg.fp32_tolerance, "fp32")]
        if cfg.fp16:
            variants.append((MODEL_FP16_ONNX, torch.float16, cfg.fp16_tolerance, "fp16"))
        exporters = {}
        for filename, dtype, tolerance, key in variants:
            t0 = time.perf_counter()
            wrapper = ExportableEncoder(encoder, spec.mean, spec.std, compute_dtype=dtype)
            exporters[key] = export_onnx(wrapper, staging / filename, image_size=spec.input_size,
                                         opset=cfg.opset, exporter=cfg.exporter)
            t1 = time.perf_counter()
            parity[key] = verify_onnx(staging / filename, spec, images, reference, tolerance)
            parity[key]["export_seconds"] = round(t1 - t0, 3)
            parity[key]["verify_seconds"] = round(time.perf_counter() - t1, 3)
            files[filename] = sha256_file(staging / filename)
        # the fingerprint covers the final model.onnx and the pixel rule (embed/spec.py): an index
        # records it and refuses vectors of any other model
        spec = dataclasses.replace(spec, parity=parity, extra=_extra(encoder, cfg, exporters, files, started),
                                   fingerprint=compute_fingerprint(files[MODEL_ONNX], spec))
        os.chmod(spec.save(staging), 0o644)  # mkstemp makes it 0600; Triton/servers may run as other users
        if cfg.triton is not None:
            write_triton_repository_from(staging, spec, staging / MODEL_ONNX, cfg.triton)
        publish.publish(staging, out_dir)
    except BaseException:
        publish.discard(staging)
        raise
    log.info("exported %s v%d (D=%d) to %s in %.1f s", spec.name, spec.version, spec.embedding_dim,
             out_dir, time.perf_counter() - started)
    return spec


def _extra(encoder: nn.Module, cfg: ExportConfig, exporters: dict[str, str], files: dict[str, str],
           started: float) -> dict[str, Any]:
    import onnx
    import onnxruntime

    return {
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "export_seconds": round(time.perf_counter() - started, 3),
        "opset": cfg.opset,
        "exporter": exporters,
        "files_sha256": files,
        "encoder_parameters": sum(p.numel() for p in encoder.parameters()),
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "export_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
