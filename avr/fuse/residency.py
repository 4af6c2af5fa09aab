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
per epoch for the most rows the epoch's order ever holds at once (``RowSlots``): a read's rows get
theirs when it is handed to a reader thread, which decodes each chunk into memory it reuses
(``avr.store.chunks``; zarr where that cannot vouch for a chunk) and copies the rows into their slots, so
the epoch's thread only gathers batches, into two buffers in turn (memory already allocated
rather than allocated per row). A resumed run recomputes its epoch's order from (seed, epoch)
and the buffer size it recorded.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from avr.errors import AvrError
from avr.fuse.distributed import World
from avr.fuse.sampling import distinct_videos, draw_pairs
from avr.store import schema
from avr.store.chunks import ChunkDecoder
from avr.store.group import open_store
from avr.store.quantize import Held, QuantizedTokens, is_token_array, quantize
from avr.store.read import chunk_rows, chunk_runs, read_rows, will_read
from avr.store.splits import _require_captions_done, read_held, split_rows, split_size

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
        self.group, self.spec = open_store(path)
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
        self.chunk_bounds = [(first, last) for first, last, _ in
                             chunk_runs(self.group[schema.VIDEO_DONE], self.video_store_rows)]
        by_video = np.argsort(self.caption_video.numpy(), kind="stable")
        edges = np.searchsorted(self.caption_video.numpy()[by_video],
                                [b for b, _ in self.chunk_bounds] + [len(self.video_store_rows)])
        self.chunk_captions = [np.sort(by_video[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        self._decoders = threading.local()  # each reader thread's ChunkDecoder per array

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
        """The epoch's batches as (video arrays, caption arrays, [pairs]), each row read once.
        When a read is handed to a reader thread, the rows of its chunks that the epoch uses get
        free slots of ``RowSlots``; the thread decodes the chunks and copies those rows into
        their slots, and a row's slot is freed after its last batch. A batch's tensors are
        reused for the batch after the next: use or copy them before."""
        order = self.epoch_order(config, epoch)
        uses = Counter(v for videos, _ in order.batches for v in videos.tolist())
        wanted = np.zeros(len(self.caption_video), dtype=bool)
        for _, captions in order.batches:
            wanted[captions] = True
        per_read = self.stream.chunks_per_read
        reads = [order.chunks[k:k + per_read] for k in range(0, len(order.chunks), per_read)]
        placed = [self._placed_rows(read, uses, wanted) for read in reads]
        most_videos, most_captions = self._most_held(order, reads, placed, uses)
        videos_held = RowSlots(self._held_like(self.video_names, self.video_store_rows),
                               most_videos, max((len(v) for v, _ in order.batches), default=0))
        captions_held = RowSlots(self._held_like(self.caption_names, self.caption_store_rows),
                                 most_captions,
                                 max((len(c) for _, c in order.batches), default=0))

        def start(k: int):  # on this thread: the slots; on a reader's: the read
            videos, captions = placed[k]
            return partial(self.read_chunks, reads[k], videos, videos_held.reserve(videos),
                           videos_held, captions, captions_held.reserve(captions), captions_held)

        with ChunkReader([len(read) for read in reads], start, self.stream.read_ahead) as reader:
            for (videos, captions), ready in zip(order.batches, order.ready):
                while reader.arrived < ready:
                    reader.next()
                yield videos_held.take(videos), captions_held.take(captions), [len(videos)]
                captions_held.release(captions)
                for v in videos.tolist():
                    uses[v] -= 1
                videos_held.release([v for v in set(videos.tolist()) if not uses[v]])

    def _placed_rows(self, read: list[int], uses: Counter, wanted: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
        """The video rows of the chunks of ``read`` that the epoch uses and their captions that
        it pairs, ascending: the rows the read places in slots."""
        videos, captions = self._rows_of(read)
        return (videos[np.asarray([uses[v] > 0 for v in videos.tolist()], dtype=bool)],
                captions[wanted[captions]])

    def _most_held(self, order: EpochOrder, reads: list[list[int]],
                   placed: list[tuple[np.ndarray, np.ndarray]], uses: Counter) -> tuple[int, int]:
        """The most video rows and caption rows held at once during the epoch ``order``: a
        read's rows from when it is handed to a reader (``ChunkReader``: the first
        ``read_ahead`` at once, then one as each is delivered) to their last batch."""
        remaining = Counter(uses)
        videos = captions = submitted = delivered = arrived = 0
        ahead = self.stream.read_ahead
        while submitted < min(ahead, len(reads)):
            videos, captions = videos + len(placed[submitted][0]), \
                captions + len(placed[submitted][1])
            submitted += 1
        most_videos, most_captions = videos, captions
        for (batch_videos, batch_captions), ready in zip(order.batches, order.ready):
            while arrived < ready:
                arrived += len(reads[delivered])
                delivered += 1
                if submitted < len(reads):
                    videos += len(placed[submitted][0])
                    captions += len(placed[submitted][1])
                    submitted += 1
                most_videos, most_captions = max(most_videos, videos), \
                    max(most_captions, captions)
            captions -= len(batch_captions)
            for v in batch_videos.tolist():
                remaining[v] -= 1
                videos -= remaining[v] == 0
        return most_videos, most_captions

    def _held_like(self, names: tuple[str, ...], store_rows: np.ndarray) -> dict[str, Held]:
        """An empty row of each array as memory holds it (the slots' dtypes and row shapes)."""
        return {name: read_held(self.group[name], store_rows[:0], self.resident)
                for name in names}

    def read_chunks(self, chunks: list[int], videos: np.ndarray, video_slots: list[int],
                    videos_held: RowSlots, captions: np.ndarray, caption_slots: list[int],
                    captions_held: RowSlots) -> None:
        """Read ``chunks`` and copy their rows ``videos`` and ``captions`` (split rows,
        ascending) into their slots (on a reader thread; the chunk files are first handed to the
        kernel to read ahead). Each chunk is decoded once into memory the thread reuses
        (``avr.store.chunks``), or read through zarr where that cannot vouch for it."""
        self.will_read(*self._rows_of(chunks))
        for names, store_rows, rows, slots, held in (
                (self.video_names, self.video_store_rows, videos, video_slots, videos_held),
                (self.caption_names, self.caption_store_rows, captions, caption_slots,
                 captions_held)):
            for name in names:
                self._place(name, store_rows[rows], slots, held.arrays[name])

    def _place(self, name: str, store_rows: np.ndarray, slots: list[int], into: Held) -> None:
        """Rows ``store_rows`` (ascending) of array ``name`` copied into rows ``slots`` of
        ``into``."""
        if not len(store_rows):
            return
        array = self.group[name]
        decoders = self._decoders.__dict__
        if name not in decoders:
            decoders[name] = ChunkDecoder(array)
        decoder = decoders[name]
        if not decoder.supported:
            _copy_rows(into, slots, read_held(array, store_rows, self.resident))
            return
        per_chunk = chunk_rows(array)
        for first, last, chunk in chunk_runs(array, store_rows):
            rows = store_rows[first:last]
            block = decoder.decode(chunk)
            if block is None:  # zarr reads it, or names the damage
                part = read_held(array, rows, self.resident)
            else:
                part = block[rows - chunk * per_chunk]
                part = (quantize(torch.from_numpy(part)) if isinstance(into, QuantizedTokens)
                        else torch.from_numpy(part))
            _copy_rows(into, slots[first:last], part)

    def will_read(self, videos: np.ndarray, captions: np.ndarray) -> None:
        """Have the kernel read ahead the chunk files under these split rows of videos and
        captions (``avr.store.read.will_read``)."""
        for names, rows in ((self.video_names, self.video_store_rows[videos]),
                            (self.caption_names, self.caption_store_rows[captions])):
            for name in names:
                will_read(self.group[name], rows)

    def _rows_of(self, chunks: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """The split's video rows of ``chunks`` and their videos' caption rows, ascending."""
        videos = np.sort(np.concatenate([np.arange(*self.chunk_bounds[c]) for c in chunks]))
        return videos, np.sort(np.concatenate([self.chunk_captions[c] for c in chunks]))


class ChunkReader:
    """Reads run on ``read_ahead`` background threads, in order, at most ``read_ahead`` ahead
    of the one in use: ``start(k)`` (called on this thread) prepares read ``k`` and returns what
    a reader thread runs; ``counts[k]`` is the chunks read ``k`` brings, ``arrived`` the chunks
    delivered so far."""

    def __init__(self, counts: list[int], start, read_ahead: int):
        self.counts, self.start, self.read_ahead = counts, start, read_ahead
        self.pool = ThreadPoolExecutor(read_ahead, thread_name_prefix="avr-stream")
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
        while len(self.pending) < self.read_ahead and self.submitted < len(self.counts):
            k = self.submitted
            self.pending.append((self.counts[k], self.pool.submit(self.start(k))))
            self.submitted += 1

    def next(self) -> None:
        """Wait for the next read (its errors are raised here)."""
        count, future = self.pending.popleft()
        future.result()
        self.arrived += count
        self._top_up()


class RowSlots:
    """Rows of a streamed split from the read that brings them to their last batch: one tensor
    per array of ``capacity`` rows and a free list of its slots, and ``BATCH_RING`` batches of
    ``batch_rows`` rows that batches are gathered into in turn, all allocated once per epoch
    (``like``: an empty row set of each array as held). ``reserve`` (the epoch's thread) gives
    a read's rows their slots, a reader thread copies them in, ``take`` gathers a batch's rows
    into memory already mapped: fresh tensors of a batch's size would be mapped anew for each
    batch, and filling new pages costs more than the copy. So a batch's tensors are valid until
    the batch after the next is taken."""

    def __init__(self, like: dict[str, Held], capacity: int, batch_rows: int):
        self.capacity, self.batch_rows = capacity, batch_rows
        self.arrays = {name: _map_parts(value, lambda part: part.new_empty(
            (capacity, *part.shape[1:]))) for name, value in like.items()}
        self.ring = [{name: _map_parts(value, lambda part: part.new_empty(
            (batch_rows, *part.shape[1:]))) for name, value in like.items()}
            for _ in range(BATCH_RING)]
        self.taken = 0
        self.free = list(range(capacity - 1, -1, -1))
        self.slot: dict[int, int] = {}  # row of the split -> its slot

    def reserve(self, rows: np.ndarray) -> list[int]:
        """Free slots for rows ``rows`` of the split, which are theirs until ``release``."""
        if len(rows) > len(self.free):
            raise RuntimeError(f"{len(rows)} rows arrive with {len(self.free)} of "
                               f"{self.capacity} slots free")
        slots = [self.free.pop() for _ in range(len(rows))]
        self.slot.update(zip(rows.tolist(), slots))
        return slots

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


def _copy_rows(into: Held, slots: list[int], rows: Held) -> None:
    """The rows of ``rows`` copied into rows ``slots`` of ``into``."""
    if isinstance(into, QuantizedTokens):
        _copy_rows(into.values, slots, rows.values)
        _copy_rows(into.scales, slots, rows.scales)
        return
    source, target = rows.numpy(), into.numpy()
    for row, slot in enumerate(slots):
        target[slot] = source[row]
