"""The trainer: one split of the cache in memory, a head, symmetric InfoNCE, val every epoch.

Read it top to bottom:

- ``train`` (a new run) and ``resume`` (a run's last checkpoint) load the cache once
  (``load_cache``, where :mod:`avr.fuse.residency` plans what is held on the device, on the host
  or streamed from the store) and call ``build_run``, which builds the head, the optimizer and the schedule
  into a ``checkpoint.TrainState``; a sweep calls ``build_run`` on its shared cache too.
- ``fit`` loops over epochs: ``train_epoch`` steps through the batches of ``epoch_rows``: those
  :mod:`avr.fuse.sampling` draws (one random caption per video, or every caption with
  ``pairs="all"``) from a resident split, or those a streamed split reads, ``validate`` scores val through :mod:`avr.evaluate.score`, and the best
  checkpoint by val text-to-video R@1 is kept (never the test split). ``on_epoch(epoch, log)``
  sees every epoch and stops the run by returning True.

Everything a run needs to be rebuilt goes in ``config.json``; weights in safetensors.

Under ``torchrun --nproc-per-node N -m avr train ...`` (WORLD_SIZE > 1 in the environment)
``train`` and ``resume`` join the process group; rank r loads only shard r of the train split
(``shards`` must equal N), encodes that shard's part of each global batch, and takes the loss over
the whole global batch; rank 0 alone loads val, validates and writes the run. One process with
``shards=N`` composes the same global batches and so trains the same run. The mechanics are in
:mod:`avr.fuse.distributed` and :mod:`avr.fuse.sampling`.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch

from avr.device import autocast, resolve_device
from avr.errors import AvrError, RunError
from avr.evaluate.score import score_split
from avr.fuse import checkpoint, distributed
from avr.fuse.checkpoint import EpochLog, TrainState
from avr.fuse.config import (MIN_BATCHES_PER_EPOCH, MIN_STEPS, PAPER_SCHEDULE, RESUMABLE,
                             SCRATCH_LR, SCRATCH_TEMPERATURE, TrainConfig, saved_train_config)
from avr.fuse.distributed import World
from avr.fuse.heads import build_head, head_class, video_inputs
from avr.fuse.heads.base import HeadConfig, RetrievalHead
from avr.fuse.residency import ResidencyPlan, StreamedSplit, plan_residency
from avr.fuse.sampling import epoch_batches, steps_per_epoch
from avr.store import schema
from avr.store.group import open_store
from avr.store.location import location_text, store_location
from avr.store.quantize import Held, on_device
from avr.store.splits import SplitTensors, load_split, split_size

DEFAULT_CACHE = Path("cache")
# What a run written before residency plans did: both splits resident, drawn by epoch_batches.
RESIDENT_BEFORE_PLANS = {"train": {"mode": "device"}}
ADAMW_BETAS, ADAMW_EPS = (0.9, 0.98), 1e-6  # stacked sweep trials step with the same


def check_world(config: TrainConfig, world: World) -> None:
    """Under torchrun every rank holds one shard of the train split: shards must be WORLD_SIZE."""
    if world.is_distributed and config.shards != world.size:
        raise AvrError(f"shards={config.shards} but torchrun started WORLD_SIZE={world.size} "
                       f"processes: pass --opt shards={world.size}, or start "
                       f"--nproc-per-node {config.shards} (a run with shards=N trains the same "
                       f"on one process or on N)")


def resolve_schedule(config: TrainConfig, spec: schema.CacheSpec, videos: int, captions: int
                     ) -> tuple[TrainConfig, str | None]:
    """``config`` with the epochs, batch size, learning rate and initial temperature the user
    left unset chosen for a train split of ``videos`` videos and ``captions`` captions, and one
    line saying how and why they depart from the papers' 5 epochs of batch 128 at lr 1e-4 and
    CLIP's pretrained temperature (None where they do not):

    - batch: the largest power of two up to 128 that gives an epoch at least
      ``MIN_BATCHES_PER_EPOCH`` batches (so 128 from 385 train videos on);
    - epochs: 5, or as many as give the optimizer ``MIN_STEPS`` steps at that batch;
    - lr: 1e-4 on CLIP's features, where a head fine-tunes an alignment CLIP already has;
      ``SCRATCH_LR`` on a store extracted with random backbones (``--backbones tiny``), whose
      features are aligned by nothing: there the head learns the alignment from scratch;
    - temperature: on such a store, a head whose learned logit scale starts at CLIP's
      pretrained 100 (``HeadConfig.temperature``) starts it where CLIP starts learning from
      scratch, ``SCRATCH_TEMPERATURE``; a fixed scale (GAIS) or one the head's own terms are
      tuned for (AVIGATE's margins) is part of its method and stays.
    """
    scratch = random_backbones(spec)
    unset = [name for name in PAPER_SCHEDULE if getattr(config, name) is None]
    if scratch and starts_at_pretrained_scale(config):
        config = dataclasses.replace(config, head_options={**config.head_options,
                                                           "temperature": SCRATCH_TEMPERATURE})
        unset.append("temperature")
    if not unset:
        return config, None
    batch = config.batch_size or schedule_batch_size(videos, config.shards)
    steps = math.ceil((videos if config.pairs == "one" else captions) / batch)
    epochs = config.epochs or max(PAPER_SCHEDULE["epochs"], math.ceil(MIN_STEPS / max(1, steps)))
    lr = config.lr or (SCRATCH_LR if scratch else PAPER_SCHEDULE["lr"])
    resolved = dataclasses.replace(config, epochs=epochs, batch_size=batch, lr=lr)
    return resolved, _schedule_note(resolved, unset, videos, scratch)


def starts_at_pretrained_scale(config: TrainConfig) -> bool:
    """Whether ``config``'s head, with the options the user gave, would learn a logit scale from
    CLIP's pretrained temperature because the user left its temperature unset."""
    options = config.head_options
    cls = head_class(config.head)
    default = cls.Config()
    learned = options.get("learn_temperature", default.learn_temperature)
    return ("temperature" not in options and learned and not cls.tuned_for_pretrained_scale
            and default.temperature == HeadConfig.temperature)


def schedule_for_store(cache_path: str | Path, config: TrainConfig
                       ) -> tuple[TrainConfig, str | None]:
    """``resolve_schedule`` for the train split of the store at ``cache_path``."""
    group, spec = open_store(store_location(cache_path))
    return resolve_schedule(config, spec, *split_size(group, "train"))


def schedule_batch_size(videos: int, shards: int = 1) -> int:
    """The largest power of two up to the papers' 128 that leaves an epoch of ``videos`` videos
    at least ``MIN_BATCHES_PER_EPOCH`` batches; at least 2 and a multiple of ``shards``."""
    batch = PAPER_SCHEDULE["batch_size"]
    while batch > 2 and math.ceil(videos / batch) < MIN_BATCHES_PER_EPOCH:
        batch //= 2
    return max(batch - batch % shards, shards, 2)


def random_backbones(spec: schema.CacheSpec) -> bool:
    """Whether the store's CLIP features come from a randomly initialised CLIP."""
    clip = spec.backbones.get("clip")
    return clip is not None and clip.weights.startswith("random:")


def _schedule_note(config: TrainConfig, unset: list[str], videos: int, scratch: bool
                   ) -> str | None:
    departs = [name for name in unset
               if name in PAPER_SCHEDULE and getattr(config, name) != PAPER_SCHEDULE[name]]
    sized = {"batch_size": (f"batch {config.batch_size}", str(PAPER_SCHEDULE["batch_size"]),
                            f"an epoch has at least {MIN_BATCHES_PER_EPOCH} batches"),
             "epochs": (f"{config.epochs} epochs", str(PAPER_SCHEDULE["epochs"]),
                        f"the run has at least {MIN_STEPS} optimizer steps")}
    changed = [sized[name] for name in sized if name in departs]
    reasons = []
    if changed:
        values, papers, goals = zip(*changed)
        reasons.append(f"small train split ({videos} videos): {', '.join(values)} instead of "
                       f"{' / '.join(papers)}, so that {' and '.join(goals)}")
    if "lr" in departs and scratch:
        reasons.append(f"lr {config.lr:g} instead of {PAPER_SCHEDULE['lr']:g}, because the "
                       f"store's CLIP is random: the head learns an alignment from scratch "
                       f"instead of fine-tuning CLIP's")
    if "temperature" in unset:
        reasons.append(f"temperature {SCRATCH_TEMPERATURE:g} instead of "
                       f"{HeadConfig.temperature:g}: a learned logit scale trained from scratch "
                       f"starts where CLIP's does")
    if not reasons:
        return None
    return "; ".join(reasons) + " (--epochs, --batch-size, --lr and --temperature set them)"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ---- data ------------------------------------------------------------------------------------

@dataclass
class CacheData:
    """The train and val splits of a store, loaded once (shared by every trial of a sweep).
    On a rank of several: its shard of train, and val on rank 0 only (it alone validates).
    ``plan`` says where they are held: train resident or streamed from the store, val resident
    or its tokens read from the store at each validation."""

    path: Path
    spec: schema.CacheSpec
    train: SplitTensors | StreamedSplit
    val: SplitTensors | None
    plan: ResidencyPlan | None = None


def load_cache(path: str | Path, head: str, device: torch.device,
               world: World = distributed.SINGLE, *,
               head_options: list[dict[str, Any]] | None = None,
               config: TrainConfig | None = None,
               saved_residency: dict[str, Any] | None = None) -> CacheData:
    """Load train (this rank's shard of it) and val with the arrays ``head`` needs when built
    with any of ``head_options`` (default: its default options), held as the residency plan for
    ``config``'s memory budget and ``resident`` says (``saved_residency``: a resumed run's)."""
    config = config or TrainConfig(head=head)
    cls = head_class(head)
    videos = video_inputs(head, *(head_options or [{}]))
    path = store_location(path)
    plan = plan_residency(path, config, device, videos, cls.caption_inputs, world,
                          saved=saved_residency, blockwise=not cls.has_own_loss())
    shard = (world.rank, world.size) if world.is_distributed else None
    if plan.train.mode == "streamed":
        train = StreamedSplit(path, videos, cls.caption_inputs, config.resident, plan.stream)
    else:
        train = load_split(path, "train", videos, cls.caption_inputs, shard=shard,
                           resident=config.resident)
    splits = {"train": train}
    if world.is_main:
        splits["val"] = load_split(path, "val", videos, cls.caption_inputs,
                                   resident=config.resident,
                                   tokens_in_store=plan.val.mode == "streamed")
    for split, data in splits.items():
        if data.num_videos == 0:
            where = f"shard {world.rank} of {world.size} of " if split == "train" and shard else ""
            raise AvrError(f"{path}: {where}the {split} split has no extracted videos")
    if plan.train.mode == "device":
        splits = {k: v.to(device) for k, v in splits.items()}
    elif device.type == "cuda":  # held on the host, pinned, and each batch moved
        splits = {k: _pin(v) for k, v in splits.items() if isinstance(v, SplitTensors)}
    return CacheData(path, train.spec, splits["train"], splits.get("val"), plan)


def _pin(data: SplitTensors) -> SplitTensors:
    data.videos = {k: v.pin_memory() for k, v in data.videos.items()}
    data.captions = {k: v.pin_memory() for k, v in data.captions.items()}
    return data


# ---- a run: its state, built once ---------------------------------------------------------------

@dataclass
class Run:
    """What ``fit`` trains: the options, the data, the state, and where it runs and writes."""

    config: TrainConfig
    cache: CacheData
    state: TrainState
    device: torch.device
    world: World = distributed.SINGLE
    run_dir: Path | None = None  # None: nothing is written (a sweep's in-memory trial)


def build_run(config: TrainConfig, cache: CacheData, device: torch.device,
              world: World = distributed.SINGLE, *, run_dir: Path | None = None,
              resume: bool = False) -> Run:
    """The head of ``config``, its optimizer and schedule: seeded and new, or with ``resume``
    continued from ``run_dir``'s last checkpoint (weights, optimizer, schedule, RNG, log)."""
    if not resume:
        seed_everything(config.seed)
    head = build_head(config.head, cache.spec, config.head_options).to(device)
    distributed.broadcast_module(head, world)
    total_steps = steps_per_epoch(cache.train, config, world, device) * config.epochs
    optimizer, scheduler = make_optimizer(head, config, total_steps)
    state = TrainState(head, optimizer, scheduler)
    if resume:
        state.load_last(run_dir)
    return Run(config, cache, state, device, world, run_dir)


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
    ], lr=config.lr, betas=ADAMW_BETAS, eps=ADAMW_EPS)
    warmup_steps = int(config.warmup * total_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps))


