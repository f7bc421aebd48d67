from pathlib import Path

from embed.spec import MODEL_JSON, MODEL_ONNX, ModelSpec


def test_model_dir_fixture_is_a_complete_model_directory(model_dir: Path) -> None:
    spec = ModelSpec.load(model_dir)
    assert (model_dir / MODEL_ONNX).is_file()
    assert (model_dir / MODEL_JSON).is_file()
    assert spec.input_size == (32, 32) and spec.embedding_dim == 64
    assert (model_dir / "triton" / spec.name / "config.pbtxt").is_file()
    assert (model_dir / "triton" / spec.name / str(spec.version) / MODEL_ONNX).is_file()
    assert spec.parity["fp32"]["worst_cosine"] >= 0.9999
