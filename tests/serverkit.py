"""Helpers for the server tests: a real `simsearch serve` process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"
CIFAR_TRAIN = sorted((DATA / "cifar10-sample" / "train").glob("*/*.jpg"))
CIFAR_TEST = sorted((DATA / "cifar10-sample" / "test").glob("*/*.jpg"))
MESSY = sorted(p for p in (DATA / "messy").iterdir() if p.name != "README.md")


def wait_until(what: str, predicate, timeout_s: float = 30.0, poll_s: float = 0.05) -> float:  # noqa: ANN001
    """Seconds until `predicate()` held; AssertionError naming `what` when it did not within timeout_s."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(poll_s)
    raise AssertionError(f"not within {timeout_s} s: {what}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """The test process's environment without SIMSEARCH_* settings, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIMSEARCH_")}
    env.update(extra)
    return env


class LiveServer:
    """`python -m simsearch serve ...` in a subprocess; `start()` returns once /readyz says ready."""

    def __init__(self, model_dir: Path, index_dir: Path, log_path: Path, *, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.model_dir, self.index_dir, self.log_path = model_dir, index_dir, log_path
        self.env = clean_env(**(env or {}))
        self.extra_args = extra_args or []
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 60.0) -> LiveServer:
        self.port = free_port()
        cmd = [sys.executable, "-m", "simsearch", "serve", "--model", str(self.model_dir),
               "--index", str(self.index_dir), "--host", "127.0.0.1", "--port", str(self.port),
               "--log-level", "warning", *self.extra_args]
        log = open(self.log_path, "ab")  # noqa: SIM115 (closed by the child's exit)
        self.proc = subprocess.Popen(cmd, cwd=self.index_dir.parent, env=self.env, stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"server not ready after {timeout_s} s: {self.log_path.read_text()[-3000:]}")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (uvicorn's clean shutdown) and wait."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL: a crash, as far as the index is concerned."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.stop()
            finally:
                self.kill()
