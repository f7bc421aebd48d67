"""`simsearch eval CHECKPOINT --train DIR --test DIR`: kNN and linear-probe accuracy of the frozen encoder.

Both folders need class sub-folders (the labels). Images go through the checkpoint's training rule
(`pretrain.data.training_rule`: the same pixels `simsearch export` records in model.json, so these
figures describe the served model), normalised with its mean/std; features are l2-normalised.
Prints one JSON object and writes it to --out (default: beside the checkpoint); `--features-out`
also saves every file's feature vector.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from pretrain.checkpoint import load_checkpoint
from pretrain.data import ImageFolderData, load_folder, training_rule
from pretrain.features import extract_features
from pretrain.knn import knn_accuracy
from pretrain.models import ModelConfig, build_encoder
from pretrain.probe import linear_probe
from pretrain.retrieval import precision_at_k

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="simsearch eval", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="a pretraining checkpoint (last.pt)")
    p.add_argument("--train", required=True, help="labelled folder: kNN memory bank and probe training set")
    p.add_argument("--test", required=True, help="labelled folder: queries / probe test set")
    p.add_argument("--k", type=int, default=20, help="neighbours")
    p.add_argument("--temperature", type=float, default=0.07, help="kNN vote temperature")
    p.add_argument("--probe-iters", type=int, default=1000,
                   help="L-BFGS iteration cap of each linear-probe fit (l2 chosen on a held-out 10%% of train; 0: no probe)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--workers", type=int, default=2, help="decode threads")
    p.add_argument("--out", help="JSON output path (default: CHECKPOINT with .eval.json)")
    p.add_argument("--features-out", metavar="NPZ", help="also save the features: train_paths, train_features, "
                   "test_paths, test_features (float32, l2-normalised, in the order of the folder listing)")
    return p


def load_encoder(ckpt: dict[str, Any], device: torch.device) -> torch.nn.Module:
    encoder = build_encoder(ModelConfig(**ckpt["config"]["model"]))
    encoder.load_state_dict(ckpt["encoder"])
    return encoder.to(device).eval()


def evaluate(
    encoder: torch.nn.Module,
    data_cfg: dict[str, Any],
    train: ImageFolderData,
    test: ImageFolderData,
    *,
    k: int = 20,
    temperature: float = 0.07,
    probe_iters: int = 1000,
    device: torch.device | str = "cpu",
    batch_size: int = 512,
    features: dict[str, torch.Tensor] | None = None,
) -> dict[str, Any]:
    """kNN top-1 and linear-probe top-1 (0..1) with the timings of each part.

    `features`, when given, receives the "train" and "test" feature tensors [N, D].
    """
    if train.classes != test.classes or not train.classes:
        raise ValueError(f"train and test folders need the same class sub-folders; got {train.classes} and {test.classes}")
    t0 = time.time()
    kw = dict(device=device, batch_size=batch_size)
    ftr = extract_features(encoder, train.images, data_cfg["mean"], data_cfg["std"], **kw)
    fte = extract_features(encoder, test.images, data_cfg["mean"], data_cfg["std"], **kw)
    t1 = time.time()
    if features is not None:
        features.update(train=ftr, test=fte)
    result: dict[str, Any] = {
        "knn_top1": knn_accuracy(ftr, train.labels, fte, test.labels, k=k, temperature=temperature),
        # search's figure: the test images as queries, the train images as the gallery, cosine, by label
        "p_at_10": precision_at_k(ftr, train.labels, fte, test.labels, k=10),
        "k": k, "knn_temperature": temperature, "n_train": len(train), "n_test": len(test),
        "feature_dim": ftr.shape[1], "features_seconds": t1 - t0,
    }
    if probe_iters:
        probe = linear_probe(ftr, train.labels, fte, test.labels, max_iter=probe_iters)
        result.update(probe_top1=probe["test_acc"], probe_train_top1=probe["train_acc"], probe_l2=probe["l2"],
                      probe_converged=probe["converged"])
    result["eval_seconds"] = time.time() - t0
    return result


def save_features(path: str | Path, train: ImageFolderData, test: ImageFolderData,
                  features: dict[str, torch.Tensor]) -> None:
    """The features `evaluate` computed, with the file each row came from, as one .npz (written atomically)."""
    import numpy as np

    from embed.atomic import atomic_write

    arrays = {"train_paths": np.array([str(p) for p in train.paths]), "train_features": features["train"].numpy(),
              "test_paths": np.array([str(p) for p in test.paths]), "test_features": features["test"].numpy()}
    atomic_write(path, lambda f: np.savez(f, **arrays))


def main(argv: list[str] | None = None) -> int:
    from pretrain.train import run_command

    return run_command("eval", build_parser().parse_args(argv), _run)


def _run(args: argparse.Namespace) -> int:
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    ckpt = load_checkpoint(args.checkpoint)
    rule = training_rule(int(ckpt["config"]["data"]["image_size"]))
    train = load_folder(args.train, rule, workers=args.workers)
    test = load_folder(args.test, rule, workers=args.workers)
    features: dict[str, torch.Tensor] = {}
    result = evaluate(load_encoder(ckpt, device), ckpt["config"]["data"], train, test, k=args.k,
                      temperature=args.temperature, probe_iters=args.probe_iters, device=device,
                      batch_size=args.batch_size, features=features)
    if args.features_out:
        save_features(args.features_out, train, test, features)
    result.update(checkpoint=str(args.checkpoint), step=int(ckpt["step"]),
                  skipped_files=len(train.failures) + len(test.failures))
    out = Path(args.out) if args.out else Path(args.checkpoint).with_suffix(".eval.json")
    from embed.atomic import write_json_atomic

    write_json_atomic(out, result)
    print(json.dumps(result))
    return 0
