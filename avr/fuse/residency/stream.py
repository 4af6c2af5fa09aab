"""The train split streamed from the store during each epoch, when it fits nowhere in memory.

The split's videos are read a whole Zarr chunk of video rows at a time (every video array shares
one chunking), with the captions an epoch pairs with them, on ``read_ahead`` background threads
a bounded number of chunks ahead of use. An epoch's order is a function of (seed, epoch) alone
(``StreamedSplit.epoch_order``): the chunks in a random order; within each chunk its pairs drawn
as the resident sampler draws them (one random caption per video, or every caption); the pairs
pass through a shuffle buffer of ``buffer_pairs`` (each arriving pair takes the place of a random
one, which leaves), and what leaves is cut into batches, each video at most once per batch. So a
batch mixes pairs from the chunks of the last ``buffer_pairs`` pairs, not from the whole split;
every row is read once per epoch; memory holds the buffer's rows, the chunks read ahead and two
batches (``StreamSettings.held_bytes``).

The rows held sit in slots allocated once per epoch for the most rows the epoch's order ever
holds at once (``RowSlots``): a read's rows get theirs when it is handed to a reader thread,
which decodes each chunk into memory it reuses (``avr.store.chunks``; zarr where that cannot
vouch for a chunk) and copies the rows into their slots, so the epoch's thread only gathers
batches, into two buffers in turn. A resumed run recomputes its epoch's order from (seed, epoch)
and the buffer size it recorded.
"""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from avr.fuse.ddp import SINGLE, World
from avr.fuse.residency.plan import BATCH_RING, StreamSettings
from avr.fuse.sampling import CPU, distinct_videos, draw_pairs, steps_per_epoch
from avr.store import schema
from avr.store.chunks import ChunkDecoder
from avr.store.group import open_store
from avr.store.quantize import Held, QuantizedTokens, quantize
from avr.store.read import chunk_rows, chunk_runs, will_read
from avr.store.splits import read_held, require_captions_done, split_index

@dataclass
class EpochOrder:
    """One streamed epoch: the chunks in reading order, and each batch's (video rows, caption
    rows) with how many chunks must have arrived before it."""

    chunks: list[int]
    batches: list[tuple[np.ndarray, np.ndarray]]
    ready: list[int]


class StreamedSplit:
    """The train split read from the store during each epoch (module docstring). Holds only its
    row indices; ``batches`` yields an epoch's batches of rows, as a resident split's would be
    gathered, from chunks read on background threads."""

    split = "train"
    stack_refusal = ("stacked trials (--parallel > 1) read a resident train split; this one is "
                     "streamed from the store: raise --memory-budget, or --parallel 1")

    def __init__(self, path: str | Path, video_names: tuple[str, ...],
                 caption_names: tuple[str, ...], resident: str, stream: StreamSettings):
        self.group, self.spec = open_store(path)
        self.video_names, self.caption_names = video_names, caption_names
        self.resident, self.stream = resident, stream
        index = split_index(self.group, "train", failed_captions=False)
        self.video_store_rows, self.caption_store_rows = index.video_rows, index.caption_rows
        if caption_names:
            require_captions_done(path, "train", self.group, self.caption_store_rows)
        self.caption_video = torch.from_numpy(index.caption_video)
        self.video_ids = index.video_ids
        self.chunk_bounds = [(first, last) for first, last, _ in
                             chunk_runs(self.group[schema.VIDEO_DONE], self.video_store_rows)]
        by_video = np.argsort(index.caption_video, kind="stable")
        edges = np.searchsorted(index.caption_video[by_video],
                                [b for b, _ in self.chunk_bounds] + [len(self.video_store_rows)])
        self.chunk_captions = [np.sort(by_video[a:b]) for a, b in zip(edges[:-1], edges[1:])]
        self._decoders = threading.local()  # each reader thread's ChunkDecoder per array

    @property
    def num_videos(self) -> int:
        return len(self.video_store_rows)

    def steps_per_epoch(self, config, world: World = SINGLE, device: torch.device = CPU) -> int:
        return steps_per_epoch(self, config, world, device)

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

    def batches(self, config, epoch: int, world: World = SINGLE, device: torch.device = CPU
                ) -> Iterator[tuple[dict[str, Held], dict[str, Held], list[int]]]:
        """The epoch's batches as (video arrays, caption arrays, [pairs]), each row read once
        (one process: a streamed split trains alone, ``plan_residency`` refuses shards).
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
