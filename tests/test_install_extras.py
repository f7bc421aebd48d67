"""`make demo` installs only what the demo uses; `make test` adds the rest; each installs once.

The stamps are checked with `make -n` (what make would run) against a throw-away venv path; the
demo's imports with the test-only packages made unimportable (tests/extras_guard.py). The whole
demo runs that way in tests/test_demo.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from extras_guard import ROOT, makefile_extras, run_without, test_only_modules

# what the demo's four steps import: pretrain, export, index, serve
DEMO_MODULES = ("simsearch.demo", "pretrain.train", "export.cli", "index.cli", "server.cli", "server.app")


def test_demo_extras_leave_out_triton_and_dev() -> None:
    assert {"triton", "dev"}.isdisjoint(makefile_extras("DEMO_EXTRAS"))
    assert {"cpu", "serve", "train"} <= set(makefile_extras("DEMO_EXTRAS"))
    assert {"triton", "dev"} <= set(makefile_extras("TEST_EXTRAS"))


def test_the_test_only_modules_are_the_test_tools() -> None:
    blocked = set(test_only_modules())
    assert {"pytriton", "pytest", "selenium", "schemathesis", "hypothesis", "ruff", "httpx"} <= blocked
    # what the demo needs stays importable
    assert {"torch", "torchvision", "onnxruntime", "onnx", "faiss", "fastapi", "uvicorn", "tritonclient",
            "numpy", "PIL"}.isdisjoint(blocked)


def test_the_blocker_really_blocks() -> None:
    result = run_without(["pytest"], "pytest", ["--version"], timeout=60)
    assert result.returncode != 0
    assert "No module named pytest" in result.stderr
    result = run_without(["yaml"], "--import", ["yaml"], timeout=60)
    assert result.returncode != 0 and "No module named 'yaml'" in result.stderr
    result = run_without(["yaml"], "--import", ["json"], timeout=60)
    assert result.returncode == 0 and result.stdout.split() == ["imported", "json"]


def test_demo_imports_nothing_from_the_test_extras() -> None:
    blocked = test_only_modules()
    result = run_without(blocked, "simsearch", ["demo", "--help"], timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--images" in result.stdout
    # one interpreter for every module the demo's steps import (each import costs seconds on two cores)
    result = run_without(blocked, "--import", list(DEMO_MODULES), timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["imported", *DEMO_MODULES]


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_make_installs_each_extra_set_once(tmp_path: Path) -> None:
    venv = tmp_path / "venv"

    def pip_lines(target: str) -> list[str]:
        out = subprocess.run(["make", "-n", target, f"VENV={venv}"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
        assert out.returncode == 0, out.stderr
        return [line for line in out.stdout.splitlines() if re.search(r"pip install .*-e", line)]

    def fake(*stamps: str) -> None:
        """What a finished install leaves: the venv's python, then each stamp, newer than pyproject.toml."""
        (venv / "bin").mkdir(parents=True, exist_ok=True)
        now = time.time()
        for i, path in enumerate([venv / "bin" / "python", *(venv / s for s in stamps)]):
            path.touch()
            os.utime(path, (now + i, now + i))

    demo = ",".join(makefile_extras("DEMO_EXTRAS"))
    both = ",".join(makefile_extras("DEMO_EXTRAS") + makefile_extras("TEST_EXTRAS"))
    # a fresh clone: make demo installs the demo's extras only
    assert [line.split("-e ")[1] for line in pip_lines("demo")] == [f"'.[{demo}]'"]
    # then make test installs the rest
    fake(".installed-demo")
    assert [line.split("-e ")[1] for line in pip_lines("test")] == [f"'.[{both}]'"]
    # make test first, then make demo: nothing more
    shutil.rmtree(venv)
    assert len(pip_lines("test")) == 2
    fake(".installed-demo", ".installed-test")
    assert pip_lines("demo") == []
    assert pip_lines("test") == []
    # an edited pyproject.toml redoes both (make compares modification times)
    older = (ROOT / "pyproject.toml").stat().st_mtime - 10
    for stamp in (".installed-demo", ".installed-test"):
        os.utime(venv / stamp, (older, older))
    assert len(pip_lines("test")) == 2


def test_a_command_without_its_extra_says_what_to_install() -> None:
    # a serving-only install (the API image): no PyTorch
    result = run_without(["torch", "torchvision"], "simsearch", ["pretrain", "--help"], timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "simsearch pretrain: module 'torch' is not installed" in result.stderr
    assert "pip install '.[cpu,train]'" in result.stderr
    assert "Traceback" not in result.stderr
