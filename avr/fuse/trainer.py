"""The trainer: one split of the cache in memory, a head, symmetric InfoNCE, val every epoch.

Readable top to bottom: ``train`` loads the cache once, builds the head and the optimizer, and
runs ``fit``; ``fit`` loops over epochs, each epoch samples one caption per video (or every
caption with ``pairs="all"``), steps through batches, evaluates on val, and keeps the best
checkpoint by val text-to-video R@1 (never the test split).

Everything a run needs to be rebuilt goes in ``config.json``; weights in safetensors.

Under ``torchrun --nproc-per-node N -m avr train ...`` (WORLD_SIZE > 1 in the environment)
``train`` and ``resume`` join the process group; rank r loads only shard r of the train split
(``shards`` must equal N), encodes that shard's part of each global batch, and takes the loss over
the whole global batch; rank 0 alone loads val, validates and writes the run. One process with
``shards=N`` composes the same global batches (``epoch_batches``) and so trains the same run.
The mechanics are in :mod:`avr.fuse.distributed`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from avr import schema
from avr.errors import AvrError, RunError
from avr.device import autocast, resolve_device
from avr.fuse import checkpoint, distributed
from avr.fuse.data import SplitTensors, load_split
from avr.fuse.distributed import World
from avr.fuse.heads import build_head, head_class, make_config, video_inputs
from avr.fuse.heads.base import RetrievalHead, chunked_scores, encode_in_chunks

DEFAULT_CACHE = Path("cache")
CPU = torch.device("cpu")


@dataclass
class TrainConfig:
    """Training options; every field can come from flags, from ``--config run.toml`` or a sweep."""

    head: str = "tefal"
    head_options: dict[str, Any] = field(default_factory=dict)
    epochs: int = 5
    batch_size: int = 128
    lr: float = 1e-4
    weight_decay: float = 0.2
    warmup: float = 0.1  # fraction of all steps spent in linear warmup, then cosine decay
    grad_clip: float = 1.0
    seed: int = 42
    pairs: str = "one"  # "one": one random caption per video per epoch; "all": every caption
    early_stop: int = 0  # stop after this many epochs without a better val R@1 (0: never)
    shards: int = 1  # train video shards, each giving batch_size / shards pairs to every batch
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    val_video_chunk: int = 64
    val_text_chunk: int = 2048

    def validate(self) -> None:
        if self.pairs not in ("one", "all"):
            raise AvrError(f"pairs must be 'one' or 'all', not {self.pairs!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise AvrError("epochs must be >= 1 and batch size >= 2 (InfoNCE needs negatives)")
        if not self.lr > 0 or self.weight_decay < 0 or not self.grad_clip > 0:
            raise AvrError(f"lr ({self.lr}) and grad_clip ({self.grad_clip}) must be > 0, "
                           f"weight_decay ({self.weight_decay}) >= 0")
        if not 0 <= self.warmup <= 1:
            raise AvrError(f"warmup is a fraction of all steps, in [0, 1], not {self.warmup}")
        if self.early_stop < 0 or self.val_video_chunk < 1 or self.val_text_chunk < 1:
            raise AvrError("early_stop must be >= 0, val_video_chunk and val_text_chunk >= 1")
        if self.shards < 1 or self.batch_size % self.shards:
            raise AvrError(f"batch size {self.batch_size} must be a multiple of shards="
                           f"{self.shards} (>= 1): every shard gives each batch the same number "
                           f"of pairs")
        make_config(self.head, self.head_options)  # unknown head options fail now, not later
        resolve_device(self.device)  # an unknown or absent device fails now, not later


TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def split_options(options: dict[str, Any], head: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split flat ``key=value`` options into trainer fields and head options."""
    head_fields = {f.name for f in dataclasses.fields(head_class(head).Config)}
    train, head_opts = {}, {}
    for key, value in options.items():
        if key in head_fields:
            head_opts[key] = value
        elif key in TRAIN_FIELDS:
            train[key] = value
        else:
            raise AvrError(f"unknown option {key!r}: not a training option "
                           f"({', '.join(sorted(TRAIN_FIELDS - {'head', 'head_options'}))}) "
                           f"nor an option of head {head!r} ({', '.join(sorted(head_fields))})")
    return train, head_opts


