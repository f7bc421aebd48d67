"""One prepared GPU check: export ResNet-18, time it with ONNX Runtime (TensorRT / CUDA / CPU
providers, whichever exist) and with PyTorch on CUDA (fp32 and fp16 autocast), and report FP16
parity. Prints each figure as it goes and one JSON object at the end.

    python bench/gpu_check.py                 # the real run (< 4 minutes on one GPU)
    python bench/gpu_check.py --smoke         # tiny settings, any machine, for testing the script

ONNX Runtime's CUDA and TensorRT providers come only with `onnxruntime-gpu`; with the CPU build the
script says so and still measures PyTorch on CUDA as the GPU reference. Inputs live on the device
already for the PyTorch figures (compute only); ONNX Runtime figures include its host->device copy.
Throughput is images/s of the whole graph (uint8 NHWC in, preprocessing and l2 norm inside).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import platform
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a plain checkout too (no `pip install -e .` needed)
SAMPLE = ROOT / "tests" / "data" / "cifar10-sample" / "test"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BUDGET_S = 200.0  # stop measuring (figures marked skipped) past this; the whole run must stay < 4 min
log = logging.getLogger("gpu_check")
_STARTED = time.perf_counter()


def _say(msg: str) -> None:
    print(msg, flush=True)


def images_per_s(run: Callable[[], Any], batch: int, seconds: float, sync: Callable[[], None]) -> dict[str, float]:
    """Warm up twice, then repeat for about `seconds` (at least 3 times); images/s and ms/batch."""
    if time.perf_counter() - _STARTED > BUDGET_S:
        return {"skipped": f"past the {BUDGET_S:.0f} s budget"}
    for _ in range(2):
        run()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < 3 or time.perf_counter() - t0 < seconds:
        run()
        n += 1
    sync()
    elapsed = time.perf_counter() - t0
    return {"images_per_s": round(batch * n / elapsed, 1), "ms_per_batch": round(1000 * elapsed / n, 3), "iters": n}


def parity(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return {"cosine_min": round(float(cos.min()), 6), "cosine_mean": round(float(cos.mean()), 6),
            "max_abs": float(np.abs(a - b).max())}


def real_images(size: int, count: int) -> np.ndarray:
    """`count` CIFAR-10 sample photos resized by the model's own rule; random pixels if PIL is missing."""
    try:
        from embed.preprocess import load_image_array
        from embed.spec import ModelSpec

        spec = ModelSpec(name="x", version=1, input_height=size, input_width=size, embedding_dim=1)
        paths = sorted(SAMPLE.glob("*/*.jpg"))[:count]
        return np.stack([load_image_array(p, spec)[0] for p in paths])
    except Exception as e:  # noqa: BLE001 - a GPU box without Pillow still gets its figures
        _say(f"real images unavailable ({type(e).__name__}: {e}); using random pixels")
        return np.random.default_rng(0).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


def resnet18_fallback() -> Any:
    """torchvision's ResNet-18 layout without torchvision (for a GPU box that lacks it)."""
    from torch import nn

    class Block(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                         if stride != 1 or cin != cout else nn.Identity())

        def forward(self, x: Any) -> Any:
            y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
            return (y + self.down(x)).relu()

    layers: list[nn.Module] = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
    encoder.feature_dim = 512
    return encoder


