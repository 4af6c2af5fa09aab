"""The trainer: a head trained on a store's train split, validated on val after every epoch,
its best checkpoint kept by val text-to-video R@1 (never chosen on test).

Read it top to bottom: a run is built once (``build_run``: the head, its optimizer and schedule,
seeded or resumed), ``fit`` loops over epochs, ``train_epoch`` steps through the batches the
train split hands out (``TrainSplit.batches``: resident or streamed alike), ``batch_loss`` is
where the loss is computed, ``validate`` scores val, and ``end_epoch`` (shared with the stacked
trials of ``avr.fuse.stacked``) logs the epoch, keeps the best checkpoint and decides early
stopping. The entry points follow: ``train`` (a new run), ``resume`` (a run's last checkpoint)
and ``train_from_options`` (what `avr train` asks for, flags and files included).

Policy lives beside the loop: ``avr.fuse.schedule`` (the unset epochs, batch and lr),
``avr.fuse.optim`` (AdamW, no-decay rule, warmup and cosine), ``avr.fuse.loading`` (the store's
splits under a residency plan), ``avr.fuse.sampling`` (which pairs train together) and
``avr.fuse.ddp`` (torchrun: rank r holds shard r, rank 0 validates and writes). Everything a run
needs to be rebuilt goes in ``config.json``; weights in safetensors.
"""

from __future__ import annotations

import dataclasses
import itertools
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from avr.device import autocast, resolve_device
from avr.errors import AvrError, RunError, RunInterrupted
from avr.evaluate.score import score_split
from avr.fuse import checkpoint, ddp
from avr.fuse.checkpoint import EpochLog, RunProgress, TrainState
from avr.fuse.config import (RESUMABLE, TrainConfig, TrainRequest, resume_changes,
                             saved_train_config, train_config)
from avr.fuse.ddp import World
from avr.fuse.heads import build_head
from avr.fuse.heads.base import RetrievalHead
from avr.fuse.loggers import RunLoggers
from avr.fuse.loading import CacheData, load_cache, require_head_arrays
from avr.fuse.optim import make_optimizer
from avr.fuse.residency import ResidencyPlan
from avr.fuse.schedule import plan_run, resolve_schedule, schedule_for_store
from avr.store.location import location_text, store_location
from avr.store.quantize import Held, on_device
from avr.store.splits import SplitTensors

# The loop and its entry points, and what callers of a run reach through it from the modules
# beside it.
__all__ = ["DEFAULT_CACHE", "CacheData", "Run", "RunStart", "TrainConfig", "TrainResult",
           "build_run", "dry_run", "end_epoch", "fit", "load_cache", "resolve_schedule", "resume",
           "schedule_for_store", "train", "train_from_options", "validate"]

DEFAULT_CACHE = Path("cache")
# What a run written before residency plans did: both splits resident, drawn by epoch_batches.
RESIDENT_BEFORE_PLANS = {"train": {"mode": "device"}}

HeldRows = dict[str, Held]  # a batch's rows of each array, as the split holds them


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- a run: built once ---------------------------------------------------------------------------

@dataclass
class Run:
    """What ``fit`` trains: the options, the data, the state, and where it runs and writes."""

    config: TrainConfig
    cache: CacheData
    state: TrainState
    device: torch.device
    world: World = ddp.SINGLE
    run_dir: Path | None = None  # None: nothing is written (a sweep's in-memory trial)


def build_run(config: TrainConfig, cache: CacheData, device: torch.device,
              world: World = ddp.SINGLE, *, run_dir: Path | None = None,
              resume: bool = False) -> Run:
    """The head of ``config``, its optimizer and schedule: seeded and new, or with ``resume``
    continued from ``run_dir``'s last checkpoint (weights, optimizer, schedule, RNG, log)."""
    if not resume:
        seed_everything(config.seed)
    head = build_head(config.head, cache.spec, config.head_options).to(device)
    ddp.broadcast_module(head, world)
    total_steps = cache.train.steps_per_epoch(config, world, device) * config.epochs
    optimizer, scheduler = make_optimizer(head, config, total_steps)
    state = TrainState(head, optimizer, scheduler)
    if resume:
        state.load_last(run_dir)
    return Run(config, cache, state, device, world, run_dir)


# ---- the loop ------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    run_dir: Path | None
    best_epoch: int
    best_val_r1: float
    history: list[EpochLog]
    seconds: float
    train_videos: int  # train videos this process loaded: its shard's alone on a rank of several


