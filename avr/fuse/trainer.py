"""The trainer: one split of the cache in memory, a head, symmetric InfoNCE, val every epoch.

Readable top to bottom: ``train`` loads the cache once, builds the head and the optimizer, and
runs ``fit``; ``fit`` loops over epochs, each epoch samples one caption per video (or every
caption with ``pairs="all"``), steps through batches, evaluates on val, and keeps the best
checkpoint by val text-to-video R@1 (never the test split).

Everything a run needs to be rebuilt goes in ``config.json``; weights in safetensors.

Under ``torchrun --nproc-per-node N -m avr train ...`` (WORLD_SIZE > 1 in the environment)
``train`` and ``resume`` join the process group and every rank trains its slice of each global
batch, with the loss over the whole global batch; rank 0 validates and writes the run. The
mechanics and why the result equals one process are in :mod:`avr.fuse.distributed`.
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
from avr.fuse.heads import build_head, head_class, make_config
from avr.fuse.heads.base import LOGIT_SCALE_MAX, RetrievalHead, chunked_scores, encode_in_chunks

DEFAULT_CACHE = Path("cache")


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
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA
    val_video_chunk: int = 64
    val_text_chunk: int = 2048

    def validate(self) -> None:
        if self.pairs not in ("one", "all"):
            raise AvrError(f"pairs must be 'one' or 'all', not {self.pairs!r}")
        if self.epochs < 1 or self.batch_size < 2:
            raise AvrError("epochs must be >= 1 and batch size >= 2 (InfoNCE needs negatives)")
        make_config(self.head, self.head_options)  # unknown head options fail now, not later


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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- data ------------------------------------------------------------------------------------

@dataclass
class CacheData:
    """The train and val splits of a store, loaded once (shared by every trial of a sweep)."""

    path: Path
    spec: schema.CacheSpec
    train: SplitTensors
    val: SplitTensors


def load_cache(path: str | Path, head: str, device: torch.device) -> CacheData:
    """Load train and val with the arrays ``head`` needs: on ``device`` when they fit."""
    cls = head_class(head)
    path = Path(path)
    splits = {}
    for split in ("train", "val"):
        data = load_split(path, split, cls.video_inputs, cls.caption_inputs)
        if data.num_videos == 0:
            raise AvrError(f"{path}: the {split} split has no extracted videos")
        splits[split] = data
    needed = sum(s.nbytes() for s in splits.values())
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        if needed < 0.8 * free:
            splits = {k: v.to(device) for k, v in splits.items()}
        else:  # keep on the host, pinned, and move each batch
            splits = {k: _pin(v) for k, v in splits.items()}
    return CacheData(path, splits["train"].spec, splits["train"], splits["val"])


def _pin(data: SplitTensors) -> SplitTensors:
    data.videos = {k: v.pin_memory() for k, v in data.videos.items()}
    data.captions = {k: v.pin_memory() for k, v in data.captions.items()}
    return data


def epoch_pairs(data: SplitTensors, pairs: str, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(video rows, caption rows) of one epoch, shuffled. ``one``: one random caption per video."""
    caption_video = data.caption_video.cpu()
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


