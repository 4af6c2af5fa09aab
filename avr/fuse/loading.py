"""A store's train and val splits loaded once for a run (and shared by every trial of a sweep),
held as the run's residency plan says.

- ``require_head_arrays``: a store that leaves an array the head reads unwritten on purpose is
  refused before anything is loaded;
- ``load_cache``: the plan, then train (a ``TrainSplit``: resident or streamed) and val;
- ``place_split``: a loaded split moved where a plan's mode holds it (device, or pinned host).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from avr.errors import AvrError
from avr.fuse import ddp
from avr.fuse.config import TrainConfig
from avr.fuse.ddp import World
from avr.fuse.heads import head_class, video_inputs
from avr.fuse.residency import (ResidencyPlan, ResidentSplit, StreamedSplit, TrainSplit,
                                plan_residency)
from avr.store import schema
from avr.store.group import open_store
from avr.store.identity import store_identity
from avr.store.location import store_location
from avr.store.read import require_arrays_written
from avr.store.splits import SplitTensors, StoreRows, load_split


@dataclass
class CacheData:
    """The train and val splits of a store. On a rank of several: its shard of train, and val on
    rank 0 only (it alone validates). ``plan`` says where they are held."""

    path: Path
    spec: schema.CacheSpec
    train: TrainSplit
    val: SplitTensors | None
    plan: ResidencyPlan | None = None
    identity: dict[str, Any] | None = None  # what a run records of the store (avr.store.identity)


def require_head_arrays(cache: str | Path, head: str, *options: dict) -> None:
    """Refuse a store that leaves an array the head reads (built with any of ``options``)
    unwritten on purpose."""
    _, spec = open_store(cache)
    require_arrays_written(cache, (*video_inputs(head, *options, spec=spec),
                                   *head_class(head).caption_inputs))


def load_cache(path: str | Path, head: str, device: torch.device,
               world: World = ddp.SINGLE, *,
               head_options: list[dict[str, Any]] | None = None,
               config: TrainConfig | None = None,
               saved_residency: dict[str, Any] | None = None) -> CacheData:
    """Load train (this rank's shard of it) and val with the arrays ``head`` needs when built
    with any of ``head_options`` (default: its default options), held as the residency plan for
    ``config``'s memory budget and ``resident`` says (``saved_residency``: a resumed run's)."""
    config = config or TrainConfig(head=head)
    cls = head_class(head)
    path = store_location(path)
    videos = video_inputs(head, *(head_options or [{}]), spec=open_store(path)[1])
    plan = plan_residency(path, config, device, videos, cls.caption_inputs, world,
                          saved=saved_residency, blockwise=not cls.has_own_loss())
    shard = (world.rank, world.size) if world.is_distributed else None
    if plan.train.mode == "streamed":
        train = StreamedSplit(path, videos, cls.caption_inputs, config.resident, plan.stream)
    else:
        resident = load_split(path, "train", videos, cls.caption_inputs, shard=shard,
                              resident=config.resident)
        train = ResidentSplit(place_split(resident, plan.train.mode, device))
    _refuse_empty(path, "train", train.num_videos, shard)
    if shard is None and train.num_videos < 2:
        raise AvrError(f"{path}: the train split has {train.num_videos} extracted video; a batch "
                       f"needs at least 2 (InfoNCE needs a negative), so no step could train")
    val = None
    if world.is_main:
        val = load_split(path, "val", videos, cls.caption_inputs, resident=config.resident,
                         tokens_in_store=plan.val.mode == "streamed")
        _refuse_empty(path, "val", val.num_videos, None)
        val = place_split(val, plan.val.mode, device)
    return CacheData(path, train.spec, train, val, plan, store_identity(*open_store(path)))


def _refuse_empty(path, split: str, videos: int, shard: tuple[int, int] | None) -> None:
    if videos == 0:
        where = f"shard {shard[0]} of {shard[1]} of " if shard else ""
        raise AvrError(f"{path}: {where}the {split} split has no extracted videos")


def place_split(data: SplitTensors, mode: str, device: torch.device) -> SplitTensors:
    """A split where the plan holds it (``mode``): moved to the device, or pinned on the host of
    a CUDA device (each batch is then copied without blocking); arrays left in the store stay."""
    if mode == "device":
        return data.to(device)
    if mode == "host" and device.type == "cuda":
        data.videos, data.captions = _pinned(data.videos), _pinned(data.captions)
    return data


def _pinned(arrays: dict) -> dict:
    return {name: value if isinstance(value, StoreRows) else value.pin_memory()
            for name, value in arrays.items()}
