"""The figures of `avr bench gpu`, each beside the target it is held to (``TARGETS``).

- ``train <head> <residency>``: a head's training step on a generated VATEX-shaped store
  (``figure_batch`` pairs a step, ``figure_steps`` timed after one warm-up step) through the
  trainer's loop, with the train split device-resident, pinned on the host, streamed from the
  store, or held as int8 tokens; the VATEX epoch extrapolated from the pairs per second.
- ``eval <head>``: TEFAL's and X-Pool's scoring of 15,000 x 1,500 pairs (``avr bench eval``'s
  workload), chunked, beside one pair at a time.
- ``sweep``: ``sweep_trials`` X-Pool trials on one loaded cache, stacked
  (``stacked.train_stacked``, what `avr sweep --parallel 16` runs) against one at a time
  (``trainer.train``, `--parallel 1`); when the guard stops the solo runs early, their time is
  extrapolated to every trial.
- ``extract``: decoding generated 10 s 360p clips in one process and in one worker per core,
  and real-size random backbones on the decoded batch (``avr bench extract``'s workload).
- ``store read``: a store's audio tokens read into device memory, beside a raw read of the same
  bytes (``avr bench cache``'s workload).

In quick mode (tiny shapes) the rows run but judge no target.
"""

from __future__ import annotations

import itertools
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from avr.bench import VATEX, bench_cache, bench_eval, bench_extract, synchronize
from avr.fuse.config import TrainConfig
from avr.fuse.heads import HEADS, head_class, video_inputs
from avr.fuse.loading import CacheData, place_split
from avr.fuse.residency import ResidentSplit, StreamedSplit
from avr.fuse.residency.plan import StoreSizes
from avr.gpu_check import Budget, Check, Row, figure, one_row
from avr.gpu_check.sizes import Sizes, head_options
from avr.store.splits import SplitTensors, load_split

RESIDENCIES = ("resident", "host", "streamed", "int8")
FIRST_HEADS = ("tefal", "xpool")  # the heads of the floors: measured first, before the guard
STREAM_BUDGET = 8 * 10**9  # bytes the streamed figure's read-ahead is planned for
SWEEP_HEAD = "xpool"
SOLO_RESERVE_S = 60.0  # the one-at-a-time runs stop when less than this is left of the budget


@dataclass(frozen=True)
class Target:
    text: str
    met: Callable[[float], bool]


# The targets of the speed issue (H100) and DESIGN.md's floors, by figure; and the backbones'
# rate must pass the pooled decode's (the GPU is never the bottleneck).
TARGETS = {
    "train tefal resident": Target("<= 0.6 s per VATEX epoch (floor ~0.2 s)",
                                   lambda s: s <= 0.6),
    "train htav resident": Target("<= 5 s per VATEX epoch", lambda s: s <= 5.0),
    "eval tefal": Target("<= 0.3 s for 15,000 x 1,500 (floor ~0.07 s)", lambda s: s <= 0.3),
    "sweep ratio": Target("<= 35 % of one at a time (<= 3x one trial: 18.8 % of 16)",
                          lambda p: p <= 35.0),
    "decode pool": Target(">= 80 % of one process x workers", lambda p: p >= 80.0),
    "store read": Target(">= 70 % of the raw read", lambda p: p >= 70.0),
}
BACKBONE_TARGET = ">= the pooled decode's clips/s (the GPU is never the bottleneck)"
# TFLOP of a VATEX epoch (DESIGN.md: TEFAL's audio K/V projections with weight gradients), for
# the achieved TFLOP/s the speed issue asks beside the epoch time.
EPOCH_TFLOP = {"tefal": 100.0}


def checks(device: torch.device, sizes: Sizes, workdir: Path, budget: Budget) -> list[Check]:
    """Every figure, in the order they run: the targets first (the floors' heads' train steps,
    scoring, the sweep, store reads, extraction), then the other heads' train steps, which the
    time guard is the likeliest to leave out."""
    quick = sizes.shapes != "vatex"
    store = FigureStore(workdir / "figure-store", sizes)

    def train_rows(heads) -> list[Check]:
        return [Check("figure", f"train {head} {residency}",
                      one_row(train_figure, store, head, residency, device, quick), needs_s=10.0)
                for head in heads for residency in RESIDENCIES]

    return [Check("figure", "write the figure store", store.write, needs_s=60.0),
            *train_rows(FIRST_HEADS),
            *(Check("figure", f"eval {head}",
                    lambda head=head: eval_figures(head, sizes, device, quick), needs_s=45.0)
              for head in FIRST_HEADS),
            Check("figure", "sweep",
                  lambda: sweep_figures(store, device, budget, workdir, quick), needs_s=60.0),
            Check("figure", "store read", lambda: read_figures(sizes, device, workdir, quick),
                  needs_s=30.0),
            Check("figure", "extract", lambda: extract_figures(sizes, device, quick),
                  needs_s=60.0),
            *train_rows(h for h in HEADS if h not in FIRST_HEADS)]


