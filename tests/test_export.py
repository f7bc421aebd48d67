"""Exported model directories: parity figures, dynamic batch, no projection head, Triton config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from export_checkpoints import make_checkpoint
from google.protobuf import text_format
from onnx import numpy_helper
from tritonclient.grpc import model_config_pb2 as pb

from embed.spec import MODEL_FP16_ONNX, MODEL_JSON, MODEL_ONNX, ModelSpec
from export import ExportError, export_model, write_triton_repository
from export.errors import VerificationError
from export.exporter import load_encoder
from export.triton_repo import SPEC_PARAMETER
from export.verify import FP16_TOLERANCE, Tolerance

DATA = Path(__file__).parent / "data"
VERIFY = [DATA / "cifar10-sample" / "test", DATA / "messy"]

# (arch, width, exporter, fp16): the default dynamo exporter on the small CNN, the TorchScript
# exporter on a ResNet-18 with the CIFAR stem and its FP16 variant (dynamo is the slow one here)
CASES = {
    "smallcnn": ("smallcnn", 0.25, "dynamo", False),
    "resnet18": ("resnet18", 0.25, "torchscript", True),
}


@pytest.fixture(scope="module", params=list(CASES))
def exported(request, tmp_path_factory) -> tuple[Path, Path, torch.nn.Module]:
    arch, width, exporter, fp16 = CASES[request.param]
    root = tmp_path_factory.mktemp(f"export-{arch}")
    ckpt = make_checkpoint(root / "ckpt.pt", arch=arch, width=width, seed=1)
    export_model(ckpt, root / "model", exporter=exporter, fp16=fp16, verify_images=VERIFY, verify_limit=24)
    encoder, _ = load_encoder(ckpt)
    return ckpt, root / "model", encoder


def _reference(ckpt: Path, encoder: torch.nn.Module, images: np.ndarray) -> np.ndarray:
    config = torch.load(ckpt, weights_only=True)["config"]
    mean = torch.tensor(config["data"]["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["data"]["std"]).view(1, 3, 1, 1)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        return torch.nn.functional.normalize(encoder(x), dim=1).numpy()


def test_parity_figures_recorded_and_within_bounds(exported) -> None:
    ckpt, model_dir, encoder = exported
    spec = ModelSpec.load(model_dir)
    fp32 = spec.parity["fp32"]
    assert fp32["worst_cosine"] >= 0.9999 and fp32["max_abs_diff"] <= 1e-4
    assert fp32["worst_cosine"] <= fp32["mean_cosine"] <= 1 + 1e-9
    # real images from both folders, odd sizes from messy/ included, plus the synthetic ones
    assert spec.parity["images"]["real"] > 12 and fp32["n_images"] == spec.parity["images"]["real"] + 4
    assert (model_dir / MODEL_FP16_ONNX).exists() == ("fp16" in spec.parity)
    assert spec.extra["exporter"]["fp32"] == CASES[spec.training_config["model"]["arch"]][2]
    if (model_dir / MODEL_FP16_ONNX).exists():
        fp16 = spec.parity["fp16"]
        assert FP16_TOLERANCE.min_cosine <= fp16["worst_cosine"] < 1.0
        assert fp16["max_abs_diff"] <= FP16_TOLERANCE.max_abs_diff
    import hashlib

    assert spec.checkpoint_sha256 == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert spec.extra["files_sha256"][MODEL_ONNX] == hashlib.sha256((model_dir / MODEL_ONNX).read_bytes()).hexdigest()
    assert spec.training_config["model"]["arch"] == spec.name.removeprefix("simclr-")
    assert spec.resize_mode == "shorter_side_center_crop" and spec.resize_size == spec.input_height == 32


@pytest.mark.parametrize("n", [1, 7, 64])
def test_dynamic_batch(exported, n: int) -> None:
    ckpt, model_dir, encoder = exported
    spec = ModelSpec.load(model_dir)
    images = np.random.default_rng(n).integers(0, 256, (n, *spec.input_size, 3), dtype=np.uint8)
    for filename, atol in ((MODEL_ONNX, 1e-4), (MODEL_FP16_ONNX, 5e-3)):
        if not (model_dir / filename).exists():
            continue
        sess = ort.InferenceSession(str(model_dir / filename), providers=["CPUExecutionProvider"])
        out = sess.run([spec.output_name], {spec.input_name: images})[0]
        assert out.shape == (n, spec.embedding_dim) and out.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-3)
        np.testing.assert_allclose(out, _reference(ckpt, encoder, images), atol=atol)


def test_projection_head_is_absent(exported) -> None:
    ckpt, model_dir, encoder = exported
    head = torch.load(ckpt, weights_only=True)["head"]
    model = onnx.load(str(model_dir / MODEL_ONNX))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert not [n for n in inits if "head" in n or n.startswith("net.")]
    # weight tensors (conv kernels, linear matrices) of the graph are exactly the encoder's:
    # same shapes, same parameter count; BatchNorm may be folded into them, so values are not compared
    graph_weights = sorted(a.shape for a in inits.values() if a.ndim >= 2 and a.shape[0] > 1)
    encoder_weights = sorted(tuple(p.shape) for p in encoder.parameters() if p.ndim >= 2)
    assert graph_weights == encoder_weights
    assert sum(int(np.prod(s)) for s in graph_weights) == sum(p.numel() for p in encoder.parameters() if p.ndim >= 2)
    head_shapes = {tuple(t.shape) for t in head.values() if t.ndim == 2}
    assert head_shapes and not head_shapes & {tuple(s) for s in graph_weights if len(s) == 2}


def test_triton_config_matches_onnx_graph(exported) -> None:
    _, model_dir, _ = exported
    spec = ModelSpec.load(model_dir)
    text = (model_dir / "triton" / spec.name / "config.pbtxt").read_text()
    cfg = text_format.Parse(text, pb.ModelConfig())
    graph = onnx.load(str(model_dir / MODEL_ONNX)).graph
    (gin,), (gout,) = graph.input, graph.output
    gdims = lambda v: [d.dim_value or -1 for d in v.type.tensor_type.shape.dim]  # noqa: E731
    assert cfg.name == spec.name and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 64
    (cin,), (cout,) = cfg.input, cfg.output
    assert (cin.name, cout.name) == (gin.name, gout.name) == (spec.input_name, spec.output_name)
    assert cin.data_type == pb.TYPE_UINT8 and gin.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert cout.data_type == pb.TYPE_FP32 and gout.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    # the batch dimension is dynamic in the graph and implicit in Triton (max_batch_size > 0)
    assert gdims(gin)[0] == -1 and gdims(gout)[0] == -1
    assert list(cin.dims) == gdims(gin)[1:] == [32, 32, 3]
    assert list(cout.dims) == gdims(gout)[1:] == [spec.embedding_dim]
    assert list(cfg.dynamic_batching.preferred_batch_size) == [8, 16, 32, 64]
    assert cfg.dynamic_batching.max_queue_delay_microseconds == 2000
    assert [g.kind for g in cfg.instance_group] == [pb.ModelInstanceGroup.KIND_GPU]
    (trt,) = cfg.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert int(trt.parameters["max_workspace_size_bytes"]) == 1 << 30
    assert {w.batch_size for w in cfg.model_warmup} == {1, 64}
    assert all(w.inputs[spec.input_name].zero_data for w in cfg.model_warmup)
    served = ModelSpec.from_dict(json.loads(cfg.parameters[SPEC_PARAMETER].string_value))
    assert served == spec
    onnx_copy = model_dir / "triton" / spec.name / str(spec.version) / MODEL_ONNX
    assert onnx_copy.read_bytes() == (model_dir / MODEL_ONNX).read_bytes()


def test_triton_cpu_and_no_tensorrt(exported, tmp_path) -> None:
    _, model_dir, _ = exported
    spec = ModelSpec.load(model_dir)
    for kind, trt in (("KIND_CPU", True), ("KIND_GPU", False)):
        path = write_triton_repository(tmp_path / kind, spec, model_dir / MODEL_ONNX, instance_kind=kind,
                                       tensorrt=trt, max_batch_size=16, preferred_batch_sizes=(4, 16), warmup=False)
        cfg = text_format.Parse(path.read_text(), pb.ModelConfig())
        assert cfg.instance_group[0].kind == pb.ModelInstanceGroup.Kind.Value(kind)
        assert not cfg.HasField("optimization") and not cfg.model_warmup
        assert cfg.max_batch_size == 16 and list(cfg.dynamic_batching.preferred_batch_size) == [4, 16]
    with pytest.raises(ExportError, match="outside 1..max_batch_size"):
        write_triton_repository(tmp_path / "bad", spec, model_dir / MODEL_ONNX, max_batch_size=8)


def test_failed_verification_keeps_the_old_model(tmp_path) -> None:
    ckpt = make_checkpoint(tmp_path / "a.pt", seed=3)
    out = tmp_path / "model"
    export_model(ckpt, out, exporter="torchscript", triton=None, verify_images=VERIFY, verify_limit=8)
    before = (out / MODEL_JSON).read_text()
    impossible = Tolerance(min_cosine=1.5, max_abs_diff=1.0)
    with pytest.raises(VerificationError, match="worst cosine"):
        export_model(make_checkpoint(tmp_path / "b.pt", seed=4), out, exporter="torchscript", triton=None,
                     fp32_tolerance=impossible, verify_images=VERIFY, verify_limit=8)
    assert (out / MODEL_JSON).read_text() == before
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_dynamo_failure_falls_back_to_torchscript(tmp_path, monkeypatch) -> None:
    import export.graph

    def broken(*args, **kwargs):
        raise RuntimeError("simulated exporter failure")

    monkeypatch.setattr(export.graph, "_export_dynamo", broken)
    spec = export_model(make_checkpoint(tmp_path / "c.pt"), tmp_path / "m", triton=None, verify_images=VERIFY,
                        verify_limit=8)
    assert spec.extra["exporter"] == {"fp32": "torchscript"} and spec.parity["fp32"]["worst_cosine"] >= 0.9999


def test_graph_check_rejects_a_graph_that_breaks_the_contract(model_dir: Path) -> None:
    import dataclasses

    from export.verify import check_graph

    spec = ModelSpec.load(model_dir)
    check_graph(model_dir / MODEL_ONNX, spec)
    for wrong in ({"embedding_dim": spec.embedding_dim + 1}, {"input_height": 64}, {"output_name": "features"}):
        with pytest.raises(VerificationError):
            check_graph(model_dir / MODEL_ONNX, dataclasses.replace(spec, **wrong))