def lr_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at ``step``: linear warmup, then cosine decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ---- the loop ----------------------------------------------------------------------------------

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
    only rank 0 validates, writes the run directory and calls ``on_epoch``."""
    config, state, world = run.config, run.state, run.world
    writes = run.run_dir is not None and world.is_main
    writer = _tensorboard(run.run_dir) if writes else None
    started = time.perf_counter()
    for epoch in range(state.epoch, config.epochs):
        epoch_start = time.perf_counter()
        loss, parts, seen = train_epoch(run, epoch)
        train_seconds = time.perf_counter() - epoch_start
        val_r1 = distributed.broadcast_object(validate(run) if world.is_main else None, world)
        log = EpochLog(epoch + 1, loss, val_r1, state.scheduler.get_last_lr()[0],
                       time.perf_counter() - epoch_start, seen / max(train_seconds, 1e-9),
                       float(1.0 / state.head.scale().detach()), parts)
        state.epoch = epoch + 1
        state.history.append(log)
        improved = val_r1 > state.best_r1
        if improved:
            state.best_epoch, state.best_r1 = epoch + 1, val_r1
        if writes:
            write_epoch(run.run_dir, state, log, improved, writer)
        stop = bool(on_epoch(epoch + 1, log)) if on_epoch is not None and world.is_main else False
        if distributed.broadcast_object(stop, world):
            break
        if config.early_stop and epoch + 1 - state.best_epoch >= config.early_stop:
            break
    if writer is not None:
        writer.close()
    distributed.barrier(world)  # the run directory is complete when any rank returns
    return TrainResult(run.run_dir, state.best_epoch, state.best_r1, state.history,
                       time.perf_counter() - started, run.cache.train.num_videos)


def train_epoch(run: Run, epoch: int, max_batches: int | None = None
                ) -> tuple[float, dict[str, float], int]:
    """One pass over the epoch's batches (its first ``max_batches`` when given: ``avr bench
    train``); returns (mean loss, mean of each of the head's loss parts, pairs seen by all ranks).
    Losses stay on the device until the epoch ends."""
    config, head, data, device = run.config, run.state.head, run.cache.train, run.device
    optimizer, scheduler = run.state.optimizer, run.state.scheduler
    head.train()
    losses, part_sums, seen = [], {}, 0
    batches = epoch_rows(data, config, epoch, run.world, device)
    for videos, captions, counts in itertools.islice(batches, max_batches):
        with autocast(device, config.amp):
            loss, parts = batch_loss(head, videos, captions, counts, device, run.world,
                                     run.cache.plan.step_videos if run.cache.plan else 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(head.parameters(), run.world)
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


Rows = dict[str, Held]  # a batch's rows of each array, as held (quantized or not)


def epoch_rows(data: SplitTensors | StreamedSplit, config: TrainConfig, epoch: int,
               world: World, device: torch.device) -> Iterator[tuple[Rows, Rows, list[int]]]:
    """The epoch's batches as (video rows, caption rows, rows per shard): gathered from a
    resident split in ``epoch_batches`` order, or read by a streamed one in its own."""
    if isinstance(data, StreamedSplit):
        yield from data.batches(config, epoch)
        return
    rows_device = data.caption_video.device
    for videos, captions, counts in epoch_batches(data, config, epoch, world, device):
        yield (data.video_rows(videos.to(rows_device)), data.caption_rows(captions.to(rows_device)),
               counts)


def batch_loss(head: RetrievalHead, videos: Rows, captions: Rows, counts: list[int],
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
        texts = distributed.gather_state(texts, counts, world)
        video_state = distributed.gather_state(video_state, counts, world)
    return head.loss(texts, video_state)


def validate(run: Run) -> float:
    """Val text-to-video R@1 of the run's head."""
    plan = run.cache.plan
    return val_recall_at_1(run.state.head, run.cache.val, run.device, run.config,
                           plan.work_bytes if plan else None)


def val_recall_at_1(head: RetrievalHead, val: SplitTensors, device: torch.device,
                    config: TrainConfig, work_bytes: int | None = None) -> float:
    """Val text-to-video R@1 in percent, by the conventions of `avr eval`
    (:mod:`avr.evaluate.metrics`: failed videos count as misses, ties are not wins); scored
    within ``work_bytes`` of working memory when given (the plan's, under --memory-budget)."""
    from avr.evaluate import metrics

    sim = score_split(head, val.videos, val.captions, device, amp=config.amp,
                      score_chunk=config.score_chunk, work_bytes=work_bytes).sim
    return metrics.metrics_from_ranks(metrics.t2v_ranks(sim, val.caption_video.cpu()))["R1"]


def write_epoch(run_dir: Path, state: TrainState, log: EpochLog, improved: bool, writer) -> None:
    """best (when improved), last, a row of log.csv and TensorBoard scalars for one epoch."""
    if improved:
        checkpoint.save_weights(state.head, run_dir / checkpoint.BEST_FILE,
                                metadata={"epoch": str(log.epoch), "val_R1": str(log.val_r1)})
    state.save_last(run_dir)
    checkpoint.append_log(run_dir, log)
    if writer is not None:
        for key in ("loss", "val_r1", "lr", "temperature", "pairs_per_s"):
            writer.add_scalar(key, getattr(log, key), log.epoch)
        for name, value in log.parts.items():
            writer.add_scalar(f"loss_parts/{name}", value, log.epoch)
        writer.flush()


def _tensorboard(run_dir: Path):
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(run_dir))


