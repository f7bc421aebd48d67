"""Export wall time and parity figures for the ResNet-18 (CIFAR stem) and the small CPU encoder.

    .venv/bin/python bench/export_time.py [--archs resnet18 smallcnn] [--width 1.0] [--exporters dynamo torchscript]

Each encoder is freshly initialised with randomised BatchNorm statistics (so normalisation is not
the identity), saved as a checkpoint, and exported with `export_model` (FP32 + FP16 variants,
Triton repository), verified on real test images (CIFAR sample + the messy odd-sized photos).
Prints one line per run and a JSON summary at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

from export import export_model

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"
sys.path.insert(0, str(DATA.parent))  # the tests' checkpoint maker: one definition of a fresh checkpoint

from export_checkpoints import make_checkpoint  # noqa: E402


def _ort_ms_per_image(path: Path, size: tuple[int, int], batch: int = 64, repeats: int = 5) -> float:
    """Best-of-`repeats` CPU latency of one batch, per image (the graph as exported, default threads)."""
    import numpy as np
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).integers(0, 256, (batch, *size, 3), dtype=np.uint8)
    sess.run(None, {"images": x})
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(None, {"images": x})
        best = min(best, time.perf_counter() - t0)
    return round(best * 1000 / batch, 3)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["resnet18", "smallcnn"])
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--exporters", nargs="+", default=["dynamo", "torchscript"])
    p.add_argument("--no-fp16", action="store_true")
    p.add_argument("--verify-limit", type=int, default=64)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            ckpt = make_checkpoint(Path(tmp) / f"{arch}.pt", arch, args.width, args.image_size)
            for exporter in args.exporters:
                t0 = time.perf_counter()
                spec = export_model(ckpt, Path(tmp) / f"model-{arch}-{exporter}", exporter=exporter,
                                    fp16=not args.no_fp16, verify_limit=args.verify_limit,
                                    verify_images=[DATA / "cifar10-sample" / "test", DATA / "messy"])
                wall = time.perf_counter() - t0
                onnx_mb = (Path(tmp) / f"model-{arch}-{exporter}" / "model.onnx").stat().st_size / 1e6
                row = {"arch": arch, "width": args.width, "image_size": args.image_size, "exporter": exporter,
                       "embedding_dim": spec.embedding_dim, "encoder_parameters": spec.extra["encoder_parameters"],
                       "onnx_mb": round(onnx_mb, 2), "export_wall_s": round(wall, 2),
                       "n_images": spec.parity["fp32"]["n_images"], "real_images": spec.parity["images"]["real"]}
                for variant in ("fp32", "fp16"):
                    if variant in spec.parity:
                        fig = spec.parity[variant]
                        row[variant] = {k: fig[k] for k in ("worst_cosine", "mean_cosine", "max_abs_diff",
                                                            "batch_vs_single_max_abs_diff", "export_seconds",
                                                            "verify_seconds")}
                row["ort_cpu_ms_per_image_batch64"] = {
                    v: _ort_ms_per_image(Path(tmp) / f"model-{arch}-{exporter}" / f, spec.input_size)
                    for v, f in (("fp32", "model.onnx"), ("fp16", "model.fp16.onnx"))
                    if (Path(tmp) / f"model-{arch}-{exporter}" / f).exists()
                }
                results.append(row)
                fp16 = row.get("fp16", {})
                print(f"{arch:9s} w={args.width} {exporter:11s} D={spec.embedding_dim:4d} wall {wall:6.2f} s  "
                      f"fp32 worst cos {row['fp32']['worst_cosine']:.8f} max|d| {row['fp32']['max_abs_diff']:.2e}  "
                      f"fp16 worst cos {fp16.get('worst_cosine', float('nan')):.6f} "
                      f"max|d| {fp16.get('max_abs_diff', float('nan')):.2e}  "
                      f"ORT CPU ms/image {row['ort_cpu_ms_per_image_batch64']}", flush=True)
    print(json.dumps({"torch_threads": torch.get_num_threads(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