def check_world(config: TrainConfig, world: World) -> None:
    """Under torchrun every rank holds one shard of the train split: shards must be WORLD_SIZE."""
    if world.is_distributed and config.shards != world.size:
        raise AvrError(f"shards={config.shards} but torchrun started WORLD_SIZE={world.size} "
                       f"processes: pass --opt shards={world.size}, or start "
                       f"--nproc-per-node {config.shards} (a run with shards=N trains the same "
                       f"on one process or on N)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- data ------------------------------------------------------------------------------------

@dataclass
class CacheData:
    """The train and val splits of a store, loaded once (shared by every trial of a sweep).
    On a rank of several: its shard of train, and val on rank 0 only (it alone validates)."""

    path: Path
    spec: schema.CacheSpec
    train: SplitTensors
    val: SplitTensors | None


def load_cache(path: str | Path, head: str, device: torch.device,
               world: World = distributed.SINGLE, *,
               head_options: list[dict[str, Any]] | None = None) -> CacheData:
    """Load train (this rank's shard of it) and val with the arrays ``head`` needs when built
    with any of ``head_options`` (default: its default options): on ``device`` when they fit."""
    cls = head_class(head)
    videos = video_inputs(head, *(head_options or [{}]))
    path = schema.store_location(path)
    shard = (world.rank, world.size) if world.is_distributed else None
    splits = {"train": load_split(path, "train", videos, cls.caption_inputs, shard=shard)}
    if world.is_main:
        splits["val"] = load_split(path, "val", videos, cls.caption_inputs)
    for split, data in splits.items():
        if data.num_videos == 0:
            where = f"shard {world.rank} of {world.size} of " if split == "train" and shard else ""
            raise AvrError(f"{path}: {where}the {split} split has no extracted videos")
    needed = sum(s.nbytes() for s in splits.values())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if needed < 0.8 * free:
            splits = {k: v.to(device) for k, v in splits.items()}
        else:  # keep on the host, pinned, and move each batch
            splits = {k: _pin(v) for k, v in splits.items()}
    return CacheData(path, splits["train"].spec, splits["train"], splits.get("val"))


def _pin(data: SplitTensors) -> SplitTensors:
    data.videos = {k: v.pin_memory() for k, v in data.videos.items()}
    data.captions = {k: v.pin_memory() for k, v in data.captions.items()}
    return data


def epoch_pairs(data: SplitTensors, pairs: str, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(video rows, caption rows) of one epoch, shuffled. ``one``: one random caption per video."""
    return draw_pairs(data.caption_video.cpu(), pairs, generator)


def draw_pairs(caption_video: torch.Tensor, pairs: str, generator: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """``epoch_pairs`` for the captions' video rows ``caption_video`` (-1: failed video)."""
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


def shard_generator(config: TrainConfig, epoch: int, shard: int) -> torch.Generator:
    """The generator of one shard's pairs in one epoch; shard 0 keeps the one-process seed, so a
    run with ``shards=1`` draws what it always drew."""
    return torch.Generator().manual_seed(config.seed * 100_003 + epoch + shard * 1_000_003)


def shard_pairs(caption_video: torch.Tensor, shard: int, shards: int, pairs: str,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The shuffled pairs of the videos in position ``shard`` modulo ``shards`` of the split, as
    rows of the split. Drawn on the shard's own rows, so a rank holding only that shard (loaded
    with ``load_split(shard=...)``, whose rows keep this order) draws the same pairs."""
    owned = torch.nonzero((caption_video >= 0) & (caption_video % shards == shard)).squeeze(1)
    local_videos = (caption_video[owned] - shard) // shards
    _, captions = draw_pairs(local_videos, pairs, generator)
    return caption_video[owned[captions]], owned[captions]


def _distinct_videos(video_rows: torch.Tensor, caption_rows: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep each video's first pair: a batch holds each video at most once (distinct negatives);
    with pairs="all" two captions of one video can meet."""
    if len(torch.unique(video_rows)) == len(video_rows):
        return video_rows, caption_rows
    _, keep = np.unique(video_rows.numpy(), return_index=True)
    keep = torch.from_numpy(np.sort(keep))
    return video_rows[keep], caption_rows[keep]


def held_shards(data: SplitTensors, config: TrainConfig, epoch: int, world: World
                ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each shard's pair order that this process holds: every shard alone, its own on a rank."""
    caption_video = data.caption_video.cpu()
    if world.is_distributed:  # ``data`` is shard ``world.rank`` itself
        return [shard_pairs(caption_video, 0, 1, config.pairs,
                            shard_generator(config, epoch, world.rank))]
    return [shard_pairs(caption_video, shard, config.shards, config.pairs,
                        shard_generator(config, epoch, shard)) for shard in range(config.shards)]


def epoch_batches(data: SplitTensors, config: TrainConfig, epoch: int,
                  world: World = distributed.SINGLE, device: torch.device = CPU):
    """The epoch's global batches, the same for one process with ``shards=N`` and for N ranks:
    batch b concatenates, in shard order, the b-th ``batch_size / shards`` pairs of every shard's
    own pair order. Yields (video rows, caption rows, counts): the rows of ``data`` this process
    holds of the batch and how many rows each shard gives it. A batch to which some shard gives
    nothing (shards of unequal size, at the end of an epoch) or with fewer than 2 pairs is
    skipped."""
    per_shard = config.batch_size // config.shards
    orders = held_shards(data, config, epoch, world)
    lengths = [len(videos) for videos, _ in orders]
    if world.is_distributed:
        lengths = distributed.gather_counts(lengths[0], world, device)
    for start in range(0, max(lengths), per_shard):
        parts = [_distinct_videos(v[start:start + per_shard], c[start:start + per_shard])
                 for v, c in orders]
        counts = [len(v) for v, _ in parts]
        if world.is_distributed:
            counts = distributed.gather_counts(counts[0], world, device)
        if min(counts) == 0 or sum(counts) < 2:
            continue
        yield torch.cat([v for v, _ in parts]), torch.cat([c for _, c in parts]), counts


# ---- evaluation used for model selection -------------------------------------------------------

@torch.no_grad()
def similarity(head: RetrievalHead, data: SplitTensors, device: torch.device, *, amp: bool = True,
               video_chunk: int = 64, text_chunk: int = 2048) -> torch.Tensor:
    """[captions, videos] similarities of a whole split, encoded and scored in chunks."""
    head.eval()
    with autocast(device, amp):
        videos = encode_in_chunks(head.encode_videos, data.videos, device, chunk=256)
        texts = encode_in_chunks(head.encode_texts, data.captions, device, chunk=4096)
        return chunked_scores(head, texts, videos, video_chunk=video_chunk, text_chunk=text_chunk)


def t2v_recall_at_1(sim: torch.Tensor, caption_video: torch.Tensor) -> float:
    """Text-to-video R@1 in percent, by the same conventions as `avr eval`
    (:mod:`avr.evaluate.metrics`: failed videos count as misses, ties are not wins)."""
    from avr.evaluate import metrics

    ranks = metrics.t2v_ranks(sim.float().cpu(), caption_video.cpu())
    return metrics.metrics_from_ranks(ranks)["R1"]


# ---- the loop ----------------------------------------------------------------------------------

@dataclass
class EpochLog:
    epoch: int
    loss: float
    val_r1: float
    lr: float
    seconds: float
    pairs_per_s: float
    temperature: float


@dataclass
class TrainResult:
    run_dir: Path | None
    best_epoch: int
    best_val_r1: float
    history: list[EpochLog]
    seconds: float
    train_videos: int  # train videos this process loaded: its shard's alone on a rank of several


def _to(tensors: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in tensors.items()}


def make_optimizer(head: RetrievalHead, config: TrainConfig, total_steps: int):
    """AdamW without decay on biases, norms and the temperature; warmup then cosine."""
    decay, no_decay = [], []
    for name, param in head.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "logit_scale" in name else decay).append(param)
    optimizer = torch.optim.AdamW([
        {"params": decay, "weight_decay": config.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ], lr=config.lr, betas=(0.9, 0.98), eps=1e-6)
    warmup_steps = int(config.warmup * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at ``step``: linear warmup, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def steps_per_epoch(data: SplitTensors, config: TrainConfig, world: World = distributed.SINGLE,
                    device: torch.device = CPU) -> int:
    """Batches of an epoch as the schedule counts them: those of the largest shard."""
    held = 1 if world.is_distributed else config.shards  # a rank holds its own shard alone
    caption_video = data.caption_video.cpu()
    sizes = [len(range(shard, data.num_videos, held)) if config.pairs == "one"
             else int(((caption_video >= 0) & (caption_video % held == shard)).sum())
             for shard in range(held)]
    if world.is_distributed:
        sizes = distributed.gather_counts(sizes[0], world, device)
    return max(1, math.ceil(max(sizes) / (config.batch_size // config.shards)))


def batch_loss(head: RetrievalHead, data: SplitTensors, video_rows: torch.Tensor,
               caption_rows: torch.Tensor, counts: list[int], device: torch.device,
               world: World) -> torch.Tensor:
    """The loss of one global batch of pairs. Alone: encode and score the batch. On several ranks:
    encode this rank's rows (``counts[r]`` on rank r), gather the states of the whole batch,
    score all of it."""
    rows_device = data.caption_video.device
    videos = _to(data.video_rows(video_rows.to(rows_device)), device)
    captions = _to(data.caption_rows(caption_rows.to(rows_device)), device)
    texts, video_state = head.encode_texts(captions), head.encode_videos(videos)
    if world.is_distributed:
        texts = distributed.gather_state(texts, counts, world)
        video_state = distributed.gather_state(video_state, counts, world)
    loss, _ = head.loss(texts, video_state)
    return loss


def train_epoch(head: RetrievalHead, data: SplitTensors, config: TrainConfig, optimizer, scheduler,
                device: torch.device, epoch: int, world: World = distributed.SINGLE
                ) -> tuple[float, int]:
    """One pass over the epoch's pairs; returns (mean loss, pairs seen by all ranks)."""
    head.train()
    losses, seen = [], 0
    for v, c, counts in epoch_batches(data, config, epoch, world, device):
        with autocast(device, config.amp):
            loss = batch_loss(head, data, v, c, counts, device, world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(head.parameters(), world)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        head.clamp_logit_scale()  # CLIP's clamp, after the step as CLIP4Clip and X-Pool do
        losses.append(loss.detach())
        seen += sum(counts)
    mean_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    return mean_loss, seen


def fit(head: RetrievalHead, cache: CacheData, config: TrainConfig, device: torch.device, *,
        run_dir: Path | None = None, start_epoch: int = 0, optimizer=None, scheduler=None,
        best: tuple[int, float] = (-1, -1.0), history: list[EpochLog] | None = None,
        on_epoch: Callable[[EpochLog], bool | None] | None = None,
        world: World = distributed.SINGLE) -> TrainResult:
    """Train ``head`` from ``start_epoch`` to ``config.epochs``; checkpoints go to ``run_dir``.
    ``on_epoch`` sees each epoch's log; it returns True to stop after that epoch (a sweep's
    pruner). On several ranks only rank 0 validates, writes ``run_dir`` and calls ``on_epoch``."""
    total_steps = steps_per_epoch(cache.train, config, world, device) * config.epochs
    if optimizer is None:
        optimizer, scheduler = make_optimizer(head, config, total_steps)
    history = list(history or [])
    best_epoch, best_r1 = best
    writes = run_dir is not None and world.is_main
    writer = _tensorboard(run_dir if writes else None)
    started = time.perf_counter()
    for epoch in range(start_epoch, config.epochs):
        epoch_start = time.perf_counter()
        loss, seen = train_epoch(head, cache.train, config, optimizer, scheduler, device, epoch,
                                 world)
        train_seconds = time.perf_counter() - epoch_start
        val_r1 = None
        if world.is_main:
            sim = similarity(head, cache.val, device, amp=config.amp,
                             video_chunk=config.val_video_chunk,
                             text_chunk=config.val_text_chunk)
            val_r1 = t2v_recall_at_1(sim, cache.val.caption_video)
        val_r1 = distributed.broadcast_object(val_r1, world)  # the others wait here
        log = EpochLog(epoch + 1, loss, val_r1, scheduler.get_last_lr()[0],
                       time.perf_counter() - epoch_start, seen / max(train_seconds, 1e-9),
                       float(1.0 / head.scale().detach()))
        history.append(log)
        improved = val_r1 > best_r1
        if improved:
            best_epoch, best_r1 = epoch + 1, val_r1
        if writes:
            if improved:
                checkpoint.save_weights(head, run_dir / checkpoint.BEST_FILE,
                                        metadata={"epoch": str(epoch + 1), "val_R1": str(val_r1)})
            save_last(head, optimizer, scheduler, run_dir, epoch + 1, best_epoch, best_r1)
            _append_log(run_dir, log)
            if writer is not None:
                for key in ("loss", "val_r1", "lr", "temperature", "pairs_per_s"):
                    writer.add_scalar(key, getattr(log, key), epoch + 1)
                writer.flush()
        stop = bool(on_epoch(log)) if on_epoch is not None and world.is_main else False
        if distributed.broadcast_object(stop, world):
            break
        if config.early_stop and epoch + 1 - best_epoch >= config.early_stop:
            break
    if writer is not None:
        writer.close()
    distributed.barrier(world)  # the run directory is complete when any rank returns
    return TrainResult(run_dir, best_epoch, best_r1, history, time.perf_counter() - started,
                       cache.train.num_videos)


def _tensorboard(run_dir: Path | None):
    if run_dir is None:
        return None
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir))


def _append_log(run_dir: Path, log: EpochLog) -> None:
    path = run_dir / checkpoint.LOG_FILE
    row = dataclasses.asdict(log)
    new = not path.exists()
    with path.open("a", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


# ---- last checkpoint: weights + optimizer + progress, all in safetensors ----------------------

def save_last(head, optimizer, scheduler, run_dir: Path, epoch: int, best_epoch: int,
              best_r1: float) -> None:
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
    tensors["rng.torch"] = torch.get_rng_state()
    meta = {"epoch": str(epoch), "best_epoch": str(best_epoch), "best_val_R1": str(best_r1),
            "param_groups": json.dumps(state["param_groups"]),
            "scheduler": json.dumps(scheduler.state_dict())}
    tmp = run_dir / (checkpoint.LAST_FILE + ".tmp")
    checkpoint.save_weights(head, tmp, extra=tensors, metadata=meta)
    tmp.replace(run_dir / checkpoint.LAST_FILE)  # a kill never leaves a half-written last


def load_last(head, optimizer, scheduler, run_dir: Path) -> tuple[int, int, float]:
    from safetensors import safe_open

    path = run_dir / checkpoint.LAST_FILE
    if not path.exists():
        raise RunError(f"{path} not found: nothing to resume")
    extra = checkpoint.load_weights(head, path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in extra.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    scheduler.load_state_dict(json.loads(meta["scheduler"]))
    torch.set_rng_state(extra["rng.torch"])
    return int(meta["epoch"]), int(meta["best_epoch"]), float(meta["best_val_R1"])


def read_log(run_dir: Path) -> list[EpochLog]:
    path = run_dir / checkpoint.LOG_FILE
    if not path.exists():
        return []
    with path.open() as handle:
        return [EpochLog(int(r["epoch"]), float(r["loss"]), float(r["val_r1"]), float(r["lr"]),
                         float(r["seconds"]), float(r["pairs_per_s"]), float(r["temperature"]))
                for r in csv.DictReader(handle)]


# ---- entry point -------------------------------------------------------------------------------

def default_run_dir(head: str, runs_dir: Path = checkpoint.DEFAULT_RUNS_DIR) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{stamp}-{head}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_dir / f"{stamp}-{head}-{suffix}"
    return run_dir


def train(cache_path: str | Path, config: TrainConfig, run_dir: Path | None = None, *,
          cache: CacheData | None = None,
          on_epoch: Callable[[EpochLog], bool | None] | None = None) -> TrainResult:
    """Train a new run of ``config.head`` on the store at ``cache_path`` (on every rank when
    started by torchrun; a new run left at ``shards=1`` takes one shard per rank)."""
    config.validate()
    with distributed.session(resolve_device(config.device)) as (world, device):
        if world.is_distributed and config.shards == 1:
            config = dataclasses.replace(config, shards=world.size)
            config.validate()
        check_world(config, world)
        return _train(cache_path, config, run_dir, cache, on_epoch, world, device)


def _train(cache_path, config: TrainConfig, run_dir: Path | None, cache: CacheData | None,
           on_epoch, world: World, device: torch.device) -> TrainResult:
    seed_everything(config.seed)
    cache = cache or load_cache(cache_path, config.head, device, world,
                                head_options=[config.head_options])
    head = build_head(config.head, cache.spec, config.head_options).to(device)
    distributed.broadcast_module(head, world)
    # Rank 0 names the run and decides whether it is taken; every rank acts on its answer.
    run_dir = run_dir or default_run_dir(config.head)
    run_dir, taken = distributed.broadcast_object(
        (run_dir, (run_dir / checkpoint.CONFIG_FILE).exists()), world)
    if taken:
        raise RunError(f"{run_dir} already holds a run; continue it with `avr train --resume "
                       f"{run_dir}` or choose another --run-dir")
    if world.is_main:
        checkpoint.write_config(run_dir, _run_config(cache_path, config, cache, head, world))
    return fit(head, cache, config, device, run_dir=run_dir, on_epoch=on_epoch, world=world)


def _run_config(cache_path, config: TrainConfig, cache: CacheData, head: RetrievalHead,
                world: World) -> dict[str, Any]:
    return {
        "head": config.head,
        "head_options": head.config_dict(),
        "train": dataclasses.asdict(config),
        "cache": {"path": schema.location_text(cache_path),
                  "identity": schema.cache_identity(cache.spec)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "world_size": world.size,  # the global batch is batch_size whatever the world size
    }


def resume(run_dir: str | Path, *, epochs: int | None = None, cache_path: str | Path | None = None,
           on_epoch: Callable[[EpochLog], bool | None] | None = None) -> TrainResult:
    """Continue a run from its last checkpoint (to ``epochs`` if given, else its own total), in
    one process or on as many ranks as the run has shards: either composes the same batches."""
    run_dir = Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    config = TrainConfig(**{k: v for k, v in saved["train"].items() if k in TRAIN_FIELDS})
    if epochs is not None:
        config.epochs = epochs
        saved["train"]["epochs"] = epochs
    with distributed.session(resolve_device(config.device)) as (world, device):
        check_world(config, world)
        return _resume(run_dir, saved, config, cache_path, on_epoch, world, device)


def _resume(run_dir: Path, saved: dict[str, Any], config: TrainConfig, cache_path, on_epoch,
            world: World, device: torch.device) -> TrainResult:
    cache_path = schema.store_location(cache_path or saved["cache"]["path"])
    head_options = saved.get("head_options", {})
    cache = load_cache(cache_path, config.head, device, world, head_options=[head_options])
    checkpoint.check_cache(saved, cache.spec, cache_path)
    head = build_head(config.head, cache.spec, head_options).to(device)
    total_steps = steps_per_epoch(cache.train, config, world, device) * config.epochs
    optimizer, scheduler = make_optimizer(head, config, total_steps)
    start, best_epoch, best_r1 = load_last(head, optimizer, scheduler, run_dir)
    if start >= config.epochs:
        raise RunError(f"{run_dir} already trained {start} of {config.epochs} epochs; "
                       f"pass --epochs N with N > {start} to train longer")
    history = read_log(run_dir)
    distributed.barrier(world)  # every rank has read the run before rank 0 writes to it
    if world.is_main:
        checkpoint.write_config(run_dir, saved)
    return fit(head, cache, config, device, run_dir=run_dir, start_epoch=start,
               optimizer=optimizer, scheduler=scheduler, best=(best_epoch, best_r1),
               history=history, on_epoch=on_epoch, world=world)
