"""What a run reports as it goes: metrics.jsonl, TensorBoard scalars and the progress bar (rank 0 only).

`StepStats` keeps the figures (loss over the steps since the last log point, images/s, the
augmentation's share of the step time); `RunLog` writes them. On ranks other than 0 a `RunLog`
writes nothing, so the loop calls it the same way on every rank.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from pretrain.step import StepResult


class StepStats:
    """Running figures of this invocation's steps, and of the window since the last log point."""

    def __init__(self, batch_size: int) -> None:
        self.batch_size = batch_size
        self.steps, self.data_aug_s, self.step_s = 0, 0.0, 0.0
        self.first_loss: float | None = None
        self._window_loss, self._window_n, self._window_t = 0.0, 0, time.time()

    def add(self, result: StepResult) -> None:
        self.steps += 1
        self.data_aug_s += result.data_aug_s
        self.step_s += result.total_s
        self.first_loss = result.loss if self.first_loss is None else self.first_loss
        self._window_loss, self._window_n = self._window_loss + result.loss, self._window_n + 1

    @property
    def aug_share(self) -> float:
        return self.data_aug_s / max(self.step_s, 1e-9)

    @property
    def images_per_s(self) -> float:
        """Over the step time only (not logging, checkpoints or evaluation)."""
        return self.steps * self.batch_size / max(self.step_s, 1e-9)

    def take_window(self) -> dict[str, float]:
        """Mean loss and wall-clock images/s since the last call, then start a new window."""
        now = time.time()
        figures = {"loss": self._window_loss / max(self._window_n, 1),
                   "images_per_s": self._window_n * self.batch_size / max(now - self._window_t, 1e-9)}
        self._window_loss, self._window_n, self._window_t = 0.0, 0, now
        return figures


class RunLog:
    """metrics.jsonl (one JSON object per record), TensorBoard events in tb/, a tqdm bar; only when `enabled`."""

    def __init__(self, out_dir: Path, *, enabled: bool, first_step: int, total_steps: int | None, progress: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        self.enabled = enabled
        self.writer: Any = None
        self.metrics_file: Any = None
        if enabled:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(out_dir / "tb"), purge_step=first_step or None)
            self.metrics_file = (out_dir / "metrics.jsonl").open("a")
        self.bar = tqdm(total=total_steps, initial=first_step, disable=not (progress and enabled), unit="step",
                        dynamic_ncols=True)

    def record(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl; its numbers also as TensorBoard scalars at record["step"]."""
        if not self.enabled:
            return
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)):
                self.writer.add_scalar(key, value, record["step"])

    def advance(self, **postfix: str) -> None:
        """One step done; `postfix` (when given) replaces the figures shown beside the bar."""
        self.bar.update(1)
        if postfix:
            self.bar.set_postfix(**postfix)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.writer.close()
            self.metrics_file.close()
