"""Scoring a split: the one path from cached rows to a [captions, videos] similarity matrix.

Every caller that scores more than one batch goes through here: the trainer's validation,
`avr eval` (and QB-Norm's query bank), `avr search` and `avr bench eval`. The work is the
head's three parts (``avr.fuse.heads.base``):

1. ``encode_videos`` over the video rows and ``encode_texts`` over the caption rows, one batch
   of rows at a time (``encode_rows``), each batch moved to the device on its own;
2. ``score`` over blocks of (caption, video) pairs (``score_states``), each block written into
   one float32 matrix, so memory holds one block's work whatever the split's size.

How many rows go into each call is decided in one place, ``chunk_sizes``, with one user-facing
knob: ``score_chunk``, the videos per scoring block (`avr eval --score-chunk`, the training
option ``score_chunk``; 0 chooses it).

Under a memory budget (``work_bytes``, from ``--memory-budget``), the videos are encoded and
scored a block at a time (``score_in_blocks``): each block of video rows is encoded, scored
against every caption and, when the states of the whole split would not fit ``work_bytes``,
dropped, so memory holds one block's encoding and one scoring block's work, sized to the
budget, whatever the split's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from avr.batching import map_batches, row_count, take_rows
from avr.device import autocast
from avr.fuse.heads.base import RetrievalHead, Rows, State, slice_state
from avr.store.quantize import on_device

# Rows per encode call: an encoder's activations are per row, small beside the cached tokens.
ENCODE_VIDEO_ROWS = 256
ENCODE_TEXT_ROWS = 4096
# Captions per scoring block, and videos per block when nothing else decides it.
SCORE_TEXT_ROWS = 2048
SCORE_VIDEO_ROWS = 64
# On a GPU, a scoring block may use this fraction of the free memory.
SCORE_MEMORY_FRACTION = 0.25
# A block's work per (caption, video) pair, in float32 copies of the wider state row: a head's
# score builds at most a few [Q, V, row] intermediates.
PAIR_COPIES = 2
# An encode call's working memory per video row, in float32 copies of its cached row.
ENCODE_COPIES = 3


@dataclass(frozen=True)
class ChunkSizes:
    """Captions and videos per call of ``head.score``."""

    score_texts: int = SCORE_TEXT_ROWS
    score_videos: int = SCORE_VIDEO_ROWS


def chunk_sizes(device: torch.device, texts: State | None = None, videos: State | None = None,
                score_chunk: int = 0) -> ChunkSizes:
    """The chunk sizes for scoring ``texts`` against ``videos`` (encoded states) on ``device``.

    ``score_chunk`` > 0 fixes the videos per scoring block. Otherwise, on a GPU, a block takes
    as many videos as fit ``SCORE_MEMORY_FRACTION`` of the free memory at ``PAIR_COPIES``
    float32 copies of the wider state row per pair; on the CPU it takes ``SCORE_VIDEO_ROWS``,
    a fixed size, so that CPU scores never depend on what else the machine is doing.
    """
    if score_chunk > 0:
        return ChunkSizes(score_videos=score_chunk)
    if device.type != "cuda" or texts is None or videos is None:
        return ChunkSizes()
    free, _ = torch.cuda.mem_get_info(device)
    row = max(_row_elements(texts), _row_elements(videos))
    per_pair = PAIR_COPIES * 4 * row
    fit = int(SCORE_MEMORY_FRACTION * free // (SCORE_TEXT_ROWS * per_pair))
    return ChunkSizes(score_videos=max(1, min(fit, row_count(videos))))


def _row_elements(state: State) -> int:
    return sum(tensor[0].numel() for tensor in state.values())


def _state_row_bytes(state: State) -> int:
    return sum(tensor[0].numel() * tensor.element_size() for tensor in state.values())


def pair_bytes(videos: State) -> int:
    """A scoring block's work per (caption, video) pair: ``PAIR_COPIES`` float32 copies of the
    video's tokens (the attention logits a text-conditioned head builds per pair) and of its
    widest vector (the pooled embedding)."""
    tokens = sum(t[0].numel() // t.shape[-1] for t in videos.values() if t.dim() >= 3)
    width = max(t.shape[-1] for t in videos.values())
    return PAIR_COPIES * 4 * (tokens + width)


def _rows_bytes32(rows: Rows) -> int:
    """One video row's cached arrays as float32 (however they are held)."""
    return sum(4 * int(math.prod(value.shape[1:])) for value in rows.values())


def encode_rows(encode, rows: Rows, device: torch.device, batch: int) -> State:
    """``encode`` (a head's ``encode_videos`` or ``encode_texts``) over ``rows`` (cached arrays,
    wherever they sit: on a device, int8 on the host, or still in the store), ``batch`` rows at a
    time, each batch read, moved to ``device`` and dequantized first."""
    return map_batches(lambda part: encode(on_device(part, device)), rows, batch)