def export_resnet18(work: Path, size: int, verify_limit: int) -> tuple[Any, Path | None, dict[str, Any]]:
    """(encoder in eval mode, model.onnx path, notes): the project's export, else a bare ONNX export."""
    import torch

    torch.manual_seed(0)
    notes: dict[str, Any] = {}
    try:
        from dataclasses import asdict

        from export import export_model
        from pretrain.checkpoint import save_checkpoint
        from pretrain.models import ModelConfig, build_encoder, build_head

        cfg = ModelConfig(arch="resnet18", cifar_stem=False)
        encoder = build_encoder(cfg)
        head = build_head(cfg, encoder.feature_dim)
        config = {"model": asdict(cfg), "data": {"image_size": size, "mean": list(MEAN), "std": list(STD)}}
        ckpt = save_checkpoint({"config": config, "encoder": encoder.state_dict(), "head": head.state_dict(),
                                "step": 0, "epoch": 0}, work / "resnet18.pt")
        t0 = time.perf_counter()
        # the Triton repository needs tritonclient's protobuf schema, which a GPU box may lack
        triton = {} if importlib.util.find_spec("tritonclient") else {"triton": None}
        spec = export_model(ckpt, work / "model", exporter="torchscript", verify_limit=verify_limit,
                            verify_images=[SAMPLE], **triton)
        notes.update(export="simsearch export (model directory)", export_s=round(time.perf_counter() - t0, 1),
                     export_parity_fp32=spec.parity.get("fp32"), embedding_dim=spec.embedding_dim)
        return encoder.eval(), work / "model" / "model.onnx", notes
    except Exception as e:  # noqa: BLE001 - still measure with a bare export
        notes["export_error"] = f"{type(e).__name__}: {e}"
        _say(f"project export failed ({notes['export_error']}); exporting a bare ResNet-18 graph")
    try:
        from pretrain.models import ModelConfig, build_encoder

        encoder = build_encoder(ModelConfig(arch="resnet18", cifar_stem=False))
    except Exception:  # noqa: BLE001 - no torchvision
        encoder = resnet18_fallback()
    notes["embedding_dim"] = int(encoder.feature_dim)
    try:
        from export.graph import ExportableEncoder, export_onnx

        path = work / "bare.onnx"
        export_onnx(ExportableEncoder(encoder.eval(), MEAN, STD), path, image_size=(size, size), exporter="torchscript")
        notes["export"] = "bare ExportableEncoder graph"
        return encoder.eval(), path, notes
    except Exception as e:  # noqa: BLE001 - e.g. no `onnx` package: PyTorch figures only
        notes["bare_export_error"] = f"{type(e).__name__}: {e}"
        _say(f"ABSENT: an ONNX file ({notes['bare_export_error']}); ONNX Runtime is skipped")
        return encoder.eval(), None, notes


def onnxruntime_section(onnx_file: Path, images: np.ndarray, batches: list[int], seconds: float,
                        work: Path, size: int) -> dict[str, Any]:
    import onnxruntime as ort

    available = ort.get_available_providers()
    out: dict[str, Any] = {"version": ort.__version__, "available_providers": available, "runs": {}}
    _say(f"onnxruntime {ort.__version__}; providers: {available}")
    for wanted in ("TensorrtExecutionProvider", "CUDAExecutionProvider"):
        if wanted not in available:
            _say(f"ABSENT: {wanted} (this onnxruntime build has none; it comes with onnxruntime-gpu)")
    top = max(batches)
    trt_options = {
        "trt_fp16_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(work / "trt"),
        # one optimisation profile for every batch measured: the engine is built once
        "trt_profile_min_shapes": f"images:1x{size}x{size}x3", "trt_profile_max_shapes": f"images:{top}x{size}x{size}x3",
        "trt_profile_opt_shapes": f"images:{min(32, top)}x{size}x{size}x3",
    }
    configs = [("TensorrtExecutionProvider", "tensorrt_fp16", [("TensorrtExecutionProvider", trt_options),
                                                               "CUDAExecutionProvider", "CPUExecutionProvider"]),
               ("CUDAExecutionProvider", "cuda_fp32", ["CUDAExecutionProvider", "CPUExecutionProvider"]),
               ("CPUExecutionProvider", "cpu_fp32", ["CPUExecutionProvider"])]
    reference = None
    for provider, key, providers in configs:
        if provider not in available:
            continue
        try:
            t0 = time.perf_counter()
            session = ort.InferenceSession(str(onnx_file), providers=providers)
            embeddings = session.run(None, {"images": images})[0]  # TensorRT builds its engine here
            result: dict[str, Any] = {"session_providers": session.get_providers(),
                                      "first_run_s": round(time.perf_counter() - t0, 2)}
            cpu_batches = [b for b in batches if b <= 32] if provider == "CPUExecutionProvider" else batches
            for b in cpu_batches:
                x = np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))
                result[f"batch_{b}"] = images_per_s(lambda x=x, s=session: s.run(None, {"images": x}), b, seconds,
                                                    lambda: None)
                _say(f"ORT {key:<14} batch {b:>3}: {result[f'batch_{b}'].get('images_per_s', 'skipped')} images/s")
            if provider == "CPUExecutionProvider":
                reference = embeddings
            out["runs"][key] = result | {"embeddings": embeddings}
        except Exception as e:  # noqa: BLE001 - report and go on to the next provider
            out["runs"][key] = {"error": f"{type(e).__name__}: {e}"}
            _say(f"ORT {key}: FAILED {type(e).__name__}: {e}")
    for key, run in out["runs"].items():
        emb = run.pop("embeddings", None)
        if emb is not None and reference is not None and key != "cpu_fp32":
            run["parity_vs_cpu_fp32"] = parity(emb, reference)
            _say(f"ORT {key} vs CPU fp32: {run['parity_vs_cpu_fp32']}")
    out["_cpu_reference"] = reference
    return out


