"""Where a run's cached arrays live, and the one interface a train split offers the trainers.

- ``plan``: the residency plan (device, pinned host or streamed) under a memory budget;
- ``resident``: a train split held in memory (``ResidentSplit``);
- ``stream``: a train split read from the store during each epoch (``StreamedSplit``).

Every train split is a ``TrainSplit``: the solo and the stacked trainer ask it for an epoch's
``batches`` and its ``steps_per_epoch`` and never ask which kind it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch

from avr.fuse.ddp import World
from avr.fuse.residency.plan import ResidencyPlan, StreamSettings, plan_residency, split_fits
from avr.fuse.residency.resident import ResidentSplit
from avr.fuse.residency.stream import StreamedSplit
from avr.store.quantize import Held

__all__ = ["ResidencyPlan", "ResidentSplit", "StreamSettings", "StreamedSplit", "TrainSplit",
           "plan_residency", "split_fits"]


class TrainSplit(Protocol):
    """What the trainers read of a train split."""

    spec: object
    # None when trials may train side by side on it (``avr.fuse.stacked``), else why not
    stack_refusal: str | None

    @property
    def num_videos(self) -> int: ...

    @property
    def caption_video(self) -> torch.Tensor: ...

    def batches(self, config, epoch: int, world: World, device: torch.device
                ) -> Iterator[tuple[dict[str, Held], dict[str, Held], list[int]]]:
        """(video rows, caption rows, rows per shard) of each batch of ``epoch``, rows held as
        the split holds them (``avr.store.quantize.on_device`` moves them)."""

    def steps_per_epoch(self, config, world: World, device: torch.device) -> int:
        """Batches of an epoch as the learning-rate schedule counts them."""
