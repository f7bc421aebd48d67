"""`simsearch triton` (tritonlocal/launcher.py) and TritonBackend's own checks.

The repository written for the bundled tritonserver copies the export's model config; the
command starts a real server, answers health checks and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed")

from embed.backends import BackendError  # noqa: E402
from embed.spec import ModelSpec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def test_local_repository_copies_the_export_config(model_dir: Path, tmp_path: Path) -> None:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    from tritonlocal.launcher import write_local_repository

    spec = ModelSpec.load(model_dir)
    name = write_local_repository(model_dir, tmp_path / "repo", instance_count=2, intra_op_threads=3)
    assert name == spec.name
    config = model_config_pb2.ModelConfig()
    text_format.Parse((tmp_path / "repo" / name / "config.pbtxt").read_text(), config)
    assert config.backend == "python" and not config.platform
    assert (tmp_path / "repo" / name / str(spec.version) / "model.py").is_file()
    assert [(g.kind, g.count) for g in config.instance_group] == [(model_config_pb2.ModelInstanceGroup.KIND_CPU, 2)]
    assert Path(config.parameters["onnx_model_path"].string_value) == (model_dir / "model.onnx").resolve()
    assert config.parameters["intra_op_threads"].string_value == "3"
    assert ModelSpec.from_dict(json.loads(config.parameters["simsearch_model_json"].string_value)) == spec
    assert [i.name for i in config.input] == [spec.input_name]
    assert list(config.input[0].dims) == [spec.input_height, spec.input_width, 3]
    assert list(config.output[0].dims) == [spec.embedding_dim]


@pytest.mark.slow
def test_cli_serves_until_sigterm(model_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("pytriton", reason="nvidia-pytriton (the bundled tritonserver) is not installed")
    http, grpc, metrics = _free_ports(3)
    work = tmp_path / "work"
    process = subprocess.Popen(
        [sys.executable, "-m", "simsearch.cli", "triton", "--model", str(model_dir), "--http-port", str(http),
         "--grpc-port", str(grpc), "--metrics-port", str(metrics), "--threads", "1", "--work-dir", str(work)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        deadline = time.monotonic() + 90
        # the metrics service starts after the HTTP one: wait for both
        waiting = [f"http://127.0.0.1:{http}/v2/health/ready", f"http://127.0.0.1:{metrics}/metrics"]
        while waiting and time.monotonic() < deadline and process.poll() is None:
            try:
                with urllib.request.urlopen(waiting[0], timeout=1) as r:
                    if r.status == 200:
                        waiting.pop(0)
                        continue
            except OSError:
                pass
            time.sleep(0.3)
        assert not waiting, (work / "tritonserver.log").read_text() if (work / "tritonserver.log").exists() else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as r:
            assert b"nv_inference_request_success" in r.read()
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 0, out
    assert f"HTTP http://127.0.0.1:{http}" in out and f"gRPC 127.0.0.1:{grpc}" in out
    assert "Started GRPCInferenceService" in (work / "tritonserver.log").read_text()
    with pytest.raises(OSError):  # nothing listens any more
        urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/live", timeout=2)


def test_backend_rejects_unknown_protocol() -> None:
    from embed.backends.triton import TritonBackend

    with pytest.raises(ValueError, match=r"not one of \('grpc', 'http'\)"):
        TritonBackend("localhost:8001", protocol="websocket")


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_backend_reports_an_unreachable_server(protocol: str) -> None:
    from embed.backends.triton import TritonBackend

    (port,) = _free_ports(1)  # nothing listens there
    with pytest.raises(BackendError, match=f"Triton at 127.0.0.1:{port} \\({protocol}\\)"):
        TritonBackend(f"127.0.0.1:{port}", protocol=protocol, timeout_s=5)


def test_cli_reports_a_missing_model_dir(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from tritonlocal.launcher import main

    before = set(Path(tempfile.gettempdir()).glob("simsearch-triton-*"))
    assert main(["--model", str(tmp_path), "--http-port", "1"]) == 2
    assert "model.json is missing" in caplog.text
    assert set(Path(tempfile.gettempdir()).glob("simsearch-triton-*")) == before  # no work dir left behind