# Called after every epoch with its number (from 1) and its log; True stops the run there.
EpochCallback = Callable[[int, EpochLog], "bool | None"]


def fit(run: Run, on_epoch: EpochCallback | None = None) -> TrainResult:
    """Train ``run`` from the epoch its state has reached to ``config.epochs``. On several ranks
    only rank 0 validates, writes the run directory and calls ``on_epoch``. Ctrl-C ends the run
    once the epoch under way is saved (a second Ctrl-C at once): ``RunInterrupted`` says how
    to resume."""
    config, state, world = run.config, run.state, run.world
    loggers = None
    if run.run_dir is not None and world.is_main:
        loggers = RunLoggers(run.run_dir, checkpoint.read_config(run.run_dir), config.loggers)
    started = time.perf_counter()
    try:
        with ctrl_c_ends_the_epoch() as interrupted:
            for epoch in range(state.progress.epoch, config.epochs):
                epoch_start = time.perf_counter()
                loss, parts, seen = train_epoch(run, epoch)
                train_seconds = time.perf_counter() - epoch_start
                val = ddp.broadcast_object(validate(run) if world.is_main else None, world)
                log = EpochLog(epoch + 1, loss, val["R1"], state.scheduler.get_last_lr()[0],
                               time.perf_counter() - epoch_start,
                               seen / max(train_seconds, 1e-9),
                               float(1.0 / state.head.scale().detach()), parts,
                               val["R5"], val["R10"], val["MdR"])
                stop = end_epoch(state.progress, log, config, state.head,
                                 run.run_dir if world.is_main else None, loggers,
                                 state.save_last)
                asked = bool(on_epoch(epoch + 1, log)) if on_epoch is not None and \
                    world.is_main else False
                if ddp.broadcast_object(asked, world) or stop:
                    break
                if ddp.broadcast_object(interrupted(), world) and epoch + 1 < config.epochs:
                    raise KeyboardInterrupt
    except KeyboardInterrupt:
        if run.run_dir is None:
            raise
        raise RunInterrupted(f"stopped by Ctrl-C after {state.progress.epoch} of "
                             f"{config.epochs} epochs; {run.run_dir} keeps them: continue with "
                             f"`avr train --resume {run.run_dir}`") from None
    finally:
        if loggers is not None:
            loggers.close()
    ddp.barrier(world)  # the run directory is complete when any rank returns
    return TrainResult(run.run_dir, state.progress.best_epoch, state.progress.best_r1,
                       state.progress.history, time.perf_counter() - started,
                       run.cache.train.num_videos)