# ---- entry points ------------------------------------------------------------------------------

def default_run_dir(head: str, runs_dir: Path = checkpoint.DEFAULT_RUNS_DIR) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = runs_dir / f"{stamp}-{head}"
    suffix = 1
    while run_dir.exists():
        suffix += 1
        run_dir = runs_dir / f"{stamp}-{head}-{suffix}"
    return run_dir


# Called with a run's residency plan once the cache is loaded, before the first epoch.
PlanCallback = Callable[[ResidencyPlan], None]


def train(cache_path: str | Path, config: TrainConfig, run_dir: Path | None = None, *,
          cache: CacheData | None = None, on_epoch: EpochCallback | None = None,
          on_plan: PlanCallback | None = None) -> TrainResult:
    """Train a new run of ``config.head`` on the store at ``cache_path`` (on every rank when
    started by torchrun; a new run left at ``shards=1`` takes one shard per rank)."""
    config.validate()
    with distributed.session(resolve_device(config.device)) as (world, device):
        if world.is_distributed and config.shards == 1:
            config = dataclasses.replace(config, shards=world.size)
            config.validate()
        check_world(config, world)
        config, schedule = schedule_for_store(cache_path, config)
        config.validate()
        cache = cache or load_cache(cache_path, config.head, device, world,
                                    head_options=[config.head_options], config=config)
        _announce(cache, world, on_plan)
        run = build_run(config, cache, device, world, run_dir=new_run_dir(run_dir, config, world))
        if world.is_main:
            checkpoint.write_config(run.run_dir, run_config(cache_path, run, schedule))
        return fit(run, on_epoch)