@torch.no_grad()
def score_states(head: RetrievalHead, texts: State, videos: State, *, score_chunk: int = 0,
                 chunks: ChunkSizes | None = None,
                 out_device: str | torch.device = "cpu") -> torch.Tensor:
    """``head.score`` of every (caption, video) pair of encoded states, block by block, as one
    float32 [captions, videos] matrix on ``out_device``."""
    device = next(iter(videos.values())).device
    chunks = chunks or chunk_sizes(device, texts, videos, score_chunk)
    n_text, n_video = row_count(texts), row_count(videos)
    sim = torch.empty(n_text, n_video, dtype=torch.float32, device=out_device)
    for t0 in range(0, n_text, chunks.score_texts):
        t1 = t0 + chunks.score_texts
        text_block = slice_state(texts, slice(t0, t1))
        for v0 in range(0, n_video, chunks.score_videos):
            v1 = v0 + chunks.score_videos
            block = head.score(text_block, slice_state(videos, slice(v0, v1)))
            sim[t0:t1, v0:v1] = block.float().to(out_device)
    return sim


@dataclass
class SplitScores:
    """The scores of a split and the states they came from (QB-Norm and reports reuse them)."""

    sim: torch.Tensor  # [captions, videos] float32
    texts: State
    videos: State | None  # None: dropped, as ``score_in_blocks`` does when they do not fit


@torch.no_grad()
def score_split(head: RetrievalHead, video_rows: Rows, caption_rows: Rows,
                device: torch.device, *, amp: bool = True, score_chunk: int = 0,
                out_device: str | torch.device = "cpu", work_bytes: int | None = None
                ) -> SplitScores:
    """Encode ``video_rows`` and ``caption_rows`` (cached arrays by name, rows first) with
    ``head`` in eval mode on ``device``, and score every pair; within ``work_bytes`` of working
    memory when given (``score_in_blocks``: the video states may then be dropped, None)."""
    head.eval()
    if work_bytes is not None:
        return score_in_blocks(head, video_rows, caption_rows, device, work_bytes, amp=amp,
                               score_chunk=score_chunk, out_device=out_device)
    videos = encode_video_rows(head, video_rows, device, amp=amp)
    return score_captions(head, caption_rows, videos, device, amp=amp, score_chunk=score_chunk,
                          out_device=out_device)


@torch.no_grad()
def encode_video_rows(head: RetrievalHead, video_rows: Rows, device: torch.device, *,
                      amp: bool = True) -> State:
    """``head.encode_videos`` over ``video_rows`` in eval mode, ``ENCODE_VIDEO_ROWS`` at a time:
    the states ``score_captions`` scores queries against (`avr search` keeps them)."""
    head.eval()
    with autocast(device, amp):
        return encode_rows(head.encode_videos, video_rows, device, ENCODE_VIDEO_ROWS)


@torch.no_grad()
def score_in_blocks(head: RetrievalHead, video_rows: Rows, caption_rows: Rows,
                    device: torch.device, work_bytes: int, *, amp: bool = True,
                    score_chunk: int = 0, out_device: str | torch.device = "cpu"
                    ) -> SplitScores:
    """``score_split`` within ``work_bytes``: the captions encoded once; the videos a block at
    a time (``ENCODE_COPIES`` float32 copies of a block's rows fit ``work_bytes``), each block
    scored against every caption in scoring blocks whose work (``pair_bytes``) fits it too.
    The video states are kept (and returned) only when the whole split's fit ``work_bytes``."""
    head.eval()
    n_video = row_count(video_rows)
    block = max(1, min(ENCODE_VIDEO_ROWS, work_bytes // (ENCODE_COPIES
                                                          * _rows_bytes32(video_rows))))
    with autocast(device, amp):
        texts = encode_rows(head.encode_texts, caption_rows, device, ENCODE_TEXT_ROWS)
        sim = torch.empty(row_count(texts), n_video, dtype=torch.float32, device=out_device)
        kept: list[State] | None = []
        for v0 in range(0, n_video, block):
            videos = head.encode_videos(on_device(take_rows(video_rows, v0, v0 + block), device))
            chunks = chunk_sizes(device, texts, videos, score_chunk)
            pair_texts = work_bytes // (chunks.score_videos * pair_bytes(videos))
            chunks = ChunkSizes(max(1, min(chunks.score_texts, pair_texts)), chunks.score_videos)
            sim[:, v0:v0 + row_count(videos)] = score_states(head, texts, videos, chunks=chunks,
                                                             out_device=out_device)
            if kept is not None and _state_row_bytes(videos) * n_video <= work_bytes:
                kept.append(videos)
            else:
                kept = None
    states = None if kept is None else {name: torch.cat([part[name] for part in kept])
                                        for name in kept[0]} if kept else {}
    return SplitScores(sim, texts, states)


@torch.no_grad()
def score_captions(head: RetrievalHead, caption_rows: Rows, videos: State,
                   device: torch.device, *, amp: bool = True, score_chunk: int = 0,
                   out_device: str | torch.device = "cpu") -> SplitScores:
    """Encode ``caption_rows`` and score them against ``videos``, already encoded: the second
    half of ``score_split``, and QB-Norm's bank (training captions against evaluated videos)."""
    head.eval()
    with autocast(device, amp):
        texts = encode_rows(head.encode_texts, caption_rows, device, ENCODE_TEXT_ROWS)
        sim = score_states(head, texts, videos, score_chunk=score_chunk, out_device=out_device)
    return SplitScores(sim, texts, videos)