def judged(name: str, key: str, value: float, unit: str, quick: bool, **fields) -> Row:
    """A figure held to ``TARGETS[key]`` (no target in quick mode: tiny shapes)."""
    target = TARGETS.get(key)
    if target is None:
        return figure(name, value, unit, **fields)
    return figure(name, value, unit, target=target.text,
                  meets=None if quick else target.met(value), **fields)


# ---- training -----------------------------------------------------------------------------------

class FigureStore:
    """The generated VATEX-shaped store the train and sweep figures read, and one head's train
    split on the CPU at a time."""

    def __init__(self, path: Path, sizes: Sizes):
        self.path, self.sizes = path, sizes
        self._held: tuple[str, str, SplitTensors] | None = None

    def write(self) -> list[Row]:
        from avr.extract.generated import GeneratorSettings, write_generated_store

        train, val = self.sizes.figure_videos
        settings = GeneratorSettings(videos=train + val + 1, val_videos=val, test_videos=1,
                                     shapes=self.sizes.shapes)
        summary = write_generated_store(self.path, settings)
        return [figure("write the figure store", summary["written_bytes"] / 1e6 /
                       summary["seconds"], "MB/s",
                       note=f"{train} train and {val} val videos, 10 captions each, "
                            f"{self.sizes.shapes} shapes: {summary['written_bytes'] / 1e9:.2f} "
                            f"GB in {summary['seconds']:.0f} s")]

    def train_split(self, head: str, resident: str) -> SplitTensors:
        """``head``'s train split on the CPU (the last one asked for is kept)."""
        if self._held is None or self._held[:2] != (head, resident):
            self._held = None  # the previous head's arrays go before the next are read
            names = (video_inputs(head), head_class(head).caption_inputs)
            self._held = (head, resident, load_split(self.path, "train", *names,
                                                     resident=resident))
        return self._held[2]

    def held_split(self, head: str, residency: str, device: torch.device, batch: int):
        """The train split of ``head`` held as ``residency`` says (module docstring)."""
        import dataclasses

        from avr.store.group import open_store

        if residency == "streamed":
            names = (video_inputs(head), head_class(head).caption_inputs)
            group, _ = open_store(self.path)
            config = TrainConfig(head=head, batch_size=batch)
            settings = StoreSizes(group, *names, "fp16").stream_settings(
                config, STREAM_BUDGET, None, self.sizes.stream_buffer_batches * batch)
            return StreamedSplit(self.path, *names, "fp16", settings)
        split = self.train_split(head, "int8" if residency == "int8" else "fp16")
        if residency == "host":
            return ResidentSplit(place_split(dataclasses.replace(split), "host", device))
        return ResidentSplit(split.to(device))