def _announce(cache: CacheData, world: World, on_plan: PlanCallback | None) -> None:
    if on_plan is not None and world.is_main and cache.plan is not None:
        on_plan(cache.plan)


def new_run_dir(run_dir: Path | None, config: TrainConfig, world: World) -> Path:
    """The directory of a new run; rank 0 names it and decides whether it is taken, every rank
    acts on its answer."""
    run_dir = run_dir or default_run_dir(config.head)
    run_dir, taken = distributed.broadcast_object(
        (run_dir, (run_dir / checkpoint.CONFIG_FILE).exists()), world)
    if taken:
        raise RunError(f"{run_dir} already holds a run; continue it with `avr train --resume "
                       f"{run_dir}` or choose another --run-dir")
    return run_dir


def run_config(cache_path, run: Run, schedule: str | None) -> dict[str, Any]:
    """config.json of a new run; ``schedule`` says why its epochs, batch size or lr depart from
    the papers' (``resolve_schedule``), or is None."""
    return run_config_dict(cache_path, run.config, schedule, run.cache.spec, run.state.head,
                           run.world, run.cache.plan)


def run_config_dict(cache_path, config: TrainConfig, schedule: str | None,
                    spec: schema.CacheSpec, head: RetrievalHead, world: World,
                    plan: ResidencyPlan | None) -> dict[str, Any]:
    """config.json of a new run of ``head`` trained with ``config`` (also a sweep's stacked
    trials, which build their heads themselves); ``residency``: where its arrays were held."""
    return {
        "head": config.head,
        "head_options": head.config_dict(),
        "train": dataclasses.asdict(config),  # as resolved: every value the run used
        "schedule": schedule,
        "cache": {"path": location_text(cache_path),
                  "identity": schema.cache_identity(spec)},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "parameters": sum(p.numel() for p in head.parameters() if p.requires_grad),
        "world_size": world.size,  # the global batch is batch_size whatever the world size
        "residency": plan.to_json() if plan is not None else None,
    }


