"""`simsearch triton`: serve an exported model directory with a real Triton server on the CPU.

For machines without Docker or a GPU. The `tritonserver` binary bundled by `nvidia-pytriton`
carries only the Python backend, so the model repository written here holds ONE model, named
like the exported one, whose `model.py` (tritonlocal/python_model.py) runs the directory's
`model.onnx` with ONNX Runtime. Everything a client sees is what the GPU deployment shows: the
same KServe v2 protocol and ports, the same model name, input/output names, dtypes, dims,
max_batch_size, dynamic batching and the `simsearch_model_json` parameter (all copied from the
export's triton/<name>/config.pbtxt). So `serve --backend triton` and
`index build --triton-url ...` work against it unchanged.

Library use (tests, the demo):

    with start_local_triton("model/", http_port=8000, grpc_port=8001, metrics_port=8002) as triton:
        ...  # triton.grpc_url, triton.http_url; triton.stop() / triton.start() to restart
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from embed.spec import MODEL_JSON, TRITON_DIR, ModelDirError, ModelSpec, onnx_path

log = logging.getLogger(__name__)

MODEL_PY = Path(__file__).with_name("python_model.py")
# Python-backend shared memory per model instance; the same small figures pytriton uses.
SHM_DEFAULT_BYTES = 4 * 1024 * 1024
SHM_GROWTH_BYTES = 1024 * 1024


class LocalTritonError(RuntimeError):
    """The bundled Triton server is missing, failed to start or did not become ready."""


@dataclass(frozen=True)
class LocalTritonConfig:
    model_dir: str
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instance_count: int = 1
    intra_op_threads: int = 0
    startup_timeout_s: float = 120.0
    work_dir: str | None = None  # None: a fresh temporary directory, removed by close()
    log_verbose: int = 0


def _pytriton_dist() -> tuple[Path, Path]:
    """(tritonserver distribution dir, external libs dir) of the installed nvidia-pytriton."""
    found = importlib.util.find_spec("pytriton")
    if found is None or not found.submodule_search_locations:
        raise LocalTritonError(
            "nvidia-pytriton is not installed; it bundles the tritonserver binary: pip install '.[triton]'"
        )
    root = Path(next(iter(found.submodule_search_locations)))
    dist = root / "tritonserver"
    libs = root.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():  # editable install of pytriton
        libs = dist / "external_libs"
    if not (dist / "bin" / "tritonserver").is_file():
        raise LocalTritonError(f"no tritonserver binary under {dist}")
    return dist, libs


def _model_config_proto(model_dir: Path, spec: ModelSpec):  # -> model_config_pb2.ModelConfig
    """The export's config.pbtxt as a proto; a default one (batch 64, dynamic batching) if absent."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    config = model_config_pb2.ModelConfig()
    path = model_dir / TRITON_DIR / spec.name / "config.pbtxt"
    if path.is_file():
        text_format.Parse(path.read_text(), config)
        return config
    log.warning("%s is missing; serving with max_batch_size 64 and default dynamic batching", path)
    config.name = spec.name
    config.max_batch_size = 64
    config.input.add(name=spec.input_name, data_type=model_config_pb2.TYPE_UINT8,
                     dims=[spec.input_height, spec.input_width, 3])
    config.output.add(name=spec.output_name, data_type=model_config_pb2.TYPE_FP32, dims=[spec.embedding_dim])
    config.dynamic_batching.SetInParent()
    config.parameters["simsearch_model_json"].string_value = (model_dir / MODEL_JSON).read_text()
    return config


