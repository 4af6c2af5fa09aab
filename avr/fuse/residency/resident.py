"""The train split held in memory (on the device, or pinned on the host): an epoch's batches
drawn by ``avr.fuse.sampling`` and gathered from the held tensors."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from avr.fuse.ddp import SINGLE, World
from avr.fuse.sampling import CPU, epoch_batches, steps_per_epoch
from avr.store.quantize import Held
from avr.store.splits import SplitTensors


class ResidentSplit:
    """A resident train split behind the batch interface every train split shares
    (``avr.fuse.residency.TrainSplit``)."""

    stack_refusal = None  # stacked trials gather their batches from it like one run

    def __init__(self, data: SplitTensors):
        self.data = data
        self.spec = data.spec

    @property
    def num_videos(self) -> int:
        return self.data.num_videos

    @property
    def caption_video(self) -> torch.Tensor:
        return self.data.caption_video

    def batches(self, config, epoch: int, world: World = SINGLE, device: torch.device = CPU
                ) -> Iterator[tuple[dict[str, Held], dict[str, Held], list[int]]]:
        """The epoch's batches in ``epoch_batches`` order as (video rows, caption rows, rows per
        shard), gathered where the split is held (``device``: where the shards' counts are
        exchanged under torchrun)."""
        rows_device = self.data.caption_video.device
        for videos, captions, counts in epoch_batches(self.data, config, epoch, world, device):
            yield (self.data.video_rows(videos.to(rows_device)),
                   self.data.caption_rows(captions.to(rows_device)), counts)

    def steps_per_epoch(self, config, world: World = SINGLE, device: torch.device = CPU) -> int:
        return steps_per_epoch(self.data, config, world, device)
