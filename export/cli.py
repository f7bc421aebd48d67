"""`simsearch export CHECKPOINT --out MODEL_DIR`: a checkpoint's encoder -> a verified model directory.

Exit codes: 0 done; 1 the exported model failed verification; 2 a user mistake (missing or
foreign checkpoint, unknown architecture, bad option, no real images to verify on). Errors are one
line on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from embed.spec import MODEL_ONNX

log = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simsearch export",
        description="Export a SimCLR checkpoint's encoder (no projection head) to a model directory: "
        "model.onnx (uint8 images in, l2-normalised embeddings out), model.json, and a Triton model "
        "repository. The ONNX model is checked against PyTorch before anything is replaced.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", help="checkpoint file written by `simsearch pretrain`")
    p.add_argument("--out", required=True, help="model directory to write (replaced atomically)")
    p.add_argument("--name", default=None, help="model name (also the Triton model name); default simclr-<arch>")
    p.add_argument("--version", type=int, default=1, help="model version (the Triton version folder)")
    p.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (half-precision encoder)")
    p.add_argument("--verify-images", nargs="+", default=None, metavar="PATH",
                   help="real image files or folders for the parity check; default: the folder the checkpoint "
                   "was trained on (config data.folder), else its kNN folders (train.val_train, train.val_test). "
                   "Without any that exists the export stops (exit 2); synthetic images are added, never a substitute")
    p.add_argument("--verify-limit", type=int, default=64, help="at most this many real images")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset (>= 17)")
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torch.onnx exporter (dynamo falls back to torchscript if it fails)")
    t = p.add_argument_group("Triton model repository")
    t.add_argument("--no-triton", action="store_true", help="do not write triton/")
    t.add_argument("--triton-cpu", action="store_true", help="instance_group KIND_CPU (no TensorRT)")
    t.add_argument("--instance-count", type=int, default=1, help="model instances per device")
    t.add_argument("--max-batch-size", type=int, default=64, help="Triton max_batch_size")
    t.add_argument("--preferred-batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64],
                   help="dynamic batching preferred sizes (those above --max-batch-size are dropped)")
    t.add_argument("--max-queue-delay-us", type=int, default=2000, help="dynamic batching queue delay")
    t.add_argument("--no-tensorrt", action="store_true", help="leave out the TensorRT accelerator")
    t.add_argument("--tensorrt-fp32", action="store_true", help="TensorRT precision FP32 instead of FP16")
    t.add_argument("--workspace-bytes", type=int, default=1 << 30, help="TensorRT max workspace size")
    t.add_argument("--no-warmup", action="store_true", help="leave out model_warmup")
    p.add_argument("-q", "--quiet", action="store_true", help="only errors and the JSON summary")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("export").setLevel(logging.WARNING if args.quiet else logging.INFO)

    from export.errors import ExportError, VerificationError

    try:
        from export.exporter import ExportConfig, export_model
        from export.triton_repo import TritonOptions

        triton = None
        if not args.no_triton:
            triton = TritonOptions(
                max_batch_size=args.max_batch_size,
                preferred_batch_sizes=tuple(b for b in args.preferred_batch_sizes if b <= args.max_batch_size),
                max_queue_delay_us=args.max_queue_delay_us,
                instance_kind="KIND_CPU" if args.triton_cpu else "KIND_GPU",
                instance_count=args.instance_count,
                tensorrt=not args.no_tensorrt,
                tensorrt_fp16=not args.tensorrt_fp32,
                workspace_bytes=args.workspace_bytes,
                warmup=not args.no_warmup,
            )
        cfg = ExportConfig(
            name=args.name, version=args.version, fp16=args.fp16, opset=args.opset, exporter=args.exporter,
            verify_images=tuple(args.verify_images or ()), verify_limit=args.verify_limit, triton=triton,
        )
        spec = export_model(args.checkpoint, args.out, cfg)
    except VerificationError as e:
        print(f"simsearch export: verification failed: {e}", file=sys.stderr)
        return 1
    except ExportError as e:
        print(f"simsearch export: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out on a read-only or full file system
        print(f"simsearch export: error: {e}", file=sys.stderr)
        return 2
    summary = {
        "model_dir": args.out,
        "onnx": f"{args.out}/{MODEL_ONNX}",
        "name": spec.name,
        "version": spec.version,
        "input_size": list(spec.input_size),
        "embedding_dim": spec.embedding_dim,
        "parity": {k: v for k, v in spec.parity.items() if k != "images"},
        "export_seconds": spec.extra.get("export_seconds"),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
