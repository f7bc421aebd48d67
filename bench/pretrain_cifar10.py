"""Bench: SimCLR on the CIFAR-10 train folder for a wall-clock budget, then kNN, linear probe and P@10.

    .venv/bin/python bench/pretrain_cifar10.py                 # CPU preset, 10 minutes
    python bench/pretrain_cifar10.py --device cuda --minutes 8 # GPU preset: ResNet-18, CIFAR stem, batch 512
    .venv/bin/python bench/pretrain_cifar10.py --steps 3140    # a fixed amount of training instead of a budget

The budget covers the training loop only (decoding the folders and the evaluation are timed
separately). The LR schedule (warmup, then cosine) is laid out over the budget, or over `--steps`
(results that do not depend on the machine's load, for comparing settings on a shared machine).
kNN: memory bank = all 50,000 train images, k=20, temperature-weighted votes (T=0.07); linear
probe: `pretrain/probe.py`'s protocol (multinomial logistic regression on standardised frozen
features, l2 chosen on a held-out 10% of train, L-BFGS to convergence); P@10: the 10,000 test
images as queries against the 50,000 train images, cosine, by label (what search shows). Prints
the figures and one JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pretrain.checkpoint import load_checkpoint  # noqa: E402
from pretrain.config import PretrainConfig  # noqa: E402
from pretrain.data import load_folder  # noqa: E402
from pretrain.evaluate import evaluate, load_encoder  # noqa: E402
from pretrain.retrieval import precision_at_k  # noqa: E402
from pretrain.train import train  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the repository

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
# For the 2-core AVX2 CPU, which has no bf16 units (bf16 autocast ran ~8x slower than fp32 there): smallcnn2
# (stride-2 stem, 0.57M parameters) on 24 px views gets ~11 epochs into 10 minutes; evaluation runs at the
# stored 32 px. Chosen by 3-minute runs on this CPU (pretrain/README.md has the figures): tau 0.1, peak LR 2.0,
# a 1024-wide hidden layer in the head.
CPU_PRESET = dict(arch="smallcnn2", width=1.0, batch_size=256, temperature=0.1, precision="fp32", optimizer="lars",
                  base_lr=2.0, warmup_epochs=0.3, view_size=24, strength=0.5, head_hidden_dim=1024)
GPU_PRESET = dict(arch="resnet18", width=1.0, batch_size=512, temperature=0.2, precision="bf16", optimizer="lars",
                  base_lr=1.0, warmup_epochs=2.0, view_size=0, strength=0.5, head_hidden_dim=0)


def ensure_data(root: Path, tarball: Path) -> Path:
    if not (root / "train").is_dir():
        if not tarball.is_file():
            raise FileNotFoundError(f"{root}/train is missing and there is no {tarball} to extract it from")
        root.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["tar", "xzf", str(tarball), "-C", str(root.parent)], check=True)
    return root


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="/tmp/cifar/cifar10", help="folder with train/ and test/")
    p.add_argument("--tarball", default=str(SHARED / "cifar10-jpeg.tar.gz"), help="extracted when --data is absent")
    p.add_argument("--minutes", type=float, default=10.0, help="training budget")
    p.add_argument("--steps", type=int, default=0, help="train exactly this many steps instead (0: --minutes)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", default="/tmp/bench-pretrain", help="run directory")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--workers", type=int, default=0, help="decode threads (0: CPU count)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--probe-iters", type=int, default=1000, help="L-BFGS iteration cap of each probe fit")
    p.add_argument("--seed", type=int, default=0)
    for key in CPU_PRESET:  # preset values depend on the device; None = the preset's
        p.add_argument("--" + key.replace("_", "-"), type=type(GPU_PRESET[key]), default=None,
                       help=f"default: CPU {CPU_PRESET[key]}, GPU {GPU_PRESET[key]}")
    p.add_argument("--cifar-stem", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    preset = dict(GPU_PRESET if device.startswith("cuda") else CPU_PRESET)
    preset.update({k: getattr(args, k) for k in preset if getattr(args, k) is not None})

    root = ensure_data(Path(args.data), Path(args.tarball))
    workers = args.workers or (torch.multiprocessing.cpu_count() or 2)
    t0 = time.time()
    train_set = load_folder(root / "train", 32, workers=workers, progress=False)
    test_set = load_folder(root / "test", 32, workers=workers, progress=False)
    load_s = time.time() - t0
    print(f"decoded {len(train_set)} train + {len(test_set)} test images in {load_s:.1f} s "
          f"({len(train_set.failures) + len(test_set.failures)} skipped)", flush=True)

    cfg = PretrainConfig.from_dict({
        "model": {"arch": preset["arch"], "width": preset["width"], "cifar_stem": args.cifar_stem,
                  "head_hidden_dim": preset["head_hidden_dim"]},
        "data": {"image_size": 32, "mean": CIFAR_MEAN, "std": CIFAR_STD},
        "augment": {"strength": preset["strength"], "view_size": preset["view_size"]},
        "optim": {"optimizer": preset["optimizer"], "base_lr": preset["base_lr"], "warmup_epochs": preset["warmup_epochs"]},
        "train": {"epochs": args.steps / (len(train_set) // preset["batch_size"]),
                  "time_budget_min": 0 if args.steps else args.minutes, "batch_size": preset["batch_size"],
                  "temperature": preset["temperature"], "precision": preset["precision"], "channels_last": True,
                  "compile": args.compile, "device": device, "seed": args.seed, "log_every": 10,
                  "ckpt_every_min": 60},
    })
    print("config:", json.dumps(cfg.to_dict()), flush=True)
    summary = train(cfg, train_set, args.out, progress=sys.stderr.isatty())
    ckpt = load_checkpoint(Path(args.out) / "last.pt")
    features: dict[str, torch.Tensor] = {}
    result = evaluate(load_encoder(ckpt, torch.device(device)), ckpt["config"]["data"], train_set, test_set,
                      probe_iters=args.probe_iters, device=device, features=features)
    if "p_at_10" not in result:  # until `simsearch eval` reports it itself
        result["p_at_10"] = precision_at_k(features["train"], train_set.labels, features["test"], test_set.labels, k=10)
    spe = len(train_set) // cfg.train.batch_size
    figures = {
        "device": device, "torch": torch.__version__, "threads": torch.get_num_threads(), **preset,
        "minutes": None if args.steps else args.minutes, "train_seconds": summary["train_seconds"], "steps": summary["step"],
        "epochs": summary["epochs"], "seconds_per_epoch": summary["train_seconds"] / max(summary["epochs"], 1e-9),
        "images_per_s": summary["images_per_s"], "aug_share": summary["aug_share"],
        "final_loss": summary["final_loss"], "knn_top1": result["knn_top1"], "probe_top1": result.get("probe_top1"),
        "probe_l2": result.get("probe_l2"), "p_at_10": result["p_at_10"],
        "decode_seconds": load_s, "eval_seconds": result["eval_seconds"], "steps_per_epoch": spe,
    }
    print(f"images/s {figures['images_per_s']:.0f} | epochs {figures['epochs']:.2f} "
          f"({figures['seconds_per_epoch']:.1f} s/epoch) | augmentation {100 * figures['aug_share']:.1f}% of step time")
    print(f"kNN top-1 {100 * result['knn_top1']:.2f}% (k=20, T=0.07, bank 50,000) | "
          f"linear probe top-1 {100 * (result.get('probe_top1') or 0):.2f}% | P@10 {result['p_at_10']:.3f}")
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