def write_local_repository(
    model_dir: str | os.PathLike[str], repo_dir: str | os.PathLike[str], *, instance_count: int = 1,
    intra_op_threads: int = 0,
) -> str:
    """Write a Python-backend Triton repository serving `model_dir`; returns the model name."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    model_dir, repo_dir = Path(model_dir).resolve(), Path(repo_dir)
    spec = ModelSpec.load(model_dir)
    onnx_file = onnx_path(model_dir)
    config = _model_config_proto(model_dir, spec)
    config.platform = ""
    config.backend = "python"
    config.default_model_filename = ""
    config.ClearField("optimization")  # the TensorRT accelerator is for the GPU image
    config.ClearField("model_warmup")  # warm-up builds TensorRT engines; on the CPU it only delays start-up
    del config.instance_group[:]
    config.instance_group.add(count=instance_count, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    config.parameters["onnx_model_path"].string_value = str(onnx_file)
    config.parameters["intra_op_threads"].string_value = str(intra_op_threads)
    version_dir = repo_dir / config.name / str(spec.version)
    version_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(MODEL_PY, version_dir / "model.py")
    (repo_dir / config.name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return config.name


def _prepare_backends(dist: Path, work_dir: Path) -> Path:
    """A backend directory whose Python backend has the stub built for this interpreter."""
    backends = work_dir / "backends"
    if not backends.exists():
        shutil.copytree(dist / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
        if not stub.is_file():
            found = sorted(p.name for p in (dist / "python_backend_stubs").iterdir())
            raise LocalTritonError(f"no Python-backend stub for Python {version}; the bundle has {found}")
        shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    return backends


def _server_env(libs: Path) -> dict[str, str]:
    env = dict(os.environ)
    # The stub embeds this interpreter: its libpython first, then the bundle's own libraries.
    lib_dirs = [str(sysconfig.get_config_var("LIBDIR") or ""), str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(d for d in lib_dirs if d)
    # The stub finds its Python (and so this environment's onnxruntime, numpy) through PATH.
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _die_with_parent() -> Callable[[], None] | None:
    """Linux: SIGINT the server when this process dies, even by SIGKILL (no orphan holding the ports).

    The kernel ties this to the *thread* that started the server, so it is only used from the
    main thread, which lives as long as the process.
    """
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child only calls it
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1
    return lambda: prctl(pr_set_pdeathsig, signal.SIGINT)


class LocalTriton:
    """A bundled `tritonserver` process serving one model directory; start() / stop() / close()."""

    def __init__(self, config: LocalTritonConfig) -> None:
        self.config = config
        self._dist, self._libs = _pytriton_dist()
        self._own_work_dir = config.work_dir is None
        self.work_dir = Path(config.work_dir or tempfile.mkdtemp(prefix="simsearch-triton-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        try:
            self.model_name = write_local_repository(
                config.model_dir, self.work_dir / "repository",
                instance_count=config.instance_count, intra_op_threads=config.intra_op_threads,
            )
            self._backends = _prepare_backends(self._dist, self.work_dir)
        except BaseException:
            if self._own_work_dir:
                shutil.rmtree(self.work_dir, ignore_errors=True)
            raise
        self.log_path = self.work_dir / "tritonserver.log"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    def command(self) -> list[str]:
        c = self.config
        shm_prefix = f"simsearch{os.getpid()}-{os.urandom(4).hex()}"
        return [
            str(self._dist / "bin" / "tritonserver"),
            f"--model-repository={self.work_dir / 'repository'}",
            f"--backend-directory={self._backends}",
            f"--cache-directory={self._dist / 'caches'}",
            f"--http-address={c.host}", f"--http-port={c.http_port}",
            f"--grpc-address={c.host}", f"--grpc-port={c.grpc_port}",
            f"--metrics-address={c.host}", f"--metrics-port={c.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--backend-config=python,shm-region-prefix-name={shm_prefix}",
            f"--backend-config=python,shm-default-byte-size={SHM_DEFAULT_BYTES}",
            f"--backend-config=python,shm-growth-byte-size={SHM_GROWTH_BYTES}",
            "--exit-on-error=true", "--strict-readiness=true", "--exit-timeout-secs=10",
            f"--log-verbose={c.log_verbose}",
        ]

    def start(self) -> LocalTriton:
        """Start the server and wait until /v2/health/ready and /metrics answer 200."""
        if self.running():
            return self
        with open(self.log_path, "ab") as out:
            # Its own session: stop() can then end the server and its backend stubs as a group.
            self.process = subprocess.Popen(
                self.command(), stdout=out, stderr=subprocess.STDOUT, env=_server_env(self._libs),
                start_new_session=True, preexec_fn=_die_with_parent(),
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        log.info("Triton ready: model %r, HTTP %s, gRPC %s, metrics %s",
                 self.model_name, self.http_url, self.grpc_url, self.metrics_url)
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.config.startup_timeout_s
        # the metrics service starts after the HTTP one: wait for both before announcing them
        waiting = [f"{self.http_url}/v2/health/ready", self.metrics_url]
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise LocalTritonError(
                    f"tritonserver exited with status {self.process.returncode}:\n{self.log_tail()}"
                )
            try:
                with urllib.request.urlopen(waiting[0], timeout=1.0) as response:
                    if response.status == 200:
                        waiting.pop(0)
                        if not waiting:
                            return
                        continue
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise LocalTritonError(
            f"tritonserver not ready after {self.config.startup_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        """Graceful shutdown (SIGINT), then SIGKILL to the server's process group after timeout_s."""
        process, self.process = self.process, None
        if process is None:
            return
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("tritonserver did not stop in %.0f s; killing it", timeout_s)
        # The unreaped server keeps its group id reserved, so this cannot hit a stranger.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)  # leftover backend stubs, if any
        process.wait()

    def close(self) -> None:
        self.stop()
        if self._own_work_dir:
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def __enter__(self) -> LocalTriton:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_local_triton(
    model_dir: str | os.PathLike[str], *, http_port: int = 8000, grpc_port: int = 8001,
    metrics_port: int = 8002, host: str = "127.0.0.1", **kwargs: object,
) -> LocalTriton:
    """Write the repository, start the server and return the running handle (close() it)."""
    config = LocalTritonConfig(
        model_dir=str(model_dir), host=host, http_port=http_port, grpc_port=grpc_port,
        metrics_port=metrics_port, **kwargs,  # type: ignore[arg-type]
    )
    triton = LocalTriton(config)
    try:
        return triton.start()
    except BaseException:
        triton.close()
        raise


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simsearch triton", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="exported model directory (model.onnx, model.json, triton/)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8000, help="KServe v2 HTTP port")
    p.add_argument("--grpc-port", type=int, default=8001, help="KServe v2 gRPC port")
    p.add_argument("--metrics-port", type=int, default=8002, help="Prometheus metrics port")
    p.add_argument("--instances", type=int, default=1, help="model instances (parallel ONNX Runtime sessions)")
    p.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads per instance (0: all cores)")
    p.add_argument("--work-dir", default=None, help="where the repository and server log go (None: a temporary directory)")
    p.add_argument("--startup-timeout", type=float, default=120.0, help="seconds to wait for readiness")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver --log-verbose level")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        with start_local_triton(
            args.model, http_port=args.http_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
            host=args.host, instance_count=args.instances, intra_op_threads=args.threads,
            work_dir=args.work_dir, startup_timeout_s=args.startup_timeout, log_verbose=args.log_verbose,
        ) as triton:
            log.info("server log: %s; Ctrl-C to stop", triton.log_path)
            while not stop.wait(1.0):
                if not triton.running():
                    log.error("tritonserver exited:\n%s", triton.log_tail())
                    return 1
            log.info("stopping tritonserver")
    except (LocalTritonError, ModelDirError) as e:
        log.error("%s", e)
        return 2 if isinstance(e, ModelDirError) else 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
