"""Cache reader for training and evaluation: one split of a store as in-memory tensors.

The trainer loads a split once (16-bit floats stay 16-bit), on the GPU when it fits, and then
only indexes rows. Rows that failed extraction are left out of the video gallery; their
captions stay, with ``caption_video = -1``, so evaluation can count them as failed queries.

A training process of several can load one shard of a split (``shard=(index, count)``): the
usable videos whose position in the split is ``index`` modulo ``count``, and their captions, in
store order. A shard leaves out the captions of failed videos (they never train).

With ``resident="int8"`` the token arrays are held as int8 with a per-token scale
(:mod:`avr.store.quantize`), read and quantized a block at a time so that the 16-bit split is never
whole in memory. With ``tokens_in_store=True`` the token arrays stay in the store as ``StoreRows``
and are read a batch of rows at a time by whoever slices them (evaluation of a split larger than
the memory budget); their masks and every smaller array are read at once.

Every read goes through ``avr.store.read.read_rows``: a chunk under the rows read that is absent
or fails its checksum stops the load with the array, chunk and rows named, never zeros.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from avr.errors import AvrError
from avr.store import schema
from avr.store.group import open_store
from avr.store.quantize import Held, QuantizedTokens, held_bytes, is_token_array, quantize
from avr.store.read import chunk_rows, read_rows
from avr.store.schema import CacheSpec

RESIDENT = ("fp16", "int8")  # how token arrays are held: as the store keeps them, or int8
# Rows of 16-bit tokens read before each is quantized: bounds the 16-bit (and float32) copy.
QUANTIZE_BLOCK_BYTES = 64 << 20


@dataclass
class SplitTensors:
    split: str
    spec: CacheSpec
    video_ids: list[str]
    videos: dict[str, Held | StoreRows]  # array name -> [N, ...], rows = usable videos
    captions: dict[str, Held | StoreRows]  # array name -> [M, ...], rows = captions of the split
    caption_video: torch.Tensor  # long [M]: row in ``videos``, -1 when its video failed
    caption_text: list[str]
    caption_tags: list[str] = field(default_factory=list)  # "" when untagged
    missing_videos: list[str] = field(default_factory=list)  # ids that failed extraction
    caption_store_rows: np.ndarray | None = None  # the captions' rows in the store (their ids)

    @property
    def num_videos(self) -> int:
        return len(self.video_ids)

    @property
    def num_captions(self) -> int:
        return len(self.caption_text)

    def video_rows(self, rows: torch.Tensor | slice) -> dict[str, Held]:
        return {name: t[rows] for name, t in self.videos.items()}

    def caption_rows(self, rows: torch.Tensor | slice) -> dict[str, Held]:
        return {name: t[rows] for name, t in self.captions.items()}

    def to(self, device: str | torch.device) -> SplitTensors:
        def move(tensors):
            return {k: v if isinstance(v, StoreRows) else v.to(device, non_blocking=True)
                    for k, v in tensors.items()}

        return SplitTensors(self.split, self.spec, self.video_ids, move(self.videos),
                            move(self.captions), self.caption_video.to(device), self.caption_text,
                            self.caption_tags, self.missing_videos, self.caption_store_rows)

    def nbytes(self) -> int:
        """Bytes held in memory (arrays left in the store count nothing)."""
        return sum(held_bytes(t) for t in (*self.videos.values(), *self.captions.values())
                   if not isinstance(t, StoreRows))


class StoreRows:
    """Rows of one store array, read (and quantized, with ``resident="int8"``) when sliced: a
    split's token arrays left in the store, read a batch at a time by the scoring loop."""

    def __init__(self, array, rows: np.ndarray, resident: str = "fp16"):
        self.array, self.rows, self.resident = array, rows, resident

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.rows), *self.array.shape[1:])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: torch.Tensor | slice) -> Held:
        wanted = self.rows[index.cpu().numpy() if isinstance(index, torch.Tensor) else index]
        order = np.argsort(wanted, kind="stable")  # the store is read in ascending rows
        held = read_held(self.array, wanted[order], self.resident)
        return held[torch.from_numpy(np.argsort(order))]


