"""Where a run's cached arrays live: the residency plan, and the train split streamed from the
store when it fits nowhere.

``plan_residency`` decides, per run, from the bytes of the arrays the head reads (as held:
16-bit as stored, or int8 tokens with ``resident="int8"``) and a memory budget:

- ``device``: train and val fit the budget on the device (on the CPU the device is the host);
- ``host``: they fit on the host (CUDA only); each batch moves to the device, pinned;
- ``streamed``: the train split is read from the Zarr store during the epoch (``StreamedSplit``);
  val stays resident when it fits beside the stream, else it too is read from the store, a batch
  of rows at a time, at every validation.

The budget (``memory_budget`` GB, ``--memory-budget``) caps the cached tensors held; by default
it is what fits with headroom: ``GPU_SHARE`` of the free GPU memory for the device, ``HOST_SHARE``
of the available RAM for the host.

Streaming. The split's videos are read a whole Zarr chunk of video rows at a time (every video
array shares one chunking), with the captions an epoch pairs with them, on ``read_ahead``
background threads a bounded number of chunks ahead of use. An epoch's order is a function of
(seed, epoch) alone (``StreamedSplit.epoch_order``): the chunks in a random order; within each
chunk its pairs drawn as the resident sampler draws them (one random caption per video, or every
caption); the pairs pass through a shuffle buffer of ``buffer_pairs`` (each arriving pair takes
the place of a random one, which leaves), and what leaves is cut into batches, each video at most
once per batch. So a batch mixes pairs from the chunks of the last ``buffer_pairs`` pairs, not
from the whole split; every row is read once per epoch; memory holds the buffer's rows, the chunks
read ahead and two batches (``StreamSettings.held_bytes``). The rows held sit in slots allocated once
per epoch for the most rows the epoch's order ever holds at once (``RowSlots``), and batches are
gathered into two buffers in turn, so assembling a batch copies rows into memory already
allocated rather than allocating per row. A resumed run recomputes its epoch's order
from (seed, epoch) and the buffer size it recorded.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avr import schema
from avr.errors import AvrError
from avr.fuse.data import _require_captions_done, read_held, split_rows, split_size
from avr.fuse.distributed import World
from avr.fuse.quantize import Held, QuantizedTokens, is_token_array
from avr.fuse.sampling import distinct_videos, draw_pairs
from avr.integrity import chunk_rows, read_rows, will_read

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
    group, _ = schema.open_store(path)
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
    group, _ = schema.open_store(path)
    size = StoreSizes(group, video_names, caption_names, resident).split(split, "host")
    _, host, source = memory_budget(device, budget_gb)
    return size.bytes <= host, size, host, source


# ---- the streamed train split ------------------------------------------------------------------

@dataclass
class EpochOrder:
    """One streamed epoch: the chunks in reading order, and each batch's (video rows, caption
    rows) with how many chunks must have arrived before it."""

    chunks: list[int]
    batches: list[tuple[np.ndarray, np.ndarray]]
    ready: list[int]


class StreamedSplit:
    """The train split read from the store during each epoch (module docstring). Holds only its
    row indices; ``batches`` yields an epoch's batches of rows as ``epoch_batches`` + gathering
    would, from chunks read on background threads."""

    split = "train"

    def __init__(self, path: str | Path, video_names: tuple[str, ...],
                 caption_names: tuple[str, ...], resident: str, stream: StreamSettings):
        self.group, self.spec = schema.open_store(path)
        self.video_names, self.caption_names = video_names, caption_names
        self.resident, self.stream = resident, stream
        self.video_store_rows = split_rows(self.group, "train").done
        caption_video_all = read_rows(self.group[schema.CAPTION_VIDEO])
        store_to_local = np.full(self.group[schema.VIDEO_DONE].shape[0], -1, dtype=np.int64)
        store_to_local[self.video_store_rows] = np.arange(len(self.video_store_rows))
        local = store_to_local[caption_video_all]
        self.caption_store_rows = np.flatnonzero(local >= 0)
        if caption_names:
            _require_captions_done(path, "train", self.group, self.caption_store_rows)
        self.caption_video = torch.from_numpy(local[self.caption_store_rows])
        self.video_ids = [str(v) for v in read_rows(self.group[schema.VIDEO_ID],
                                                    self.video_store_rows)]
        chunk_of = self.video_store_rows // chunk_rows(self.group[schema.VIDEO_DONE])
        starts = np.flatnonzero(np.r_[True, chunk_of[1:] != chunk_of[:-1]])
        self.chunk_bounds = list(zip(starts, np.r_[starts[1:], len(chunk_of)]))
        by_video = np.argsort(self.caption_video.numpy(), kind="stable")
        edges = np.searchsorted(self.caption_video.numpy()[by_video],
                                [b for b, _ in self.chunk_bounds] + [len(chunk_of)])
        self.chunk_captions = [np.sort(by_video[a:b]) for a, b in zip(edges[:-1], edges[1:])]

    @property
    def num_videos(self) -> int:
        return len(self.video_store_rows)

    def epoch_order(self, config, epoch: int) -> EpochOrder:
        """The epoch's chunks and batches, from (seed, epoch) and the shuffle buffer alone."""
        rng = np.random.default_rng([config.seed, epoch])
        generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        chunks = rng.permutation(len(self.chunk_bounds)).tolist()
        buffer: list[tuple[int, int, int]] = []
        out: list[tuple[int, int, int]] = []  # (video, caption, chunks arrived before it)
        size = self.stream.buffer_pairs
        for arrived, chunk in enumerate(chunks, 1):
            captions = self.chunk_captions[chunk]
            videos, picked = draw_pairs(self.caption_video[captions], config.pairs, generator)
            for pair in zip(videos.tolist(), captions[picked.numpy()].tolist()):
                if len(buffer) < size:
                    buffer.append((*pair, arrived))
                    continue
                if size:
                    slot = int(rng.integers(size))
                    pair, buffer[slot] = buffer[slot][:2], (*pair, arrived)
                out.append((*pair, arrived))
        out += [(v, c, len(chunks)) for k in rng.permutation(len(buffer))
                for v, c, _ in [buffer[k]]]
        batches, ready = [], []
        for start in range(0, len(out), config.batch_size):
            part = np.asarray(out[start:start + config.batch_size], dtype=np.int64)
            videos, captions = distinct_videos(torch.from_numpy(part[:, 0]),
                                               torch.from_numpy(part[:, 1]))
            if len(videos) >= 2:
                batches.append((videos.numpy(), captions.numpy()))
                ready.append(int(part[:, 2].max()))
        return EpochOrder(chunks, batches, ready)

    def batches(self, config, epoch: int) -> Iterator[tuple[dict[str, Held], dict[str, Held],
                                                            list[int]]]:
        """The epoch's batches as (video arrays, caption arrays, [pairs]), each row read once:
        an arriving chunk's rows that the epoch uses are copied into free slots of ``RowSlots``
        (a chunk's memory goes as soon as it is copied) and stay until their last batch. A
        batch's tensors are reused for the batch after the next: use or copy them before."""
        order = self.epoch_order(config, epoch)
        uses = Counter(v for videos, _ in order.batches for v in videos.tolist())
        wanted = np.zeros(len(self.caption_video), dtype=bool)
        for _, captions in order.batches:
            wanted[captions] = True
        most_videos, most_captions = self._most_held(order, uses, wanted)
        videos_held = RowSlots(most_videos, max((len(v) for v, _ in order.batches), default=0))
        captions_held = RowSlots(most_captions, max((len(c) for _, c in order.batches), default=0))
        with ChunkReader(self, order.chunks, wanted) as reader:
            for (videos, captions), ready in zip(order.batches, order.ready):
                while reader.arrived < ready:
                    video_rows, video_arrays, caption_rows, caption_arrays = reader.next()
                    used = np.asarray([uses[v] > 0 for v in video_rows.tolist()], dtype=bool)
                    videos_held.put(video_rows[used], video_arrays, np.flatnonzero(used))
                    captions_held.put(caption_rows, caption_arrays)
                yield videos_held.take(videos), captions_held.take(captions), [len(videos)]
                captions_held.release(captions)
                for v in videos.tolist():
                    uses[v] -= 1
                videos_held.release([v for v in set(videos.tolist()) if not uses[v]])

    def _most_held(self, order: EpochOrder, uses: Counter, wanted: np.ndarray) -> tuple[int, int]:
        """The most video rows and caption rows held at once during the epoch ``order``."""
        remaining = Counter(uses)
        videos = captions = most_videos = most_captions = arrived = 0
        for (batch_videos, batch_captions), ready in zip(order.batches, order.ready):
            while arrived < ready:  # as ChunkReader delivers them: a read at a time
                for chunk in order.chunks[arrived:arrived + self.stream.chunks_per_read]:
                    start, stop = self.chunk_bounds[chunk]
                    videos += sum(1 for v in range(start, stop) if remaining[v])
                    captions += int(wanted[self.chunk_captions[chunk]].sum())
                arrived += self.stream.chunks_per_read
            most_videos, most_captions = max(most_videos, videos), max(most_captions, captions)
            captions -= len(batch_captions)
            for v in batch_videos.tolist():
                remaining[v] -= 1
                videos -= remaining[v] == 0
        return most_videos, most_captions

    def read_chunks(self, chunks: list[int], wanted_captions: np.ndarray
                    ) -> tuple[np.ndarray, dict[str, Held], np.ndarray, dict[str, Held]]:
        """The video rows of ``chunks`` and the wanted captions of their videos, as held (rows
        ascending; each array read as slices over runs of consecutive chunks, its files first
        handed to the kernel to read ahead)."""
        videos, captions = self._rows_of(chunks)
        self.will_read(videos, captions)
        captions = captions[wanted_captions[captions]]
        video_arrays = {name: read_held(self.group[name], self.video_store_rows[videos],
                                        self.resident) for name in self.video_names}
        caption_arrays = {name: read_held(self.group[name], self.caption_store_rows[captions],
                                          self.resident) for name in self.caption_names}
        return videos, video_arrays, captions, caption_arrays

    def will_read(self, videos: np.ndarray, captions: np.ndarray) -> None:
        """Have the kernel read ahead the chunk files under these split rows of videos and
        captions (``integrity.will_read``)."""
        for names, rows in ((self.video_names, self.video_store_rows[videos]),
                            (self.caption_names, self.caption_store_rows[captions])):
            for name in names:
                will_read(self.group[name], rows)

    def _rows_of(self, chunks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The split's video rows of ``chunks`` and their videos' caption rows, ascending."""
        videos = np.sort(np.concatenate([np.arange(*self.chunk_bounds[c]) for c in chunks]))
        return videos, np.sort(np.concatenate([self.chunk_captions[c] for c in chunks]))


class ChunkReader:
    """Chunks of a streamed split read in ``chunks`` order on background threads,
    ``chunks_per_read`` at a time, at most ``read_ahead`` reads ahead of the one in use;
    ``arrived`` counts the chunks delivered."""

    def __init__(self, split: StreamedSplit, chunks: list[int], wanted_captions: np.ndarray):
        per_read = split.stream.chunks_per_read
        self.reads = [chunks[k:k + per_read] for k in range(0, len(chunks), per_read)]
        self.split, self.wanted = split, wanted_captions
        self.pool = ThreadPoolExecutor(split.stream.read_ahead, thread_name_prefix="avr-stream")
        self.pending: deque[tuple[int, Future]] = deque()
        self.submitted = self.arrived = 0

    def __enter__(self) -> ChunkReader:
        self._top_up()
        return self

    def __exit__(self, *exc) -> None:
        for _, future in self.pending:
            future.cancel()
        self.pool.shutdown(wait=True)

    def _top_up(self) -> None:
        while len(self.pending) < self.split.stream.read_ahead and \
                self.submitted < len(self.reads):
            read = self.reads[self.submitted]
            self.pending.append((len(read), self.pool.submit(self.split.read_chunks, read,
                                                             self.wanted)))
            self.submitted += 1

    def next(self):
        count, future = self.pending.popleft()
        rows = future.result()
        self.arrived += count
        self._top_up()
        return rows


class RowSlots:
    """Rows of a streamed split between the chunk that brings them and their last batch: one
    tensor per array of ``capacity`` rows and a free list of its slots, and ``BATCH_RING``
    batches of ``batch_rows`` rows that batches are gathered into in turn, all allocated at the
    first chunk. A chunk's rows are copied into their slots, and a batch's rows gathered from
    theirs into memory already mapped: fresh tensors of a batch's size would be mapped anew for
    each batch, and filling new pages costs more than the copy.
    So a batch's tensors are valid until the batch after the next is taken."""

    def __init__(self, capacity: int, batch_rows: int):
        self.capacity, self.batch_rows = capacity, batch_rows
        self.arrays: dict[str, Held] = {}
        self.ring: list[dict[str, Held]] = [{} for _ in range(BATCH_RING)]
        self.taken = 0
        self.free = list(range(capacity - 1, -1, -1))
        self.slot: dict[int, int] = {}  # row of the split -> its slot

    def put(self, rows: np.ndarray, arrays: dict[str, Held], picked: np.ndarray | None = None
            ) -> None:
        """Rows ``rows`` of the split, from ``arrays`` (``picked`` of their rows, default all)."""
        if not len(rows):
            return
        if len(rows) > len(self.free):
            raise RuntimeError(f"{len(rows)} rows arrive with {len(self.free)} of "
                               f"{self.capacity} slots free")
        slots = [self.free.pop() for _ in range(len(rows))]
        self.slot.update(zip(rows.tolist(), slots))
        picked_rows = range(len(rows)) if picked is None else picked.tolist()
        for name, value in arrays.items():
            if name not in self.arrays:
                self.arrays[name] = _map_parts(value, lambda part: part.new_empty(
                    (self.capacity, *part.shape[1:])))
                for batch in self.ring:
                    batch[name] = _map_parts(value, lambda part: part.new_empty(
                        (self.batch_rows, *part.shape[1:])))
            _copy_rows(self.arrays[name], slots, value, picked_rows)

    def take(self, rows: np.ndarray) -> dict[str, Held]:
        """A batch of these rows, gathered into the ring's next batch."""
        slots = [self.slot[r] for r in rows.tolist()]
        batch = self.ring[self.taken % BATCH_RING]
        self.taken += 1
        return {name: _gather_parts(value, slots, batch[name])
                for name, value in self.arrays.items()}

    def release(self, rows) -> None:
        self.free.extend(self.slot.pop(int(r)) for r in rows)


def _map_parts(value: Held, fn) -> Held:
    """``fn`` applied to each tensor of a held array (both parts of quantized tokens)."""
    if isinstance(value, QuantizedTokens):
        return QuantizedTokens(fn(value.values), fn(value.scales))
    return fn(value)


# Rows move between a chunk, the slots and a batch as numpy copies, one row at a time: each is a
# plain memcpy on the calling thread. PyTorch's index_select and index_copy_ split such copies
# over its intra-op threads, which on a busy machine wait on each other: 0.24 GB/s measured
# against 6 GB/s for the row copies (2 cores, load 9).

def _gather_parts(value: Held, slots: list[int], into: Held) -> Held:
    """Rows ``slots`` of ``value`` gathered into the first rows of ``into``."""
    if isinstance(value, QuantizedTokens):
        return QuantizedTokens(_gather_parts(value.values, slots, into.values),
                               _gather_parts(value.scales, slots, into.scales))
    batch = into[:len(slots)]
    source, target = value.numpy(), batch.numpy()
    for row, slot in enumerate(slots):
        target[row] = source[slot]
    return batch


def _copy_rows(into: Held, slots: list[int], rows: Held, picked) -> None:
    """Rows ``picked`` of ``rows`` copied into rows ``slots`` of ``into``."""
    if isinstance(into, QuantizedTokens):
        _copy_rows(into.values, slots, rows.values, picked)
        _copy_rows(into.scales, slots, rows.scales, picked)
        return
    source, target = rows.numpy(), into.numpy()
    for row, slot in zip(picked, slots):
        target[slot] = source[row]