def torch_section(encoder: Any, images: np.ndarray, batches: list[int], seconds: float,
                  device_name: str) -> dict[str, Any]:
    import torch

    from export.graph import ExportableEncoder

    device = torch.device(device_name)
    torch.backends.cudnn.benchmark = True
    model = ExportableEncoder(encoder, MEAN, STD).to(device).to(memory_format=torch.channels_last).eval()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    x_real = torch.from_numpy(images).to(device)
    embeddings = {}
    for key, autocast in (("fp32", False), ("fp16_autocast", True)):
        def run(x: Any, autocast: bool = autocast) -> Any:
            with torch.inference_mode(), torch.autocast(device.type, dtype=torch.float16, enabled=autocast):
                return model(x)

        embeddings[key] = run(x_real).float().cpu().numpy()
        result: dict[str, Any] = {}
        for b in batches:
            x = torch.from_numpy(np.ascontiguousarray(np.resize(images, (b, *images.shape[1:])))).to(device)
            result[f"batch_{b}"] = images_per_s(lambda x=x: run(x), b, seconds, sync)
            _say(f"torch {device.type} {key:<13} batch {b:>3}: {result[f'batch_{b}'].get('images_per_s', 'skipped')} images/s")
        out[key] = result
    out["fp16_vs_fp32"] = parity(embeddings["fp16_autocast"], embeddings["fp32"])
    _say(f"torch fp16 autocast vs fp32: {out['fp16_vs_fp32']}")
    out["_fp32"] = embeddings["fp32"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny settings (64 px, batches 1/4/8, short runs)")
    p.add_argument("--seconds", type=float, default=None, help="measuring time per figure (default 2, smoke 0.2)")
    p.add_argument("--json", default=None, help="also write the JSON report to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    size, batches = (64, [1, 4, 8]) if args.smoke else (224, [1, 32, 256])
    seconds = args.seconds if args.seconds is not None else (0.2 if args.smoke else 2.0)
    import torch

    cuda = torch.cuda.is_available()
    report: dict[str, Any] = {
        "python": platform.python_version(), "torch_version": torch.__version__, "cuda_available": cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None, "image_size": size, "batches": batches,
        "smoke": args.smoke,
    }
    _say(json.dumps(report))
    if not cuda:
        _say("ABSENT: CUDA (torch.cuda.is_available() is False); the PyTorch figures are CPU ones" +
             ("" if args.smoke else " and this is not a GPU check"))
    images = real_images(size, 64 if not args.smoke else 8)
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = Path(tmp)
        encoder, onnx_file, notes = export_resnet18(work, size, verify_limit=4 if args.smoke else 16)
        report["export"] = notes
        _say(f"export: {notes}")
        cpu_ref = torch_fp32 = None
        try:
            if onnx_file is None:
                raise RuntimeError("no ONNX file was exported")
            report["onnxruntime"] = onnxruntime_section(onnx_file, images, batches, seconds, work, size)
            cpu_ref = report["onnxruntime"].pop("_cpu_reference")
        except Exception as e:  # noqa: BLE001
            report["onnxruntime"] = {"error": f"{type(e).__name__}: {e}"}
            _say(f"onnxruntime section FAILED:\n{traceback.format_exc()}")
        try:
            report["torch"] = torch_section(encoder, images, batches, seconds, "cuda" if cuda else "cpu")
            torch_fp32 = report["torch"].pop("_fp32")
        except Exception as e:  # noqa: BLE001
            report["torch"] = {"error": f"{type(e).__name__}: {e}"}
            _say(f"torch section FAILED:\n{traceback.format_exc()}")
        if cpu_ref is not None and torch_fp32 is not None:
            report["torch_fp32_vs_onnx_cpu_fp32"] = parity(torch_fp32, cpu_ref)
            _say(f"torch fp32 ({'cuda' if cuda else 'cpu'}) vs exported ONNX on ORT CPU: "
                 f"{report['torch_fp32_vs_onnx_cpu_fp32']}")
    report["total_s"] = round(time.perf_counter() - _STARTED, 1)
    text = json.dumps(report, default=str)
    if args.json:
        Path(args.json).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
