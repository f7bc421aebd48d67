"""End to end through a real Triton server (the bundled tritonserver, started on loopback ports).

One exported model directory (the shared `model_dir` fixture), one local Triton for the module:
embeddings over gRPC and HTTP agree with in-process ONNX Runtime; a mismatching spec is refused;
`index build --triton-url` and a server search go through Triton; the API's /readyz follows
Triton going away and coming back.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed")

from embed.backends import BackendError  # noqa: E402
from embed.spec import TRITON_DIR, ModelSpec  # noqa: E402
from tritonlocal.launcher import LocalTriton, start_local_triton  # noqa: E402

SAMPLE = Path(__file__).parent / "data" / "cifar10-sample" / "test"
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _images(per_class: int = 2) -> list[Path]:
    return [p for d in sorted(SAMPLE.iterdir()) for p in sorted(d.glob("*.jpg"))[:per_class]]


def _batch(paths: list[Path], spec: ModelSpec) -> np.ndarray:
    from embed.preprocess import load_image_array

    return np.stack([load_image_array(p, spec)[0] for p in paths])


@pytest.fixture(scope="module")
def triton(model_dir: Path) -> Iterator[LocalTriton]:
    http, grpc, metrics = _free_ports(3)
    with start_local_triton(model_dir, http_port=http, grpc_port=grpc, metrics_port=metrics,
                            intra_op_threads=1) as server:
        yield server


def test_served_model_is_the_exported_one(triton: LocalTriton, model_dir: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import InferenceServerClient, model_config_pb2

    spec = ModelSpec.load(model_dir)
    exported = model_config_pb2.ModelConfig()
    text_format.Parse((model_dir / TRITON_DIR / spec.name / "config.pbtxt").read_text(), exported)
    assert exported.name == spec.name == triton.model_name
    client = InferenceServerClient(triton.grpc_url)
    served = client.get_model_config(spec.name).config
    client.close()
    assert served.backend == "python" and exported.platform == "onnxruntime_onnx"
    assert served.max_batch_size == exported.max_batch_size
    assert served.dynamic_batching == exported.dynamic_batching
    assert list(served.input) == list(exported.input) and list(served.output) == list(exported.output)
    served_spec = json.loads(served.parameters["simsearch_model_json"].string_value)
    assert ModelSpec.from_dict(served_spec) == spec


def test_grpc_http_and_onnxruntime_agree(triton: LocalTriton, model_dir: Path) -> None:
    from embed.backends.onnxruntime import OnnxRuntimeBackend
    from embed.backends.triton import TritonBackend

    spec = ModelSpec.load(model_dir)
    batch = _batch(_images(), spec)
    local = OnnxRuntimeBackend(model_dir)
    reference = local.embed(batch)
    local.close()
    # spec=None: recovered from the served config; a small max batch splits the 20 images
    for protocol, url in (("grpc", triton.grpc_url), ("http", triton.http_url)):
        backend = TritonBackend(url, protocol=protocol, max_batch_size=8)
        try:
            assert backend.spec == spec and backend.ready()
            got = backend.embed(batch)
            # the server calls from worker threads (gevent-based HTTP clients are per thread)
            with ThreadPoolExecutor(3) as pool:
                threaded = list(pool.map(lambda b, be=backend: (be.ready(), be.embed(b)), [batch[:5]] * 3))
        finally:
            backend.close()
        assert got.shape == reference.shape and got.dtype == np.float32
        cosine = np.sum(got * reference, axis=1) / (
            np.linalg.norm(got, axis=1) * np.linalg.norm(reference, axis=1)
        )
        assert cosine.min() >= 0.9999, (protocol, cosine.min())
        for ready, vectors in threaded:
            assert ready and np.allclose(vectors, got[:5], atol=1e-6)
        # different images get different vectors (a constant output would also "agree")
        assert np.abs(got[0] - got[1]).max() > 1e-3


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_mismatching_spec_is_refused(
    triton: LocalTriton, model_dir: Path, protocol: str, caplog: pytest.LogCaptureFixture
) -> None:
    from embed.backends.triton import TritonBackend

    spec = ModelSpec.load(model_dir)
    url = triton.grpc_url if protocol == "grpc" else triton.http_url
    wrong = dataclasses.replace(spec, embedding_dim=spec.embedding_dim + 1, input_height=spec.input_height * 2)
    with pytest.raises(BackendError) as err:
        TritonBackend(url, protocol=protocol, spec=wrong)
    message = str(err.value)
    assert f"expected [-1, {spec.embedding_dim + 1}], found [-1, {spec.embedding_dim}]" in message
    assert f"expected [-1, {spec.input_height * 2}, {spec.input_width}, 3]" in message
    with pytest.raises(BackendError, match="not ready"):
        TritonBackend(url, protocol=protocol, model_name="no-such-model")
    # same shapes, another model version: usable, but said out loud
    other = TritonBackend(url, protocol=protocol, spec=dataclasses.replace(spec, version=spec.version + 1))
    other.close()
    assert f"version: given {spec.version + 1}, served {spec.version}" in caplog.text


def test_index_build_and_server_search_through_triton(
    triton: LocalTriton, model_dir: Path, tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from index.cli import main as index_main
    from index.store import ImageIndex
    from server.app import create_app
    from server.settings import Settings

    folder = tmp_path / "images"
    for p in _images(1):
        (folder / p.parent.name).mkdir(parents=True)
        (folder / p.parent.name / p.name).write_bytes(p.read_bytes())
    index_dir = tmp_path / "index"
    summary = tmp_path / "summary.json"
    rc = index_main(["build", str(folder), "--triton-url", triton.grpc_url, "--out", str(index_dir),
                     "--summary", str(summary)])
    assert rc in (0, None)
    assert json.loads(summary.read_text())["added"] == 10
    index = ImageIndex.open(index_dir)
    assert len(index) == 10
    index.close()

    settings = Settings(triton_url=triton.grpc_url, triton_protocol="grpc", index_dir=index_dir)
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["backend"] == "triton"
        query = next(folder.glob("cat/*.jpg"))
        found = client.post("/v1/search", files={"file": (query.name, query.read_bytes(), "image/jpeg")},
                            data={"k": "3"})
        assert found.status_code == 200, found.text
        hits = found.json()["neighbours"]
        assert hits[0]["path"].endswith(f"cat/{query.name}") and hits[0]["score"] > 0.999

        # Triton goes away mid-run: not ready (503); it comes back: ready again.
        triton.stop()
        down = client.get("/readyz")
        assert down.status_code == 503 and down.json()["checks"]["backend"] is False
        triton.start()
        deadline = time.monotonic() + 30
        while (status := client.get("/readyz").status_code) != 200 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert status == 200
        again = client.post("/v1/search", files={"file": (query.name, query.read_bytes(), "image/jpeg")},
                            data={"k": "1"})
        assert again.status_code == 200 and again.json()["neighbours"][0]["path"] == hits[0]["path"]
