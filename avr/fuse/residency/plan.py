"""Where a run's cached arrays live: the residency plan of a run, from the bytes of the arrays
its head reads (as held: 16-bit as stored, or int8 tokens with ``resident="int8"``) and a memory
budget.

- ``device``: train and val fit the budget on the device (on the CPU the device is the host);
- ``host``: they fit on the host (CUDA only); each batch moves to the device, pinned;
- ``streamed``: the train split is read from the store during the epoch
  (``avr.fuse.residency.stream``); val stays resident when it fits beside the stream, else it
  too is read from the store, a batch of rows at a time, at every validation.

The budget (``memory_budget`` GB, ``--memory-budget``) caps the cached tensors held; by default
it is what fits with headroom: ``GPU_SHARE`` of the free GPU memory for the device, ``HOST_SHARE``
of the available RAM for the host. With a budget, ``WORK_SHARE`` of it bounds a training step's
activations and validation's blocks (``work_bytes``, ``step_video_block``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avr.errors import AvrError
from avr.fuse.ddp import World
from avr.store import schema
from avr.store.group import open_store
from avr.store.quantize import is_token_array
from avr.store.read import chunk_rows
from avr.store.splits import split_size

GPU_SHARE = 0.8  # of the free GPU memory, by default, for the device-resident splits
HOST_SHARE = 0.5  # of the available RAM, by default, for the host-resident splits
READ_AHEAD = 2  # reads ahead of use, on as many threads
READ_BYTES = 64 * 2**20  # a read takes this much of the store's chunks, when the budget has room
BUFFER_BATCHES = 8  # the shuffle buffer, by default, in batches (less when the budget is tight)
# With --memory-budget, this share of it bounds the working memory beside the cached arrays: a
# training step's activations and validation's encode and scoring blocks (not held together).
WORK_SHARE = 0.5
# A training step's activations per video of the batch, in copies of the video's 16-bit cached
# row (TEFAL on VATEX shapes, measured: 11.6 - a float32 copy of the AST tokens, their
# projection, LayerNorm, keys and values, and the gradients of each).
STEP_COPIES = 12
BATCH_RING = 2  # batches a streamed epoch gathers into in turn (``RowSlots``)
GB = 1e9


@dataclass
class SplitResidency:
    mode: str  # device | host | streamed
    bytes: int  # the split's arrays as held (int8 tokens with resident="int8")
    videos: int
    captions: int


@dataclass
class StreamSettings:
    chunk_videos: int  # video rows per Zarr chunk
    chunk_bytes: int  # one chunk's videos and the captions read with them, 16-bit
    read_ahead: int  # reads ahead of use, on as many threads
    buffer_pairs: int  # the shuffle buffer
    held_bytes: int  # what streaming holds at most: read-ahead + buffer + two batches
    chunks_per_read: int = 1  # chunks, consecutive in the epoch's order, read in one call


@dataclass
class ResidencyPlan:
    train: SplitResidency
    val: SplitResidency | None  # None on a rank that does not validate
    budget_bytes: int
    budget_source: str  # "--memory-budget", or how the default was chosen
    resident: str  # fp16 | int8
    device: str
    stream: StreamSettings | None = None
    # With --memory-budget: bytes for a step's activations or validation's blocks, and the
    # videos of a training batch encoded and scored at a time (0: the whole batch).
    work_bytes: int | None = None
    step_videos: int = 0

    def describe(self) -> str:
        """The plan in one line, as a run prints it."""
        budget = f"a budget of {size_text(self.budget_bytes)} ({self.budget_source})"
        tokens = "tokens int8" if self.resident == "int8" else "tokens 16-bit as stored"
        if self.train.mode != "streamed":
            return (f"residency: train and val on the {self.train.mode} ({self.device}), "
                    f"{size_text(self.held_bytes())} of {budget}; {tokens}{self._work()}")
        s = self.stream
        val = ""
        if self.val is not None:
            val = (f"; val ({size_text(self.val.bytes)}) "
                   + ("streamed too, a batch of rows at a time" if self.val.mode == "streamed"
                      else f"resident on the {self.val.mode}"))
        return (f"residency: train streamed from the store ({size_text(self.train.bytes)} > "
                f"{budget}; {tokens}): chunks of {s.chunk_videos} videos "
                f"({size_text(s.chunk_bytes)}) read {s.chunks_per_read} at a time, "
                f"{s.read_ahead} reads ahead, shuffle buffer "
                f"{s.buffer_pairs} pairs, at most {size_text(s.held_bytes)} held{val}"
                f"{self._work()}")

    def _work(self) -> str:
        if self.work_bytes is None:
            return ""
        steps = (f"a batch's videos {self.step_videos} at a time, recomputed in backward"
                 if self.step_videos else "whole batches")
        return f"; working memory {size_text(self.work_bytes)}: {steps}"

    def held_bytes(self) -> int:
        return self.train.bytes + (self.val.bytes if self.val else 0)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def size_text(nbytes: int) -> str:
    for unit, scale in (("GB", GB), ("MB", 1e6)):
        if nbytes >= 0.1 * scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1e3:.1f} kB"


# ---- the plan ----------------------------------------------------------------------------------

def memory_budget(device: torch.device, memory_budget: float | None) -> tuple[int, int, str]:
    """(device budget, host budget, where they come from) in bytes: ``memory_budget`` GB for
    both, no more than fits on the device; by default what fits with headroom."""
    import psutil

    host = int(HOST_SHARE * psutil.virtual_memory().available)
    on_device = host
    if device.type == "cuda":
        on_device = int(GPU_SHARE * torch.cuda.mem_get_info(device)[0])
    if memory_budget is not None:
        given = int(memory_budget * GB)
        return min(given, on_device), given, "--memory-budget"
    source = (f"{GPU_SHARE:.0%} of free GPU memory, {HOST_SHARE:.0%} of available RAM"
              if device.type == "cuda" else f"{HOST_SHARE:.0%} of available RAM")
    return on_device, host, source


def plan_residency(path: str | Path, config, device: torch.device, video_names: tuple[str, ...],
                   caption_names: tuple[str, ...], world: World, *,
                   saved: dict[str, Any] | None = None, blockwise: bool = True) -> ResidencyPlan:
    """The plan of a run of ``config`` (a TrainConfig) reading these arrays of the store at
    ``path`` (module docstring). ``saved``: the ``residency`` a resumed run recorded, whose
    train order (resident, or streamed with its shuffle buffer) and training step (a batch's
    videos at once or a block at a time: dropout draws its masks per block) it keeps.
    ``blockwise``: whether the head's loss can take a batch's videos a block at a time
    (``step_video_block``)."""
    group, _ = open_store(path)
    sizes = StoreSizes(group, video_names, caption_names, config.resident)
    plan = _plan_splits(config, device, sizes, world, saved)
    plan.step_videos = config.video_block or 0
    if saved is not None:
        plan.step_videos = saved.get("step_videos", 0)
    if config.memory_budget is not None:
        plan.work_bytes = work_bytes(config.memory_budget)
        if saved is None and config.video_block is None and blockwise \
                and not world.is_distributed:
            plan.step_videos = step_video_block(config.batch_size or 128, sizes.video_row16,
                                                plan.work_bytes)
    return plan


def work_bytes(memory_budget: float | None) -> int | None:
    """The working memory ``--memory-budget`` GB allows beside the cached arrays (None: no
    budget given, the fixed block sizes of :mod:`avr.evaluate.score`)."""
    return None if memory_budget is None else int(WORK_SHARE * memory_budget * GB)


def step_video_block(batch: int, video_row16: int, work_bytes: int) -> int:
    """Videos of a training batch to encode and score at a time so that a step's activations
    (``STEP_COPIES`` per video) fit ``work_bytes``; 0 when the whole batch does."""
    per_video = STEP_COPIES * video_row16
    return 0 if batch * per_video <= work_bytes else max(1, work_bytes // per_video)


def _plan_splits(config, device: torch.device, sizes: StoreSizes, world: World,
                 saved: dict[str, Any] | None) -> ResidencyPlan:
    train = sizes.split("train", "device")
    val = sizes.split("val", "device") if world.is_main else None
    on_device, host, source = memory_budget(device, config.memory_budget)
    plan = ResidencyPlan(train, val, host, source, config.resident, str(device))
    needed = plan.held_bytes()
    saved_mode = (saved or {}).get("train", {}).get("mode", "device")
    if saved_mode != "streamed" and needed <= on_device:
        plan.budget_bytes = on_device
        return plan
    if saved_mode != "streamed" and device.type == "cuda" and needed <= host:
        train.mode = "host"
        if val is not None:
            val.mode = "host"
        return plan
    if saved is not None and saved_mode != "streamed":
        raise AvrError(f"this run trained with its train split resident ({needed / GB:.2f} GB "
                       f"with val), which the budget of {host / GB:.2f} GB ({source}) cannot "
                       f"hold: resume it with --memory-budget {needed / GB * 1.05:.2f} or more "
                       f"(streaming would change the order its epochs draw pairs in)")
    if world.is_distributed or config.shards > 1:
        raise AvrError(f"the train split ({train.bytes / GB:.2f} GB) does not fit the budget of "
                       f"{host / GB:.2f} GB ({source}) and a run of several shards cannot "
                       f"stream it: raise --memory-budget, or train with shards=1 in one process")
    train.mode = "streamed"
    buffer = (saved or {}).get("stream", {}).get("buffer_pairs")
    plan.stream = sizes.stream_settings(config, host, val, buffer)
    if val is not None:
        resident = "host" if device.type == "cuda" else "device"
        val.mode = resident if sizes.val_fits(host, plan.stream, val) else "streamed"
    plan.budget_bytes = host
    return plan


class StoreSizes:
    """Bytes of the arrays a run reads, per row as held, from the store's metadata."""

    def __init__(self, group, video_names, caption_names, resident: str):
        self.group, self.resident = group, resident
        self.video_row = sum(self._row(group[n]) for n in video_names)
        self.caption_row = sum(self._row(group[n]) for n in caption_names)
        self.video_row16 = sum(self._row(group[n], 16) for n in video_names)
        self.caption_row16 = sum(self._row(group[n], 16) for n in caption_names)
        self.chunk_videos = chunk_rows(group[schema.VIDEO_DONE])

    def _row(self, array, bits: int | None = None) -> int:
        shape = array.shape[1:]
        values = int(np.prod(shape))
        if bits is None and self.resident == "int8" and is_token_array(array.shape, array.dtype):
            return values + 2 * int(np.prod(shape[:-1]))  # an int8 per value, fp16 per token
        return values * array.dtype.itemsize

    def split(self, split: str, mode: str) -> SplitResidency:
        videos, captions = split_size(self.group, split)
        return SplitResidency(mode, videos * self.video_row + captions * self.caption_row,
                              videos, captions)

    def stream_settings(self, config, budget: int, val: SplitResidency | None,
                        buffer_pairs: int | None) -> StreamSettings:
        """Read size, read-ahead and shuffle buffer that fit ``budget`` (with val beside them if
        it fits); an error when not even one chunk and two batches do. A read takes several
        chunks (up to ``READ_BYTES``) where that leaves the shuffle buffer its room: each store
        call has a fixed cost (small arrays such as masks cost as much to fetch as a chunk of
        tokens), which a read of several chunks pays once, decoding them side by side."""
        batch = config.batch_size or 128
        videos, captions = split_size(self.group, "train")
        captions_read = 1 if config.pairs == "one" else max(1, round(captions / max(videos, 1)))
        chunk_pairs = self.chunk_videos * captions_read
        chunk_bytes = self.chunk_videos * (self.video_row16 + captions_read * self.caption_row16)
        pair = self.video_row + self.caption_row
        batch_bytes = batch * (self.video_row16 + self.caption_row16)

        def held(read_ahead, buffer, per_read=1):  # reads in flight, the rows of the one
            return (read_ahead * per_read * chunk_bytes  # arriving, the buffer, two batches
                    + per_read * chunk_pairs * pair + buffer * pair + BATCH_RING * batch_bytes)

        least = held(1, buffer_pairs or 0)
        if least > budget:
            what = (f"one chunk of the train split ({self.chunk_videos} videos, "
                    f"{size_text(chunk_bytes)} read) and two batches ({batch} pairs, "
                    f"{size_text(batch_bytes)} each)")
            if buffer_pairs:
                what += f" and the run's shuffle buffer of {buffer_pairs} pairs"
            raise AvrError(f"--memory-budget {budget / GB:.3g} GB cannot hold {what}: give at "
                           f"least {least / GB * 1.01:.3g} GB")
        room = budget - (val.bytes if val is not None and held(1, 0) + val.bytes <= budget
                         else 0)
        wanted = buffer_pairs if buffer_pairs is not None else \
            config.shuffle_buffer or BUFFER_BATCHES * batch
        kept_for_buffer = min(wanted * pair, room // 2)
        per_read = max(1, READ_BYTES // max(chunk_bytes, 1))
        while per_read > 1 and held(READ_AHEAD, 0, per_read) + kept_for_buffer > room:
            per_read //= 2
        read_ahead = READ_AHEAD if held(READ_AHEAD, buffer_pairs or 0, per_read) <= room else 1
        if buffer_pairs is None:
            buffer_pairs = int(max(0, min(wanted, (room - held(read_ahead, 0, per_read)) // pair)))
            if config.shuffle_buffer and buffer_pairs < config.shuffle_buffer:
                raise AvrError(f"shuffle_buffer={config.shuffle_buffer} pairs do not fit the "
                               f"budget of {budget / GB:.3g} GB beside the read-ahead "
                               f"({buffer_pairs} do): raise --memory-budget or lower it")
        return StreamSettings(self.chunk_videos, chunk_bytes, read_ahead, buffer_pairs,
                              held(read_ahead, buffer_pairs, per_read), per_read)

    @staticmethod
    def val_fits(budget: int, stream: StreamSettings, val: SplitResidency) -> bool:
        return stream.held_bytes + val.bytes <= budget


def split_fits(path: str | Path, split: str, video_names: tuple[str, ...],
               caption_names: tuple[str, ...], resident: str, device: torch.device,
               budget_gb: float | None) -> tuple[bool, SplitResidency, int, str]:
    """Whether ``split``'s arrays, held as ``resident`` says, fit the memory budget (the
    host's: evaluation reads rows from wherever they are held); with its size and the budget."""
    group, _ = open_store(path)
    size = StoreSizes(group, video_names, caption_names, resident).split(split, "host")
    _, host, source = memory_budget(device, budget_gb)
    return size.bytes <= host, size, host, source