def batches(video_rows: torch.Tensor, caption_rows: torch.Tensor, batch_size: int):
    """Batches of paired rows; a batch holds each video at most once (distinct negatives)."""
    for start in range(0, len(video_rows), batch_size):
        v, c = video_rows[start:start + batch_size], caption_rows[start:start + batch_size]
        if len(v) < 2:
            continue
        if len(torch.unique(v)) < len(v):  # with pairs="all" two captions of one video can meet
            _, keep = np.unique(v.numpy(), return_index=True)
            keep = torch.from_numpy(np.sort(keep))
            v, c = v[keep], c[keep]
        yield v, c


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

    def schedule(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def steps_per_epoch(data: SplitTensors, config: TrainConfig) -> int:
    n = data.num_videos if config.pairs == "one" else int((data.caption_video >= 0).sum())
    return max(1, math.ceil(n / config.batch_size))


def batch_loss(head: RetrievalHead, data: SplitTensors, video_rows: torch.Tensor,
               caption_rows: torch.Tensor, device: torch.device, world: World) -> torch.Tensor:
    """The loss of one global batch of pairs. Alone: encode and score the batch. On several ranks:
    encode this rank's slice, gather the states of the whole batch, score all of it."""
    rows_device = data.caption_video.device
    counts = distributed.shard_counts(len(video_rows), world)
    video_rows = distributed.shard(video_rows, world)
    caption_rows = distributed.shard(caption_rows, world)
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
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    video_rows, caption_rows = epoch_pairs(data, config.pairs, generator)
    losses, seen = [], 0
    for v, c in batches(video_rows, caption_rows, config.batch_size):
        if len(v) < world.size:  # a rank would hold no rows
            continue
        with autocast(device, config.amp):
            loss = batch_loss(head, data, v, c, device, world)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(head.parameters(), world)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            if isinstance(head.logit_scale, torch.nn.Parameter):
                head.logit_scale.clamp_(max=LOGIT_SCALE_MAX)
        losses.append(loss.detach())
        seen += len(v)
    mean_loss = float(torch.stack(losses).float().mean()) if losses else float("nan")
    return mean_loss, seen


def fit(head: RetrievalHead, cache: CacheData, config: TrainConfig, device: torch.device, *,
        run_dir: Path | None = None, start_epoch: int = 0, optimizer=None, scheduler=None,
        best: tuple[int, float] = (-1, -1.0), history: list[EpochLog] | None = None,
        on_epoch: Callable[[EpochLog], None] | None = None,
        world: World = distributed.SINGLE) -> TrainResult:
    """Train ``head`` from ``start_epoch`` to ``config.epochs``; checkpoints go to ``run_dir``.
    On several ranks only rank 0 validates, writes ``run_dir`` and calls ``on_epoch``."""
    total_steps = steps_per_epoch(cache.train, config) * config.epochs
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
        if on_epoch is not None and world.is_main:
            on_epoch(log)
        if config.early_stop and epoch + 1 - best_epoch >= config.early_stop:
            break
    if writer is not None:
        writer.close()
    distributed.barrier(world)  # the run directory is complete when any rank returns
    return TrainResult(run_dir, best_epoch, best_r1, history, time.perf_counter() - started)


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
          on_epoch: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """Train a new run of ``config.head`` on the store at ``cache_path`` (on every rank when
    started by torchrun)."""
    config.validate()
    with distributed.session(resolve_device(config.device)) as (world, device):
        return _train(cache_path, config, run_dir, cache, on_epoch, world, device)


def _train(cache_path, config: TrainConfig, run_dir: Path | None, cache: CacheData | None,
           on_epoch, world: World, device: torch.device) -> TrainResult:
    seed_everything(config.seed)
    cache = cache or load_cache(cache_path, config.head, device)
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
        "cache": {"path": str(Path(cache_path).resolve()),
                  "identity": schema.cache_identity(cache.spec)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "world_size": world.size,  # the global batch is batch_size whatever the world size
    }


def resume(run_dir: str | Path, *, epochs: int | None = None, cache_path: str | Path | None = None,
           on_epoch: Callable[[EpochLog], None] | None = None) -> TrainResult:
    """Continue a run from its last checkpoint (to ``epochs`` if given, else its own total), on
    any number of ranks: the global batch, hence the run, does not depend on it."""
    run_dir = Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    config = TrainConfig(**{k: v for k, v in saved["train"].items() if k in TRAIN_FIELDS})
    if epochs is not None:
        config.epochs = epochs
        saved["train"]["epochs"] = epochs
    with distributed.session(resolve_device(config.device)) as (world, device):
        return _resume(run_dir, saved, config, cache_path, on_epoch, world, device)


def _resume(run_dir: Path, saved: dict[str, Any], config: TrainConfig, cache_path, on_epoch,
            world: World, device: torch.device) -> TrainResult:
    cache_path = Path(cache_path or saved["cache"]["path"])
    cache = load_cache(cache_path, config.head, device)
    checkpoint.check_cache(saved, cache.spec, cache_path)
    head = build_head(config.head, cache.spec, saved.get("head_options", {})).to(device)
    total_steps = steps_per_epoch(cache.train, config) * config.epochs
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