@contextmanager
def ctrl_c_ends_the_epoch() -> Iterator[Callable[[], bool]]:
    """The first Ctrl-C (SIGINT) asks the loop to stop once the epoch under way is saved; the
    second stops at once (the epoch under way is lost, the saved ones are kept). Yields whether
    a stop was asked; a no-op off the main thread, where signals cannot be handled."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    asked = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_ctrl_c(signum, frame):
        if asked.is_set():
            raise KeyboardInterrupt
        asked.set()
        sys.stderr.write("\nCtrl-C: stopping once this epoch is saved (Ctrl-C again stops "
                         "now)\n")

    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield asked.is_set
    finally:
        signal.signal(signal.SIGINT, previous)


def train_epoch(run: Run, epoch: int, max_batches: int | None = None
                ) -> tuple[float, dict[str, float], int]:
    """One pass over the epoch's batches (its first ``max_batches`` when given: ``avr bench
    train``); returns (mean loss, mean of each of the head's loss parts, pairs seen by all ranks).
    Losses stay on the device until the epoch ends."""
    config, head, device = run.config, run.state.head, run.device
    optimizer, scheduler = run.state.optimizer, run.state.scheduler
    video_block = run.cache.plan.step_videos if run.cache.plan else 0
    head.train()
    losses, part_sums, seen = [], {}, 0
    batches = run.cache.train.batches(config, epoch, run.world, device)
    for videos, captions, counts in itertools.islice(batches, max_batches):
        with autocast(device, config.amp):
            loss, parts = batch_loss(head, videos, captions, counts, device, run.world,
                                     video_block)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ddp.average_gradients(head.parameters(), run.world)
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(head.parameters(), config.grad_clip)
        optimizer.step()
        scheduler.step()
        head.clamp_logit_scale()  # CLIP's clamp, after the step as CLIP4Clip and X-Pool do
        losses.append(loss.detach())
        for name, value in parts.items():
            part_sums[name] = part_sums.get(name, 0.0) + value.detach().float()
        seen += sum(counts)
    if not losses:
        return float("nan"), {}, seen
    mean_loss = float(torch.stack(losses).float().mean())
    names = [name for name in part_sums if name != "loss"]  # the loss column already holds it
    means = torch.stack([part_sums[name] for name in names]).cpu() / len(losses) if names else []
    return mean_loss, {name: float(mean) for name, mean in zip(names, means)}, seen


def batch_loss(head: RetrievalHead, videos: HeldRows, captions: HeldRows, counts: list[int],
               device: torch.device, world: World, video_block: int = 0
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss (and its parts) of one global batch of pairs. Alone: encode and score the batch
    (its videos ``video_block`` at a time under activation checkpointing, when given).
    On several ranks: encode this rank's rows (``counts[r]`` on rank r), gather the states of the
    whole batch, score all of it."""
    videos, captions = on_device(videos, device), on_device(captions, device)
    if video_block and not world.is_distributed and video_block < sum(counts):
        return head.loss_in_video_blocks(head.encode_texts(captions), videos, video_block)
    texts, video_state = head.encode_texts(captions), head.encode_videos(videos)
    if world.is_distributed:
        texts = ddp.gather_state(texts, counts, world)
        video_state = ddp.gather_state(video_state, counts, world)
    return head.loss(texts, video_state)


# ---- validation and the end of an epoch -----------------------------------------------------------

def validate(run: Run) -> dict[str, float]:
    """Val text-to-video metrics of the run's head (R1, R5, R10, MdR, ...)."""
    plan = run.cache.plan
    return val_metrics(run.state.head, run.cache.val, run.device, run.config,
                       plan.work_bytes if plan else None)


def val_metrics(head: RetrievalHead, val: SplitTensors, device: torch.device,
                config: TrainConfig, work_bytes: int | None = None) -> dict[str, float]:
    """Val text-to-video R@1, R@5, R@10 (percent), MdR and MnR, by the conventions of `avr eval`
    (:mod:`avr.evaluate.metrics`: failed videos count as misses, ties are not wins); scored
    within ``work_bytes`` of working memory when given (the plan's, under --memory-budget)."""
    from avr.evaluate import metrics

    sim = score_split(head, val.videos, val.captions, device, amp=config.amp,
                      score_chunk=config.score_chunk, work_bytes=work_bytes).sim
    return metrics.metrics_from_ranks(metrics.t2v_ranks(sim, val.caption_video.cpu()))


def end_epoch(progress: RunProgress, log: EpochLog, config: TrainConfig, head: RetrievalHead,
              run_dir: Path | None, loggers: RunLoggers | None = None,
              save_last: Callable[[Path], None] | None = None) -> bool:
    """The end of an epoch, for a run alone and for each stacked trial: the log recorded, the
    best checkpoint kept when val R@1 improved (``head``: the weights to keep), last.safetensors
    (``save_last``, for a run that can resume), a row of log.csv in ``run_dir`` (None: nothing
    written) and the epoch's figures to the run's ``loggers``. Returns whether early stopping
    ends the run here."""
    progress.epoch = log.epoch
    progress.history.append(log)
    improved = log.val_r1 > progress.best_r1
    if improved:
        progress.best_epoch, progress.best_r1 = log.epoch, log.val_r1
    if run_dir is not None:
        if improved:
            checkpoint.save_weights(head, run_dir / checkpoint.BEST_FILE,
                                    metadata={"epoch": str(log.epoch), "val_R1": str(log.val_r1)})
        if save_last is not None:
            save_last(run_dir)
        checkpoint.append_log(run_dir, log)
    if loggers is not None:
        loggers.epoch(log)
    return bool(config.early_stop) and log.epoch - progress.best_epoch >= config.early_stop


# ---- entry points --------------------------------------------------------------------------------

@dataclass
class RunStart:
    """What a run says before its first epoch: its head, store and folder, the epochs it trains
    to (``done`` of them already, when resumed) and where its arrays are held."""

    head: str
    cache: str
    run_dir: Path
    epochs: int
    done: int
    plan: ResidencyPlan | None
    note: str | None = None  # what the run did to its folder first (an empty run replaced)


# Called once the cache is loaded and the run built, before the first epoch.
StartCallback = Callable[[RunStart], None]


def default_run_dir(head: str, runs_dir: Path = checkpoint.DEFAULT_RUNS_DIR) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{stamp}-{head}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_dir / f"{stamp}-{head}-{suffix}"
    return run_dir


def train(cache_path: str | Path, config: TrainConfig, run_dir: str | Path | None = None, *,
          cache: CacheData | None = None, on_epoch: EpochCallback | None = None,
          on_start: StartCallback | None = None) -> TrainResult:
    """Train a new run of ``config.head`` on the store at ``cache_path`` into ``run_dir``
    (default ``runs/<time>-<head>``; on every rank when started by torchrun; a new run left at
    ``shards=1`` takes one shard per rank). The run folder is locked while the run writes it; a
    folder holding a run that finished no epoch is replaced (``RunStart.note`` says so)."""
    with ddp.session(resolve_device(config.device)) as (world, device):
        if world.is_distributed and config.shards == 1:
            config = dataclasses.replace(config, shards=world.size)
        config.validate()
        ddp.check_shards(config, world)
        config, schedule = schedule_for_store(cache_path, config)
        run_dir = ddp.broadcast_object(Path(run_dir) if run_dir is not None
                                       else default_run_dir(config.head), world)
        with claim_run_folder(run_dir, world, new=True) as note:
            cache = cache or load_cache(cache_path, config.head, device, world,
                                        head_options=[config.head_options], config=config)
            run = build_run(config, cache, device, world, run_dir=run_dir)
            if world.is_main:
                checkpoint.write_config(run_dir, run_config_dict(
                    cache_path, config, schedule, cache.identity, run.state.head, world,
                    cache.plan))
            _started(run, cache_path, on_start, note)
            return fit(run, on_epoch)


def resume(run_dir: str | Path, changes: dict[str, Any] | None = None, *,
           cache_path: str | Path | None = None, on_epoch: EpochCallback | None = None,
           on_start: StartCallback | None = None) -> TrainResult:
    """Continue a run from its last checkpoint, with ``changes`` to its ``RESUMABLE`` options
    (``epochs``: train to that many), in one process or on as many ranks as the run has shards:
    either composes the same batches. ``cache_path``: the run's store at another location (it
    must hold the same content; the run records the new location)."""
    run_dir = Path(run_dir)
    changes = dict(changes or {})
    refused = sorted(set(changes) - set(RESUMABLE))
    if refused:
        raise AvrError(f"{run_dir}: {', '.join(refused)} cannot change when a run resumes; "
                       f"only {', '.join(RESUMABLE)} can")
    saved = checkpoint.read_config(run_dir)
    config = dataclasses.replace(saved_train_config(saved["train"]),
                                 head_options=saved.get("head_options", {}), **changes)
    config.validate()
    saved["train"].update(changes)
    with ddp.session(resolve_device(config.device)) as (world, device):
        ddp.check_shards(config, world)
        with claim_run_folder(run_dir, world, new=False):
            cache_path = store_location(cache_path or saved["cache"]["path"])
            cache = load_cache(cache_path, config.head, device, world,
                               head_options=[config.head_options], config=config,
                               saved_residency=saved.get("residency") or RESIDENT_BEFORE_PLANS)
            checkpoint.check_cache(saved, cache.identity, cache_path)
            run = build_run(config, cache, device, world, run_dir=run_dir, resume=True)
            if run.state.progress.epoch >= config.epochs:
                raise RunError(f"{run_dir} already trained {run.state.progress.epoch} of "
                               f"{config.epochs} epochs; pass --epochs N with N > "
                               f"{run.state.progress.epoch} to train longer")
            ddp.barrier(world)  # every rank has read the run before rank 0 writes to it
            if world.is_main:
                saved["cache"]["path"] = location_text(cache_path)
                saved["cache"]["identity"] = {**saved["cache"]["identity"],
                                              "content": cache.identity["content"]}
                checkpoint.write_config(run_dir, saved)
            _started(run, cache_path, on_start)
            return fit(run, on_epoch)


@contextmanager
def claim_run_folder(run_dir: Path, world: World, *, new: bool) -> Iterator[str | None]:
    """Hold ``run_dir``'s lock (rank 0; every rank raises what rank 0 found) and drop what a
    killed writer left half-written. For a ``new`` run, a folder holding a run with finished
    epochs is refused; one whose run finished none is emptied, and the note yielded says so."""
    lock = note = found = None
    if world.is_main:
        try:
            lock = checkpoint.run_lock(run_dir).acquire()
            checkpoint.remove_temporaries(run_dir)
            note = _room_for_a_new_run(run_dir) if new else None
        except AvrError as error:
            if lock is not None:
                lock.release()
                lock = None
            found = error
    error = ddp.broadcast_object(found, world)
    if error is not None:
        raise error
    try:
        yield note
    finally:
        if lock is not None:
            lock.release()


def _room_for_a_new_run(run_dir: Path) -> str | None:
    if not (run_dir / checkpoint.CONFIG_FILE).exists():
        return None
    if checkpoint.finished_epochs(run_dir) or (run_dir / checkpoint.LAST_FILE).exists():
        raise RunError(f"{run_dir} already holds a run; continue it with `avr train --resume "
                       f"{run_dir}` or choose another --run-dir")
    checkpoint.clear_run(run_dir)
    return f"{run_dir} held a run that finished no epoch: replaced by this one"


def train_from_options(request: TrainRequest, *, on_schedule: Callable[[str], None] | None = None,
                       on_start: StartCallback | None = None,
                       on_epoch: EpochCallback | None = None) -> TrainResult:
    """What `avr train` does with its flags, ``--opt`` items and ``--config`` file: a new run
    (options checked, the store and the head's arrays checked, the unset schedule resolved and
    said through ``on_schedule`` before anything loads, the run named) or, with
    ``request.resume``, the run continued with the changes a resumed run may take."""
    if request.resume is not None:
        changes = resume_changes(request.resume, request.resume_flags(), request.opts)
        return resume(request.resume, changes, cache_path=request.cache, on_epoch=on_epoch,
                      on_start=on_start)
    config, toml_cache = train_config(request.config_file, request.train, request.opts,
                                      head_flags=request.head)
    cache_path = request.cache or toml_cache or DEFAULT_CACHE
    # a missing store, or one without the head's arrays, is reported before anything loads
    require_head_arrays(cache_path, config.head, config.head_options)
    _, schedule = schedule_for_store(cache_path, config)
    if schedule is not None and on_schedule is not None:
        on_schedule(schedule)
    run_dir = request.run_dir or default_run_dir(config.head)
    return train(cache_path, config, run_dir, on_epoch=on_epoch, on_start=on_start)


def dry_run(request: TrainRequest) -> dict[str, Any]:
    """What `avr train --dry-run` shows: everything the new run ``request`` asks for would use,
    each value with its source (``avr.fuse.schedule.plan_run``); trains and writes nothing."""
    if request.resume is not None:
        raise AvrError("--dry-run shows a new run; a resumed run trains with its own "
                       "config.json")
    config, toml_cache = train_config(request.config_file, request.train, request.opts,
                                      head_flags=request.head)
    cache_path = store_location(request.cache or toml_cache or DEFAULT_CACHE)
    require_head_arrays(cache_path, config.head, config.head_options)
    return plan_run(config, cache_path, request.given())


def _started(run: Run, cache_path, on_start: StartCallback | None,
             note: str | None = None) -> None:
    if on_start is not None and run.world.is_main:
        on_start(RunStart(run.config.head, location_text(cache_path), run.run_dir,
                          run.config.epochs, run.state.progress.epoch, run.cache.plan, note))


def run_config_dict(cache_path, config: TrainConfig, schedule: str | None,
                    identity: dict[str, Any], head: RetrievalHead, world: World,
                    plan: ResidencyPlan | None) -> dict[str, Any]:
    """config.json of a new run of ``head`` trained with ``config`` (also a sweep's stacked
    trials, which build their heads themselves); ``schedule`` says why its epochs, batch size or
    lr depart from the papers' (``avr.fuse.schedule``), or is None; ``identity``: the store's
    (``avr.store.identity``); ``residency``: where its arrays were held."""
    return {
        "head": config.head,
        "head_options": head.config_dict(),
        "train": dataclasses.asdict(config),  # as resolved: every value the run used
        "schedule": schedule,
        "cache": {"path": location_text(cache_path), "identity": identity},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "world_size": world.size,  # the global batch is batch_size whatever the world size
        "residency": plan.to_json() if plan is not None else None,
    }