def resume(run_dir: str | Path, changes: dict[str, Any] | None = None, *,
           cache_path: str | Path | None = None, on_epoch: EpochCallback | None = None,
           on_plan: PlanCallback | None = None) -> TrainResult:
    """Continue a run from its last checkpoint, with ``changes`` to its ``RESUMABLE`` options
    (``epochs``: train to that many), in one process or on as many ranks as the run has shards:
    either composes the same batches."""
    run_dir = Path(run_dir)
    saved = checkpoint.read_config(run_dir)
    changes = dict(changes or {})
    refused = sorted(set(changes) - set(RESUMABLE))
    if refused:
        raise AvrError(f"{run_dir}: {', '.join(refused)} cannot change when a run resumes; "
                       f"only {', '.join(RESUMABLE)} can")
    config = dataclasses.replace(saved_train_config(saved["train"]),
                                 head_options=saved.get("head_options", {}), **changes)
    config.validate()
    saved["train"].update(changes)
    with distributed.session(resolve_device(config.device)) as (world, device):
        check_world(config, world)
        cache_path = store_location(cache_path or saved["cache"]["path"])
        cache = load_cache(cache_path, config.head, device, world,
                           head_options=[config.head_options], config=config,
                           saved_residency=saved.get("residency") or RESIDENT_BEFORE_PLANS)
        checkpoint.check_cache(saved, cache.spec, cache_path)
        _announce(cache, world, on_plan)
        run = build_run(config, cache, device, world, run_dir=run_dir, resume=True)
        if run.state.epoch >= config.epochs:
            raise RunError(f"{run_dir} already trained {run.state.epoch} of {config.epochs} "
                           f"epochs; pass --epochs N with N > {run.state.epoch} to train longer")
        distributed.barrier(world)  # every rank has read the run before rank 0 writes to it
        if world.is_main:
            checkpoint.write_config(run_dir, saved)
        return fit(run, on_epoch)