def train_figure(store: FigureStore, head: str, residency: str, device: torch.device,
                 quick: bool) -> Row:
    from avr.fuse import trainer

    sizes = store.sizes
    config = TrainConfig(head=head, epochs=1, batch_size=sizes.figure_batch, lr=1e-4, seed=0,
                         device=str(device), resident="int8" if residency == "int8" else "fp16",
                         head_options=head_options(sizes, head))
    config = trainer.schedule_for_store(store.path, config)[0]  # the rest as the head's recipe
    split = store.held_split(head, residency, device, sizes.figure_batch)
    run = trainer.build_run(config, CacheData(store.path, split.spec, split, None), device)
    trainer.train_epoch(run, 0, max_batches=1)  # kernels chosen, memory allocated
    synchronize(device)
    started = time.perf_counter()
    _, _, pairs = trainer.train_epoch(run, 0, max_batches=sizes.figure_steps)
    synchronize(device)
    seconds = time.perf_counter() - started
    steps = -(-pairs // sizes.figure_batch)
    epoch = VATEX["train_videos"] * seconds / max(pairs, 1)
    note = (f"{steps} steps of {sizes.figure_batch}: {1e3 * seconds / max(steps, 1):.1f} ms a "
            f"step, {pairs / seconds:,.0f} pairs/s; epoch = 25,991 pairs at that rate")
    if head in EPOCH_TFLOP:
        tflop = EPOCH_TFLOP[head]
        note += f"; {tflop / epoch:.0f} TFLOP/s at ~{tflop:.0f} TFLOP an epoch"
    if residency == "streamed":
        note += "; the store was just written (page cache warm): the stream's CPU side, not a disk"
    row = judged(f"train {head} {residency}: VATEX epoch", f"train {head} {residency}", epoch,
                 "s", quick, extrapolated=True, note=note)
    row.info = {"step_s": seconds / max(steps, 1), "steps": steps, "pairs": pairs,
                "pairs_per_s": pairs / seconds}
    return row


# ---- evaluation ---------------------------------------------------------------------------------

def eval_figures(head: str, sizes: Sizes, device: torch.device, quick: bool) -> list[Row]:
    chunked, one_pair, whole = bench_eval(head, scale=sizes.eval_scale, device=device,
                                          reference_pairs=sizes.eval_reference_pairs)
    extrapolated = sizes.eval_scale < 1.0
    measured = chunked.name.removeprefix(f"eval {head}: ")
    return [judged(f"eval {head}: 15,000 x 1,500 pairs, chunked", f"eval {head}", whole.value,
                   "s", quick, extrapolated=extrapolated,
                   note=f"measured: {measured} in {chunked.value:.4g} s"),
            figure(f"eval {head}: the same pairs one at a time", one_pair.value, "s",
                   extrapolated=True,
                   note=f"{measured.removesuffix(', chunked')}: {one_pair.note}")]


# ---- sweep ---------------------------------------------------------------------------------------

def sweep_configs(sizes: Sizes, device: torch.device) -> list[TrainConfig]:
    """``sweep_trials`` X-Pool trials: lr x initial temperature, dropout 0 (one stacked group)."""
    lrs = (1e-4, 2e-4, 5e-4, 1e-3)
    temperatures = (0.02, 0.05, 0.1, 0.2)
    points = list(itertools.product(lrs, temperatures))[:sizes.sweep_trials]
    return [TrainConfig(head=SWEEP_HEAD, epochs=sizes.sweep_epochs, batch_size=sizes.figure_batch,
                        lr=lr, warmup=0.0, seed=0, device=str(device),
                        head_options={"temperature": temperature, "dropout": 0.0})
            for lr, temperature in points]


def sweep_figures(store: FigureStore, device: torch.device, budget: Budget, workdir: Path,
                  quick: bool) -> list[Row]:
    import tempfile

    from avr.fuse import stacked, trainer

    configs = sweep_configs(store.sizes, device)
    cache = trainer.load_cache(store.path, SWEEP_HEAD, device,
                               head_options=[c.head_options for c in configs], config=configs[0])
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        stacked.train_stacked(store.path, configs,
                              [folder / f"stacked{k}" for k in range(len(configs))], cache)
        together = time.perf_counter() - started
        started, done = time.perf_counter(), 0
        for k, config in enumerate(configs):
            if done and budget.left() < SOLO_RESERVE_S:
                break
            trainer.train(store.path, config, folder / f"alone{k}", cache=cache)
            done += 1
        alone = (time.perf_counter() - started) * len(configs) / done
    trials = len(configs)
    what = (f"{trials} {SWEEP_HEAD} trials x {store.sizes.sweep_epochs} epochs of "
            f"{store.sizes.figure_videos[0]} train videos (batch {store.sizes.figure_batch}), "
            f"validated on {store.sizes.figure_videos[1]} videos each epoch")
    early = done < trials
    return [figure("sweep: trials stacked (--parallel 16)", together, "s", note=what),
            figure("sweep: one trial at a time (--parallel 1)", alone, "s", extrapolated=early,
                   note=f"{done} of {trials} trials run" + (", the rest extrapolated" if early
                                                           else "")),
            judged("sweep: stacked / one at a time", "sweep ratio", 100 * together / alone, "%",
                   quick, extrapolated=early,
                   note=f"one trial alone: {alone / trials:.2f} s; stacked = "
                        f"{together / (alone / trials):.1f}x one trial")]


# ---- extraction and store reads -----------------------------------------------------------------

def extract_figures(sizes: Sizes, device: torch.device, quick: bool) -> list[Row]:
    workers = sizes.extract_workers or os.cpu_count() or 1
    figures = bench_extract(clips=sizes.extract_clips, device=device, workers=workers,
                            seconds=sizes.extract_seconds,
                            backbones="real-size" if sizes.real_size_backbones else "none")
    single, pooled = figures[0].value, figures[1].value
    what = f"{sizes.extract_clips} clips of {sizes.extract_seconds:g} s, 360p, stereo 44.1 kHz"
    rows = [figure("extract: decode, one process", single, "clips/s", note=what),
            figure(f"extract: decode, {workers} worker processes", pooled, "clips/s", note=what),
            judged("extract: pooled decode / (one process x workers)", "decode pool",
                   100 * pooled / (single * workers), "%", quick)]
    if len(figures) > 2:
        backbones = figures[2].value
        rows.append(figure("extract: real-size random backbones", backbones, "clips/s",
                           note="ViT-B/32, Swin-T, AST, RoBERTa: 32 frames, 1,024 fbank frames "
                                "and 10 captions a clip",
                           target=BACKBONE_TARGET, meets=None if quick else backbones >= pooled))
    else:
        rows.append(Row("figure", "extract: real-size random backbones", "skipped",
                        note="--quick: four real-size backbones take minutes on a CPU"))
    return rows


def read_figures(sizes: Sizes, device: torch.device, workdir: Path, quick: bool) -> list[Row]:
    store, raw = bench_cache(gigabytes=sizes.cache_gigabytes, device=device, workdir=workdir)
    what = f"{sizes.cache_gigabytes:g} GB of AST tokens, page cache dropped before each read"
    return [figure(f"store read -> {device.type}", store.value, "GB/s", note=what),
            figure(f"raw file read -> {device.type}", raw.value, "GB/s", note=what),
            judged("store read / raw read", "store read", 100 * store.value / raw.value, "%",
                   quick)]