def read_held(array, rows: np.ndarray, resident: str = "fp16") -> Held:
    """Rows ``rows`` (ascending) of a store array as memory holds them: token arrays with
    ``resident="int8"`` quantized a block of rows at a time, everything else as stored."""
    if resident != "int8" or not is_token_array(array.shape, array.dtype):
        return torch.from_numpy(read_rows(array, rows))
    row_bytes = int(np.prod(array.shape[1:])) * array.dtype.itemsize
    block = max(1, QUANTIZE_BLOCK_BYTES // row_bytes // chunk_rows(array)) * chunk_rows(array)
    values = torch.empty((len(rows), *array.shape[1:]), dtype=torch.int8)
    scales = torch.empty((len(rows), *array.shape[1:-1], 1), dtype=torch.float16)
    for start in range(0, len(rows), block):
        part = quantize(torch.from_numpy(read_rows(array, rows[start:start + block])))
        values[start:start + block], scales[start:start + block] = part.values, part.scales
    return QuantizedTokens(values, scales)


def load_split(path: str | Path, split: str, video_names: tuple[str, ...],
               caption_names: tuple[str, ...], *, device: str | torch.device = "cpu",
               expect: CacheSpec | None = None, shard: tuple[int, int] | None = None,
               resident: str = "fp16", tokens_in_store: bool = False) -> SplitTensors:
    """Read ``split`` of the store at ``path``: only the arrays a head asks for; with
    ``shard=(index, count)`` only that shard's videos and their captions; token arrays held as
    ``resident`` says, or left in the store with ``tokens_in_store`` (module docstring)."""
    group, spec = open_store(path, expect=expect)
    index = split_index(group, split, shard=shard)
    if caption_names:
        require_captions_done(path, split, group, index.caption_rows)
    caption_text = [str(t) for t in read_rows(group[schema.CAPTION_TEXT], index.caption_rows)]
    caption_tags = [str(t) for t in read_rows(group[schema.CAPTION_TAG], index.caption_rows)]

    def held(name: str, rows: np.ndarray) -> Held | StoreRows:
        array = group[name]
        if tokens_in_store and is_token_array(array.shape, array.dtype):
            return StoreRows(array, rows, resident)
        return read_held(array, rows, resident).to(device)

    videos = {name: held(name, index.video_rows) for name in video_names}
    captions = {name: held(name, index.caption_rows) for name in caption_names}
    return SplitTensors(split, spec, index.video_ids, videos, captions,
                        torch.from_numpy(index.caption_video).to(device), caption_text,
                        caption_tags, index.missing_videos, index.caption_rows)


@dataclass
class SplitIndex:
    """A split's rows in the store, as every reader of a split numbers them: its done videos
    in store order (row i of the split is store row ``video_rows[i]``) and their captions."""

    video_rows: np.ndarray  # store rows of the split's videos, ascending
    caption_rows: np.ndarray  # store rows of the split's captions, ascending
    caption_video: np.ndarray  # per caption: its video's row of the split, -1 when it failed
    video_ids: list[str]
    missing_videos: list[str]  # ids of the split's videos that failed extraction


def split_index(group, split: str, *, shard: tuple[int, int] | None = None,
                failed_captions: bool = True) -> SplitIndex:
    """The rows of ``split``: every done video, or with ``shard=(index, count)`` the videos at
    positions ``index`` modulo ``count``. Captions of failed videos are kept (``caption_video``
    -1: evaluation counts them as failed queries) unless ``failed_captions`` is False or a shard
    is asked for (they never train)."""
    rows = split_rows(group, split)
    all_ids = read_rows(group[schema.VIDEO_ID])
    video_rows = rows.done
    in_split = rows.in_split
    if shard is not None:
        index, count = shard
        video_rows = video_rows[index::count]
        in_split = np.zeros_like(in_split)
        in_split[video_rows] = True
    caption_video_all = read_rows(group[schema.CAPTION_VIDEO])
    store_to_split = np.full(len(all_ids), -1, dtype=np.int64)
    store_to_split[video_rows] = np.arange(len(video_rows))
    caption_rows = np.flatnonzero(in_split[caption_video_all])
    caption_video = store_to_split[caption_video_all[caption_rows]]
    if not failed_captions:
        caption_rows, caption_video = caption_rows[caption_video >= 0], \
            caption_video[caption_video >= 0]
    return SplitIndex(video_rows, caption_rows, caption_video,
                      [str(v) for v in all_ids[video_rows]],
                      [str(v) for v in all_ids[rows.not_done]])


@dataclass
class SplitRows:
    """Which store rows of videos belong to a split, and which of those are done."""

    in_split: np.ndarray  # bool per store video row
    done: np.ndarray  # store rows of the split's done videos, ascending (load_split's order)
    not_done: np.ndarray  # store rows of the split's videos not (yet, or ever) extracted


def split_rows(group, split: str) -> SplitRows:
    """The video rows of ``split`` in the store ``group``, done and not done."""
    in_split = read_rows(group[schema.VIDEO_SPLIT]) == schema.split_code(split)
    done = read_rows(group[schema.VIDEO_DONE]).astype(bool)
    return SplitRows(in_split, np.flatnonzero(in_split & done), np.flatnonzero(in_split & ~done))


def split_size(group, split: str) -> tuple[int, int]:
    """(videos, captions) of ``split`` that training reads: its done videos and their captions."""
    rows = split_rows(group, split)
    done = np.zeros(len(rows.in_split), dtype=bool)
    done[rows.done] = True
    return len(rows.done), int(done[read_rows(group[schema.CAPTION_VIDEO])].sum())


def require_captions_done(path, split: str, group, caption_rows: np.ndarray) -> None:
    """Caption features are read only once they are extracted: a caption row not done (an
    extract that has not finished, or rows a repair marked for recomputation) would read as
    zeros."""
    done = read_rows(group[schema.CAPTION_DONE]).astype(bool)
    pending = caption_rows[~done[caption_rows]]
    if pending.size:
        raise AvrError(f"{path}: {pending.size} captions of the {split} split are not extracted "
                       f"(caption rows {pending[0]}..{pending[-1]} not done); run `avr extract` "
                       f"on this store to finish them")


def random_split(spec: CacheSpec, num_videos: int, captions_per_video: int = 1, *,
                 video_names: tuple[str, ...] | None = None,
                 caption_names: tuple[str, ...] | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float16
                 ) -> SplitTensors:
    """Random tensors with the shapes of a store for ``spec``: for unit tests and benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    layout = schema.array_layout(spec, num_videos, num_videos * captions_per_video)
    video_names = video_names or tuple(n for n, a in layout.items()
                                       if a.rows == "video" and n in _FEATURES)
    caption_names = caption_names or tuple(n for n, a in layout.items()
                                           if a.rows == "caption" and n in _FEATURES)

    def make(name):
        shape = layout[name].shape
        if layout[name].dtype == np.bool_:
            tensor = torch.ones(shape, dtype=torch.bool)
            if name in (schema.TEXT_TOKEN_MASK, schema.ROBERTA_MASK):
                lengths = torch.randint(3, shape[1] + 1, (shape[0],), generator=generator)
                tensor = torch.arange(shape[1])[None, :] < lengths[:, None]
            return tensor.to(device)
        return torch.randn(shape, generator=generator).to(device=device, dtype=dtype)

    videos = {n: make(n) for n in video_names}
    captions = {n: make(n) for n in caption_names}
    caption_video = torch.arange(num_videos).repeat_interleave(captions_per_video).to(device)
    return SplitTensors("train", spec, [f"v{i}" for i in range(num_videos)], videos, captions,
                        caption_video, [f"caption {j}" for j in range(len(caption_video))],
                        [""] * len(caption_video))


_FEATURES = set(schema.VIDEO_FEATURES) | set(schema.CAPTION_FEATURES) | {
    schema.swin_level(k) for k in range(8)}
