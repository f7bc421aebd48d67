"""SimCLR pretraining: `simsearch pretrain FOLDER --out RUN_DIR [flags]`.

One code path for one process and many: under `torchrun` the environment switches DDP on
(see pretrain/distributed.py); only rank 0 logs and saves. The run directory holds:

    config.json      the full config
    last.pt          the latest checkpoint (atomic; everything needed to resume exactly)
    metrics.jsonl    one JSON object per log step / kNN evaluation
    tb/              TensorBoard event files
    summary.json     the final figures (also printed as one JSON line)

`--resume` continues the run in RUN_DIR from last.pt: same step counter, LR schedule and data
order (only when to stop and how often to log may change; everything else comes from the checkpoint).

`train()` reads top to bottom; its pieces: `build.py` (model, optimizer, schedule, augmentation,
resume state, DDP), `batches.py` (this rank's batches), `step.py` (one optimisation step),
`stopping.py` (when to stop; rank 0 decides a time budget for every rank), `runlog.py`
(metrics.jsonl, TensorBoard, progress bar) and `checkpoint.py` (the state dict in and out).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pretrain import distributed
from pretrain.batches import RankBatches
from pretrain.build import Run, build_run
from pretrain.checkpoint import CheckpointError, load_checkpoint, run_state, save_checkpoint
from pretrain.config import ConfigError, PretrainConfig, add_config_flags, overrides_from_args
from pretrain.data import DataError, ImageFolderData, StreamingImageFolder, load_folder
from pretrain.features import extract_features
from pretrain.init import InitError, check_init
from pretrain.knn import knn_accuracy
from pretrain.runlog import RunLog, StepStats
from pretrain.schedule import schedule_of
from pretrain.step import injected_delay, train_step
from pretrain.stopping import StopPlan, ctrl_c_stops

logger = logging.getLogger(__name__)
RESUME_OVERRIDABLE = ("time_budget_min", "stop_after_steps", "log_every", "ckpt_every_min")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="simsearch pretrain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("folder", help="image folder (recursive); class sub-folders are ignored for training")
    p.add_argument("--out", required=True, help="run directory (checkpoints, logs)")
    p.add_argument("--config", help="JSON config file (flags given on the command line override it)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_config_flags(p)
    return p


def knn_monitor(model: Any, cfg: PretrainConfig, val: tuple[ImageFolderData, ImageFolderData], device: torch.device) -> float:
    bank, queries = val
    kw = dict(device=device, precision=cfg.train.precision, channels_last=cfg.train.channels_last)
    ftr = extract_features(model.encoder, bank.images, cfg.data.mean, cfg.data.std, **kw)
    fte = extract_features(model.encoder, queries.images, cfg.data.mean, cfg.data.std, **kw)
    return knn_accuracy(ftr, bank.labels, fte, queries.labels, k=cfg.train.knn_k, temperature=cfg.train.knn_temperature)


def train(
    cfg: PretrainConfig,
    data: ImageFolderData | StreamingImageFolder,
    out_dir: str | Path,
    *,
    resume: dict[str, Any] | None = None,
    val: tuple[ImageFolderData, ImageFolderData] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train on `data` (in memory or streamed), writing checkpoints and logs to `out_dir`; return the summary.

    Every rank returns the same step and stop reason, after rank 0 has written the final checkpoint.
    """
    t, out_dir = cfg.train, Path(out_dir)
    dist = distributed.setup(t.device)
    run = build_run(cfg, dist, len(data), resume=resume)
    spe = run.layout.steps_per_epoch
    batches = RankBatches(data, rank=dist.rank, world_size=dist.world_size, local_batch=run.layout.local_batch,
                          steps_per_epoch=spe, seed=t.seed, workers=cfg.data.workers, device=dist.device)
    if dist.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        cfg.save(out_dir / "config.json")
    log = RunLog(out_dir, enabled=dist.is_main, first_step=run.step, progress=progress,
                 total_steps=None if run.layout.adaptive else schedule_of(run.scheduler).total_steps)
    metrics: dict[str, Any] = {}  # the last logged figures, saved in every checkpoint

    def save() -> None:
        if dist.is_main:
            save_checkpoint(run_state(run, metrics, run.elapsed_before + time.time() - start), out_dir / "last.pt")

    def evaluate(epoch: float | None = None) -> None:
        metrics["knn_top1"] = knn_monitor(run.raw, cfg, val, dist.device)
        log.record({"step": run.step, **({} if epoch is None else {"epoch": epoch}), "knn_top1": metrics["knn_top1"]})

    # the loop: every rank runs the same steps; rank 0 alone decides a time budget's end (StopPlan)
    delay_s = injected_delay(dist.rank)
    first_step = run.step
    stats = StepStats(t.batch_size)
    plan = StopPlan(t, schedule_of(run.scheduler), adaptive=run.layout.adaptive, first_step=first_step,
                    device=dist.device)
    start = last_save = time.time()
    run.model.train()
    with ctrl_c_stops(plan, is_main=dist.is_main):
        while (stop_reason := plan.stop_reason(run.step)) is None:
            epoch, i = divmod(run.step, spe)
            if i == 0 and run.step > first_step and t.knn_every and val is not None and epoch % t.knn_every == 0 \
                    and dist.is_main:
                evaluate(epoch)
            result = train_step(run, batches, delay_s)
            stats.add(result)
            plan.after_step(run.step)
            postfix = {}
            if run.step % t.log_every == 0 or run.step == plan.total_steps:
                metrics.update(**stats.take_window(), lr=run.optimizer.param_groups[0]["lr"], epoch=run.step / spe,
                               aug_share=stats.aug_share)
                log.record({"step": run.step, **metrics})
                postfix = dict(loss=f"{metrics['loss']:.3f}", ep=f"{run.step / spe:.2f}", img_s=f"{metrics['images_per_s']:.0f}")
            log.advance(**postfix)
            if run.step % spe == 0 or time.time() - last_save > t.ckpt_every_min * 60:
                save()
                last_save = time.time()
    plan.close()  # no rank leaves with a broadcast in flight
    logger.info("rank %d/%d stopped at step %d (%s); schedule %d steps", dist.rank, dist.world_size, run.step,
                stop_reason, plan.total_steps)

    if val is not None and dist.is_main and stop_reason != "interrupted":
        evaluate()
    save()
    distributed.barrier(dist.device)  # every rank returns once the final checkpoint is on disk
    summary = run_summary(run, stats, stop_reason=stop_reason, train_seconds=time.time() - start, metrics=metrics,
                          out_dir=out_dir, skipped_files=len(data.failures))
    if dist.is_main:
        from embed.atomic import write_json_atomic

        write_json_atomic(out_dir / "summary.json", summary)
    log.close()
    return summary


