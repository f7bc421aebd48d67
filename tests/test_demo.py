"""The main job end to end: `simsearch demo` on a fresh folder, then a search through the live server."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from extras_guard import popen_without, test_only_modules

SAMPLE = Path(__file__).parent / "data" / "cifar10-sample" / "train"
REPO = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _demo(args: list[str], **kw) -> subprocess.Popen:
    """`python -m simsearch demo` as `make demo` installs it: what only `make test` installs
    (pytest, nvidia-pytriton, ...) cannot be imported."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return popen_without(
        test_only_modules(), "simsearch", ["demo", "--no-progress", *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_builds_reuses_and_serves(tmp_path: Path) -> None:
    images = tmp_path / "photos"
    for cls in sorted(p.name for p in SAMPLE.iterdir())[:5]:
        (images / cls).mkdir(parents=True)
        for f in sorted((SAMPLE / cls).iterdir())[:40]:
            shutil.copy(f, images / cls / f.name)
    work = tmp_path / "work"

    first = _demo(["--images", str(images), "--workdir", str(work), "--budget", "8", "--no-serve"])
    out, _ = first.communicate(timeout=300)
    assert first.returncode == 0, out
    assert "[3/4] indexing the folder" in out
    assert "reusing" not in out
    # each step says its result in a line of its own: no JSON dumps, no other INFO chatter
    assert re.search(r"^      \d+ steps \([\d.]+ epochs\), \d+ images/s", out, re.M), out
    assert re.search(r"^      fp32: ONNX Runtime agrees with PyTorch on \d+ of the images", out, re.M), out
    lines = out.splitlines()
    assert not [line for line in lines[:-1] if line.startswith(("INFO ", "{", '  "'))], out
    assert Path(json.loads(lines[-1])["index_dir"]).is_dir()  # --no-serve ends with where things are

    port = _free_port()
    second = _demo(["--images", str(images), "--workdir", str(work), "--port", str(port)], start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert second.poll() is None, second.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the demo server never became ready"
            time.sleep(0.5)

        query = sorted((images / "bird").iterdir())[3]
        r = httpx.post(f"{url}/v1/search", files={"file": query.read_bytes()}, data={"k": "5"}, timeout=30)
        assert r.status_code == 200, r.text
        hits = r.json()["neighbours"]
        assert Path(hits[0]["path"]).name == query.name
        assert hits[0]["score"] > 0.999

        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200 and "<html" in page.text.lower()
    finally:
        os.killpg(second.pid, signal.SIGINT)
        try:
            out, _ = second.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(second.pid, signal.SIGKILL)
            out, _ = second.communicate()
    # the second run rebuilt nothing: same checkpoint and model, an index with nothing to add
    assert out.count("reusing") >= 2, out
    assert f"http://127.0.0.1:{port}/" in out and "curl -F" in out


def test_demo_init_with_a_wrong_file_stops_before_training(tmp_path: Path) -> None:
    """`--init` reaches pretraining's check: a file that is no encoder ends the demo with one line,
    before anything is trained, exported or indexed."""
    bad = tmp_path / "notes.pth"
    bad.write_bytes(b"not a weights file")
    work = tmp_path / "work"
    proc = _demo(["--images", str(SAMPLE), "--workdir", str(work), "--init", str(bad), "--no-serve"])
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out
    errors = [line for line in out.splitlines() if line.startswith("simsearch demo: --init")]
    assert len(errors) == 1 and "not a readable PyTorch weights file" in errors[0], out
    assert not list(work.rglob("last.pt")) and not list(work.rglob("model.onnx"))
