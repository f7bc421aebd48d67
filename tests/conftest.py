"""Shared fixtures. Append only; each block names its owner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# --- CI: a skipped test fails `make test` (issue 11) ----------------------------------------------
from skipguard import (  # noqa: F401  (pytest finds hooks by name in this module)
    pytest_collectreport,
    pytest_runtest_logreport,
    pytest_sessionfinish,
    pytest_terminal_summary,
)

TESTS_DIR = Path(__file__).parent

# --- index scale (issue 12): OpenMP threads that wait passively, as `simsearch` sets them (simsearch/cli.py);
# set before FAISS loads, so k-means and batched searches do not spin on the shared cores of a test run
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# --- export (issue 3) ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A model directory (model.onnx, model.json, triton/) of a freshly initialised smallcnn.

    width 0.25, 32x32 input, embedding dim 64, name "simclr-smallcnn", version 1; exported once per
    session with the fast TorchScript exporter, verified on a few real test images.
    The path is a symlink to the published version directory (see export/publish.py).
    """
    from export_checkpoints import make_checkpoint

    from export import export_model

    root = tmp_path_factory.mktemp("export-fixture")
    ckpt = make_checkpoint(root / "smallcnn.pt", arch="smallcnn", width=0.25, image_size=32)
    out = root / "model"
    export_model(ckpt, out, exporter="torchscript", verify_limit=16,
                 verify_images=[TESTS_DIR / "data" / "cifar10-sample" / "test", TESTS_DIR / "data" / "messy"])
    return out