def run_summary(run: Run, stats: StepStats, *, stop_reason: str, train_seconds: float, metrics: dict[str, Any],
                out_dir: Path, skipped_files: int) -> dict[str, Any]:
    return {
        "step": run.step, "epochs": run.step / run.layout.steps_per_epoch, "stop_reason": stop_reason,
        "train_seconds": train_seconds, "total_train_seconds": run.elapsed_before + train_seconds,
        "images_per_s": stats.images_per_s, "aug_share": stats.aug_share, "first_loss": stats.first_loss,
        "final_loss": metrics.get("loss"), "knn_top1": metrics.get("knn_top1"),
        "world_size": run.dist.world_size, "batch_per_rank": run.layout.local_batch, "device": str(run.dist.device),
        "checkpoint": str(out_dir / "last.pt"),
        "skipped_files": skipped_files,  # streaming: those met by this process
    }


# What `pretrain` and `eval` say in one line (exit 2), not as a traceback: the folder, the checkpoint
# or the init weights the user named are missing or unusable, a setting is wrong, or the folder is
# smaller than a batch.
USER_ERRORS = (FileNotFoundError, NotADirectoryError, CheckpointError, InitError, DataError, ConfigError)


def run_command(command: str, args: argparse.Namespace, run: Callable[[argparse.Namespace], int]) -> int:
    """`run(args)` with the log set up, a `USER_ERRORS` said in one line on stderr (exit 2)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except USER_ERRORS as e:
        print(f"simsearch {command}: error: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    return run_command("pretrain", build_parser().parse_args(argv), _run)


def _run(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    overrides = overrides_from_args(args)
    resume = None
    if args.resume:
        resume = load_checkpoint(out_dir / "last.pt")
        cfg = PretrainConfig.from_dict(resume["config"])
        cfg.train.stop_after_steps = 0  # that limit was for the earlier invocation
        for key in RESUME_OVERRIDABLE:  # when to stop this invocation; the run itself stays the same
            if key in overrides.get("train", {}):
                setattr(cfg.train, key, overrides["train"][key])
        logger.info("resuming %s at step %d", out_dir / "last.pt", resume["step"])
    else:
        cfg = PretrainConfig.load(args.config) if args.config else PretrainConfig()
        cfg = cfg.updated(overrides)
    cfg.data.folder = str(Path(args.folder).resolve())  # export verifies on this folder's images
    if cfg.train.init and not args.resume:  # before decoding the folder: a wrong file fails at once
        check_init(cfg.train.init, cfg.model)
    if cfg.data.in_memory:
        data = load_folder(args.folder, cfg.data.image_size, workers=cfg.data.workers, max_images=cfg.data.max_images,
                           progress=not args.no_progress)
    else:
        data = StreamingImageFolder(args.folder, cfg.data.image_size, cfg.data.max_images)
    val = None
    if cfg.train.val_train and cfg.train.val_test and int(os.environ.get("RANK", 0)) == 0:
        val = tuple(load_folder(f, cfg.data.image_size, workers=cfg.data.workers, progress=False)
                    for f in (cfg.train.val_train, cfg.train.val_test))
    try:
        summary = train(cfg, data, out_dir, resume=resume, val=val, progress=not args.no_progress)
    finally:
        distributed.cleanup()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(summary))
    if summary["stop_reason"] == "interrupted":  # Ctrl-C: the run stopped after a whole step, saved
        print(f"simsearch pretrain: interrupted at step {summary['step']}; checkpoint {out_dir / 'last.pt'} saved: "
              f"run `simsearch pretrain {args.folder} --out {out_dir} --resume` to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
