"""`simsearch demo`: from a folder of images to a running search page, in one command.

Four steps, each reusing what an earlier run of the same command already built:

1. pretrain  SimCLR on the folder for a wall-clock budget (a small CNN on a CPU; a ResNet-18 when
             a CUDA GPU is present); reused when the run directory already holds a checkpoint.
2. export    the encoder to a verified ONNX model directory; reused when it was exported from
             the same checkpoint (sha256 in model.json).
3. index     the folder into a FAISS index; incremental, so a rerun only embeds what changed.
4. serve     the API and the search page; prints the URL and a `curl` example.

Each folder gets its own work directory (`<workdir>/<folder name>-<hash of its path>`), so
`make demo IMAGES=~/photos` never mixes with the shipped sample.

`--init FILE` gives pretraining a head start from encoder weights the user has (a torchvision
ResNet state dict, or the `last.pt` of an earlier run, e.g. on a larger folder): the encoder's
architecture and width follow the file, the input size, stem and schedule follow the folder, and
the run gets its own work directory (`...-init-<hash of the file's path>`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

log = logging.getLogger(__name__)
MIN_IMAGES = 16


@dataclass(frozen=True)
class TrainPreset:
    arch: str
    width: float
    image_size: int
    view_size: int  # 0: image_size; smaller views train several times faster on a CPU
    cifar_stem: bool
    batch_size: int
    precision: str
    device: str
    temperature: float
    base_lr: float  # LARS, lr = base_lr x batch / 256
    head_hidden_dim: int  # 0: the encoder's feature dimension


def choose_preset(median_short_side: int, cuda: bool) -> TrainPreset:
    """Encoder, input size and the settings that matter for the folder: 32 px for tiny images, larger for photos.

    The CPU preset is bench/pretrain_cifar10.py's (smallcnn2 on views 3/4 of the image side, fp32:
    bf16 autocast is emulated, so ~8x slower, on CPUs without bf16 instructions).
    """
    if cuda:
        size = 32 if median_short_side <= 48 else 96
        return TrainPreset("resnet18", 1.0, size, 0, size <= 64, 512, "bf16", "cuda", 0.2, 1.0, 0)
    size = 32 if median_short_side <= 48 else 64
    return TrainPreset("smallcnn2", 1.0, size, size * 3 // 4, True, 256, "fp32", "cpu", 0.1, 2.0, 1024)


def survey_folder(folder: Path, sample: int = 200) -> tuple[int, int]:
    """(number of image files, median shorter side of up to `sample` of them; headers only)."""
    from PIL import Image

    from index.scan import scan_folder

    files = scan_folder(folder)
    sides: list[int] = []
    for rel in files:
        path = folder / rel
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # noqa: BLE001 - a bad file is the indexer's business, not this guess's
            continue
        if len(sides) >= sample:
            break
    if not sides:
        raise SystemExit(f"simsearch demo: no readable images under {folder}")
    return len(files), sorted(sides)[len(sides) // 2]


def work_dir_for(images: Path, root: Path, init: Path | None = None) -> Path:
    """One work directory per folder, and per --init file: a head start is another model."""
    digest = hashlib.sha256(str(images).encode()).hexdigest()[:8]
    if init is None:
        return root / f"{images.name or 'images'}-{digest}"
    return root / f"{images.name or 'images'}-{digest}-init-{hashlib.sha256(str(init).encode()).hexdigest()[:8]}"


def step(n: int, title: str) -> float:
    print(f"\n[{n}/4] {title}", flush=True)
    return time.perf_counter()


def done(t0: float, what: str) -> float:
    dt = time.perf_counter() - t0
    print(f"      {what} ({dt:.1f} s)", flush=True)
    return dt


def run_pretrain(images: Path, run_dir: Path, budget_s: float, progress: bool, init: Path | None = None) -> Path:
    import torch

    from pretrain import train

    checkpoint = run_dir / "last.pt"
    if (run_dir / "summary.json").is_file() and checkpoint.is_file():
        print(f"      reusing {checkpoint}")
        return checkpoint
    count, short_side = survey_folder(images)
    if count < MIN_IMAGES:
        raise SystemExit(f"simsearch demo: {images} holds {count} images; SimCLR needs at least {MIN_IMAGES}")
    preset = choose_preset(short_side, torch.cuda.is_available())
    # a batch can't be larger than the folder; SimCLR's negatives come from the batch, so keep it large
    preset = replace(preset, batch_size=min(preset.batch_size, 2 ** int(math.log2(count))))
    if init is not None:  # a head start: the encoder is the file's; the size, stem and schedule stay the folder's
        from pretrain.init import InitError, init_encoder

        try:
            arch, width = init_encoder(init)
        except InitError as e:
            raise SystemExit(f"simsearch demo: {e}") from None
        preset = replace(preset, arch=arch, width=width, head_hidden_dim=preset.head_hidden_dim if arch == preset.arch else 0)
    print(
        f"      {count} images; {preset.arch} at {preset.image_size}px on {preset.device}, "
        f"batch {preset.batch_size}, budget {budget_s:.0f} s"
    )
    argv = [
        str(images), "--out", str(run_dir),
        "--arch", preset.arch, "--width", str(preset.width),
        "--image-size", str(preset.image_size),
        "--cifar-stem" if preset.cifar_stem else "--no-cifar-stem",
        "--view-size", str(preset.view_size), "--precision", preset.precision,
        "--batch-size", str(preset.batch_size), "--device", preset.device,
        "--temperature", str(preset.temperature), "--base-lr", str(preset.base_lr),
        "--head-hidden-dim", str(preset.head_hidden_dim), "--warmup-epochs", "1",
        # epochs 0: the cosine schedule is laid out over the time budget
        "--time-budget-min", f"{budget_s / 60:.4f}", "--epochs", "0",
    ]  # fmt: skip
    if init is not None:
        argv += ["--init", str(init)]
    if checkpoint.is_file():  # an interrupted earlier run: continue it rather than start again
        argv.append("--resume")
    if not progress:
        argv.append("--no-progress")
    with contextlib.redirect_stdout(io.StringIO()):  # its JSON summary: the line below says what matters
        rc = train.main(argv)
    if rc == 130:  # Ctrl-C: the last whole step is saved, and the next run of the demo resumes it
        print("simsearch demo: interrupted; run the same command again to go on training", file=sys.stderr)
        raise SystemExit(130)
    if rc or not checkpoint.is_file():
        raise SystemExit(f"simsearch demo: pretraining failed (exit {rc})")
    s = json.loads((run_dir / "summary.json").read_text())
    loss = [f"{v:.2f}" for v in (s.get("first_loss"), s.get("final_loss")) if v is not None]
    print(f"      {s['step']} steps ({s['epochs']:.1f} epochs), {s['images_per_s']:.0f} images/s"
          + (f"; loss {' -> '.join(loss)}" + (" at the first step" if len(loss) == 1 else "") if loss else ""))
    return checkpoint


def run_export(checkpoint: Path, model_dir: Path, images: Path) -> Path:
    from embed.spec import ModelDirError, ModelSpec, sha256_file
    from export import cli as export_cli

    try:
        spec = ModelSpec.load(model_dir)
        if spec.checkpoint_sha256 == sha256_file(checkpoint):
            print(f"      reusing {model_dir} (exported from this checkpoint)")
            return model_dir
    except ModelDirError:
        pass
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # its JSON summary: the line below says what matters
        rc = export_cli.main([str(checkpoint), "--out", str(model_dir), "--verify-images", str(images), "-q"])
    if rc:
        raise SystemExit(f"simsearch demo: export failed (exit {rc})")
    for precision, p in json.loads(out.getvalue()).get("parity", {}).items():
        print(f"      {precision}: ONNX Runtime agrees with PyTorch on {p['n_images']} of the images "
              f"(worst cosine {p['worst_cosine']:.6f})")
    return model_dir


def run_index(images: Path, model_dir: Path, index_dir: Path, summary_file: Path, progress: bool) -> dict:
    from index import cli as index_cli

    # --reembed: after a rerun that trained and exported a new model, the demo's own index follows it
    # (a no-op while the index belongs to the model)
    argv = ["build", str(images), "--model", str(model_dir), "--out", str(index_dir), "--summary", str(summary_file),
            "--reembed"]
    if not progress:
        argv.append("--no-progress")
    rc = index_cli.main(argv)
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    if rc not in (0, None) and not summary:
        raise SystemExit(f"simsearch demo: indexing failed (exit {rc})")
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simsearch demo",
        description="Pretrain, export, index and serve a folder of images in one command.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--images", default="tests/data/cifar10-sample/train", help="folder of images (recursive)")
    p.add_argument("--workdir", default="demo-run", help="where runs, models and indexes are kept")
    p.add_argument("--budget", type=float, default=180.0, help="pretraining budget in seconds")
    p.add_argument("--init", default=None, metavar="FILE",
                   help="start pretraining from these encoder weights (a torchvision ResNet state dict or a "
                        "simsearch checkpoint; the encoder follows the file); nothing is downloaded")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-serve", action="store_true", help="stop after indexing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the steps' own INFO chatter (the exporter's graph passes, the index's compactions) is not news
    # here: each step prints its one result line; warnings (files skipped, ...) still show
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    images = Path(args.images).expanduser().resolve()
    if not images.is_dir():
        print(f"simsearch demo: {images} is not a folder of images", file=sys.stderr)
        return 2
    init = Path(args.init).expanduser().resolve() if args.init else None
    if init is not None and not init.is_file():
        print(f"simsearch demo: --init {init}: no such file", file=sys.stderr)
        return 2
    work = work_dir_for(images, Path(args.workdir).expanduser().resolve(), init)
    work.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    times: dict[str, float] = {}
    print(f"simsearch demo: {images}\n      work directory {work}")

    t0 = step(1, "pretraining the encoder (SimCLR)")
    checkpoint = run_pretrain(images, work / "pretrain", args.budget, progress, init)
    times["pretrain_s"] = done(t0, f"checkpoint {checkpoint}")

    t0 = step(2, "exporting the encoder to ONNX (verified against PyTorch)")
    model_dir = run_export(checkpoint, work / "model", images)
    times["export_s"] = done(t0, f"model directory {model_dir}")

    t0 = step(3, "indexing the folder")
    index_dir = work / "index"
    summary = run_index(images, model_dir, index_dir, work / "index-summary.json", progress)
    counts = {k: summary.get(k) for k in ("added", "updated", "removed", "unchanged")}
    counts |= {k: len(summary.get(k) or []) for k in ("skipped_duplicates", "failed")}
    times["index_s"] = done(t0, f"index {index_dir}: {json.dumps(counts)}")
    (work / "demo-times.json").write_text(json.dumps(times, indent=2) + "\n")

    if args.no_serve:
        print(json.dumps({"work_dir": str(work), "model_dir": str(model_dir), "index_dir": str(index_dir), **times}))
        return 0

    step(4, "serving")
    url = f"http://{args.host}:{args.port}"
    from embed.files import walk_images  # an image the indexer took, never a README or a hidden file

    example = next((str(f.path) for f in walk_images(images).files), "photo.jpg")
    print(f"      search page:  {url}/")
    print(f"      API docs:     {url}/docs")
    print(f"      try:          curl -F 'file=@{example}' -F k=5 {url}/v1/search")
    print("      (Ctrl-C to stop; run the same command again to reuse everything built so far)", flush=True)
    from server import cli as server_cli

    os.environ.setdefault("SIMSEARCH_LOG_LEVEL", "info")
    logging.getLogger().setLevel(os.environ["SIMSEARCH_LOG_LEVEL"].upper())  # the server's log, as `serve` shows it
    return int(
        server_cli.main(
            ["--model", str(model_dir), "--index", str(index_dir), "--host", args.host, "--port", str(args.port)]
        )
        or 0
    )


if __name__ == "__main__":
    raise SystemExit(main())
