"""Which (video, caption) pairs train together: the batches of one epoch.

The trainer iterates ``epoch_batches`` and needs nothing else from here. An epoch draws one
random caption per video (``pairs="one"``) or takes every caption (``pairs="all"``), shuffled,
and cuts the pairs into batches of ``batch_size``, each holding a video at most once (InfoNCE
needs distinct negatives).

Shards. With ``shards=N`` the split's videos are dealt into N shards (the videos at positions
r mod N); each shard draws its own pair order from its own generator, and global batch b
concatenates, in shard order, the b-th ``batch_size / N`` pairs of every shard. One process
holds every shard; under torchrun rank r holds only shard r (``load_split(shard=...)``, whose
rows keep this order) and draws the same pairs, so both compose the same batches and train the
same run (:mod:`avr.fuse.ddp`). With ``shards=1`` this is plain shuffled batching.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch

from avr.fuse import ddp
from avr.fuse.ddp import World
from avr.store.splits import SplitTensors

CPU = torch.device("cpu")
Batch = tuple[torch.Tensor, torch.Tensor, list[int]]  # video rows, caption rows, rows per shard


def epoch_batches(data: SplitTensors, config, epoch: int, world: World = ddp.SINGLE,
                  device: torch.device = CPU) -> Iterator[Batch]:
    """The epoch's global batches, the same for one process with ``shards=N`` and for N ranks.
    Yields (video rows, caption rows, counts): the rows of ``data`` this process holds of the
    batch and how many rows each shard gives it. A batch to which some shard gives nothing
    (shards of unequal size, at the end of an epoch) or with fewer than 2 pairs is skipped.
    ``config`` is a TrainConfig: its batch_size, shards, pairs and seed decide the draw."""
    per_shard = config.batch_size // config.shards
    orders = held_shards(data, config, epoch, world)
    lengths = [len(videos) for videos, _ in orders]
    if world.is_distributed:
        lengths = ddp.gather_counts(lengths[0], world, device)
    for start in range(0, max(lengths), per_shard):
        parts = [distinct_videos(v[start:start + per_shard], c[start:start + per_shard])
                 for v, c in orders]
        counts = [len(v) for v, _ in parts]
        if world.is_distributed:
            counts = ddp.gather_counts(counts[0], world, device)
        if min(counts) == 0 or sum(counts) < 2:
            continue
        yield torch.cat([v for v, _ in parts]), torch.cat([c for _, c in parts]), counts


def steps_per_epoch(data: SplitTensors, config, world: World = ddp.SINGLE,
                    device: torch.device = CPU) -> int:
    """Batches of an epoch as the learning-rate schedule counts them: those of the largest
    shard."""
    held = 1 if world.is_distributed else config.shards  # a rank holds its own shard alone
    caption_video = data.caption_video.cpu()
    sizes = [len(range(shard, data.num_videos, held)) if config.pairs == "one"
             else int(((caption_video >= 0) & (caption_video % held == shard)).sum())
             for shard in range(held)]
    if world.is_distributed:
        sizes = ddp.gather_counts(sizes[0], world, device)
    return max(1, math.ceil(max(sizes) / (config.batch_size // config.shards)))


def held_shards(data: SplitTensors, config, epoch: int, world: World
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each shard's pair order that this process holds: every shard alone, its own on a rank."""
    caption_video = data.caption_video.cpu()
    if world.is_distributed:  # ``data`` is shard ``world.rank`` itself
        return [shard_pairs(caption_video, 0, 1, config.pairs,
                            shard_generator(config.seed, epoch, world.rank))]
    return [shard_pairs(caption_video, shard, config.shards, config.pairs,
                        shard_generator(config.seed, epoch, shard))
            for shard in range(config.shards)]


def shard_generator(seed: int, epoch: int, shard: int) -> torch.Generator:
    """The generator of one shard's pairs in one epoch; shard 0 keeps the one-process seed, so a
    run with ``shards=1`` draws what it always drew."""
    return torch.Generator().manual_seed(seed * 100_003 + epoch + shard * 1_000_003)


def shard_pairs(caption_video: torch.Tensor, shard: int, shards: int, pairs: str,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The shuffled pairs of the videos in position ``shard`` modulo ``shards`` of the split, as
    rows of the split. Drawn on the shard's own rows, so a rank holding only that shard draws the
    same pairs."""
    owned = torch.nonzero((caption_video >= 0) & (caption_video % shards == shard)).squeeze(1)
    local_videos = (caption_video[owned] - shard) // shards
    _, captions = draw_pairs(local_videos, pairs, generator)
    return caption_video[owned[captions]], owned[captions]


def draw_pairs(caption_video: torch.Tensor, pairs: str, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(video rows, caption rows) of one epoch, shuffled, for the captions' video rows
    ``caption_video`` (-1: failed video). ``one``: one random caption per video."""
    valid = torch.nonzero(caption_video >= 0).squeeze(1)
    if pairs == "all":
        order = valid[torch.randperm(len(valid), generator=generator)]
        return caption_video[order], order
    # One random caption per video: random keys, then the first caption of each video in key order.
    keys = torch.rand(len(valid), generator=generator)
    order = valid[torch.argsort(keys)]
    videos_in_order = caption_video[order]
    _, first = np.unique(videos_in_order.numpy(), return_index=True)
    captions = order[torch.from_numpy(first)]
    shuffle = torch.randperm(len(captions), generator=generator)
    captions = captions[shuffle]
    return caption_video[captions], captions


def distinct_videos(video_rows: torch.Tensor, caption_rows: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each video's first pair: a batch holds each video at most once (distinct negatives);
    with pairs="all" two captions of one video can meet."""
    if len(torch.unique(video_rows)) == len(video_rows):
        return video_rows, caption_rows
    _, keep = np.unique(video_rows.numpy(), return_index=True)
    keep = torch.from_numpy(np.sort(keep))
    return video_rows[keep], caption_rows[keep]
