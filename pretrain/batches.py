"""This rank's uint8 batches, addressed by the global step.

The batch for a step is the same whatever step the run (re)started from: `EpochSampler` fixes
each epoch's order by (seed, epoch) and skips the batches an interrupted epoch already used.
In memory, the whole uint8 set goes on the device when it is a GPU (CIFAR-10 is 150 MB); a
streamed folder is decoded per batch by DataLoader workers.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader

from pretrain.data import EpochSampler, ImageFolderData, StreamingImageFolder


class RankBatches:
    """uint8 [local_batch, 3, S, S] batches of this rank; `batch(step)` is called for consecutive steps."""

    def __init__(
        self, data: ImageFolderData | StreamingImageFolder, *, rank: int, world_size: int, local_batch: int,
        steps_per_epoch: int, seed: int, workers: int, device: torch.device,
    ) -> None:
        self.data, self.local_batch, self.steps_per_epoch = data, local_batch, steps_per_epoch
        self.workers, self.device = workers, device
        self.sampler = EpochSampler(len(data), rank, world_size, seed)
        self.streaming = isinstance(data, StreamingImageFolder)
        self.images = None if self.streaming else data.images.to(device) if device.type == "cuda" else data.images
        self._epoch, self._batches = -1, iter(())

    def batch(self, step: int) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._batches = epoch, self._epoch_batches(epoch, i)
        return next(self._batches)

    def _epoch_batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        """The batches of `epoch` from batch `start` on (same order whatever the start)."""
        self.sampler.set_epoch(epoch, start * self.local_batch)
        if self.streaming:
            loader = DataLoader(self.data, batch_size=self.local_batch, sampler=self.sampler, num_workers=self.workers,
                                drop_last=True, pin_memory=self.device.type == "cuda", worker_init_fn=_ignore_ctrl_c)
            yield from (x for x, _ in loader)
            return
        idx = self.sampler.indices().to(self.images.device)
        for k in range(self.steps_per_epoch - start):
            yield self.images[idx[k * self.local_batch : (k + 1) * self.local_batch]]


def _ignore_ctrl_c(worker_id: int) -> None:
    """A decoding worker lets Ctrl-C be the training process's: it stops after the step, with a checkpoint."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
