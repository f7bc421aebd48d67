"""A real two-node Ray cluster on this machine for the tests: `ray start --head` plus a second
`ray start --address ...` node with its own resources (separate raylet processes, object stores and
workers), each with its own ports, under a temporary directory of its own.

`stop()` kills exactly this cluster's processes: every process whose command line names the
cluster's temporary directory (GCS, raylets, dashboard, log monitors; Ray puts the session
directory in their arguments) and all their descendants (the workers), by PID. `ray stop` is
not used: it kills every Ray process of the machine, another cluster's too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from serverkit import free_port

RAY = str(Path(sys.executable).with_name("ray"))

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None or importlib.util.find_spec("pyarrow") is None,
                               reason="needs the `ray` extra (pip install -e '.[ray]'; make test installs it)")


def index_vectors(out: Path) -> dict[str, np.ndarray]:
    """Path -> vector of every item of the index at `out` (checking that FAISS and the rows agree)."""
    from index.store import ImageIndex

    with ImageIndex.open(out) as ix:
        recs = ix.records()
        assert len(ix) == len(recs) == len({r.path for r in recs})
        return {r.path: ix.vector(r.id) for r in recs}


def assert_same_index(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    """The same paths, each with the same vector (cos >= 0.9999): a --ray build against a plain one."""
    assert sorted(got) == sorted(want)
    a = np.stack([got[p] for p in sorted(want)])
    b = np.stack([want[p] for p in sorted(want)])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() >= 0.9999, sorted(want)[int(cos.argmin())]


def ray_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "SIMSEARCH_"))}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # a throw-away cluster on loopback: no token, so nothing depends on ~/.ray/auth_token
    env["RAY_AUTH_MODE"] = "disabled"
    return env


class LocalRayCluster:
    def __init__(self, head_cpus: int = 1, worker_cpus: int = 1, worker_resources: dict[str, float] | None = None) -> None:
        # short: Ray's Unix socket paths live under it and must stay below 108 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.head_cpus, self.worker_cpus = head_cpus, worker_cpus
        self.worker_resources = worker_resources or {"worker2": 1}
        self.address = f"127.0.0.1:{self.port}"
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"

    def _ray_start(self, *args: str) -> None:
        log = self.temp_dir / "ray-start.log"
        with open(log, "ab") as out:
            rc = subprocess.run([RAY, "start", "--disable-usage-stats", "--dashboard-agent-listen-port",
                                 str(free_port()), "--ray-client-server-port", str(free_port()), *args],
                                env=ray_env(), stdout=out, stderr=subprocess.STDOUT, timeout=300).returncode
        if rc != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed ({rc}):\n{log.read_text()[-3000:]}")

    def start(self) -> LocalRayCluster:
        try:
            self._ray_start("--head", "--port", str(self.port), "--num-cpus", str(self.head_cpus),
                            "--temp-dir", str(self.temp_dir), "--include-dashboard", "true",
                            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(self.dashboard_port))
            self._ray_start("--address", self.address, "--num-cpus", str(self.worker_cpus),
                            "--resources", json.dumps(self.worker_resources))
            self.wait_for_nodes(2)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_for_nodes(self, n: int, timeout_s: float = 120.0) -> None:
        from ray.util.state import list_nodes

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                alive = [x for x in list_nodes(address=self.dashboard_url) if x.state == "ALIVE"]
                if len(alive) >= n:
                    return
            except Exception:  # the dashboard is still starting
                alive = []
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(alive)} of {n} Ray nodes alive after {timeout_s} s")
            time.sleep(1.0)

    def actors(self, class_part: str, state: str | None = None) -> list:
        """This cluster's actors whose class name contains `class_part` (Ray's state API)."""
        from ray.util.state import list_actors

        filters = [("state", "=", state)] if state else None
        found = list_actors(address=self.dashboard_url, filters=filters, detail=True, limit=1000,
                            raise_on_missing_output=False)
        return [a for a in found if class_part in a.class_name]

    def _pids(self) -> set[int]:
        tag = str(self.temp_dir)
        me = {os.getpid(), os.getppid()}
        parents: dict[int, int] = {}
        mine: set[int] = set()
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue
            parents[pid] = int(stat.rsplit(")", 1)[1].split()[1])
            if tag in cmdline and pid not in me:
                mine.add(pid)
        grown = True
        while grown:  # workers (titled ray::...) name no directory: take every descendant
            more = {pid for pid, parent in parents.items() if parent in mine} - mine - me
            mine |= more
            grown = bool(more)
        return mine

    def stop(self) -> None:
        for _ in range(3):  # a process started while we were killing: look again
            pids = self._pids()
            if not pids:
                break
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
