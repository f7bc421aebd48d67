"""The serving import graph never imports PyTorch (or the export-only `onnx`): the API image has neither."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "torchvision", "onnx", "onnxscript")
MODULES = (
    "simsearch.cli", "server.app", "server.cli", "tritonlocal.launcher", "index.cli", "index.store",
    "embed.backends.triton", "embed.backends.onnxruntime", "embed.embedder",
)

PROBE = """
import importlib, importlib.abc, sys

BLOCKED = set(sys.argv[1].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: the serving image has no {name}")
        return None

sys.meta_path.insert(0, Block())
for module in sys.argv[2].split(","):
    importlib.import_module(module)
print("imported", sys.argv[2])
"""


def test_serving_modules_import_without_torch() -> None:
    present = [m for m in MODULES if importlib.util.find_spec(m) is not None]
    if not present:
        pytest.skip("none of the serving modules exist yet")
    # one interpreter for all of them (each import of the server costs seconds on two cores);
    # the traceback names the module whose import reached a blocked package
    result = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(BLOCKED), ",".join(present)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "torch" not in result.stdout.split("imported", 1)[0]


def test_the_blocker_really_blocks() -> None:
    result = subprocess.run(
        [sys.executable, "-c", PROBE, ",".join(BLOCKED), "torch"], cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode != 0 and "torch is blocked" in result.stderr
