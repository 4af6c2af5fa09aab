"""The correctness rows of `avr bench gpu`: what runs on the device computes what the CPU does.

All of them read one small store written by `avr bench store`'s generator. Each compares two
runs that see the same rows from the same initial weights, through the trainer's own code
(``trainer.build_run``, ``trainer.train_epoch``, ``trainer.batch_loss``, ``score_split``):

- ``<head> fp32|bf16 vs cpu fp32``: every head trained ``check_steps`` batches on the device,
  in fp32 and under bf16 autocast, then the val split scored, against the same run on the CPU
  in fp32: the mean loss, each step's gradients (the whole vector, and the worst tensor), the
  val similarities and R@1 both ways. Dropout is 0 and GAIS's perturbation noise is drawn on
  the CPU for both runs (``noise_from_the_cpu``): random draws differ between devices.
- ``streamed fp16|int8 vs resident``: the first batches of a streamed epoch against the same
  rows gathered from the resident split (``StreamedSplit.epoch_order`` names them): equal bit
  for bit, and so is the loss on them.
- ``int8 vs fp16 resident``: the dequantized tokens within the per-token absmax bound, the loss
  and gradients within what that rounding moves them.
- ``pinned host vs device-resident``: batches of the host split (pinned on CUDA) copied without
  blocking equal the device-resident ones; whether each gathered batch is pinned is reported.
- ``scoring chunk sizes``: ``chunk_sizes`` (from free GPU memory on CUDA) within its bounds,
  and its scores equal to scoring one video a block.
- ``stacked <head> fp32|bf16 vs solo``: ``train_stacked`` against ``trainer.train`` for each
  trial, the best weights and the loss and val R@1 of every epoch.

On the CPU the "device" is the CPU itself: the fp32 rows then check that a run repeats bit for
bit, and the bf16 rows run under CPU bf16 autocast (``avr.device.bf16_on_cpu``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import unittest.mock
import warnings
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from avr.device import autocast, bf16_on_cpu
from avr.fuse import ddp
from avr.fuse.config import TrainConfig
from avr.fuse.heads import HEADS, build_head, head_class, video_inputs
from avr.fuse.loading import CacheData, place_split
from avr.fuse.residency import ResidentSplit, StreamedSplit
from avr.fuse.residency.plan import StoreSizes
from avr.fuse.schedule import schedule_for_store
from avr.gpu_check import Check, Row, compared, one_row
from avr.gpu_check.sizes import Sizes, head_options
from avr.store.quantize import is_token_array, on_device
from avr.store.splits import SplitTensors, load_split

CHECK_LR = 1e-4  # the papers' lr: a few steps move the weights as real training does
CHECK_SEED = 0
STREAM_BUDGET = 2 * 10**9  # bytes the streamed split's settings are planned for
RESIDENCY_HEAD = "tefal"  # reads the largest arrays (AST patch tokens): the residency rows' head

# Tolerances of a run on the device against the CPU's fp32 run, per dtype (and where a head
# needs its own, per head), each with why:
# - loss, grad (the whole gradient vector), grad_worst (the worst tensor among those holding at
#   least 1 % of the gradient's norm), each relative to the largest norm the CPU's run reached
#   over its steps; sim: the largest difference of a val score, relative to the largest score;
#   r1_captions: how many val queries may change their top-1 (near ties flip).
# fp32: only the order of the sums differs (CUDA's blocked kernels, the CPU's vector loops):
# float32 rounding (1.2e-7) over sums of up to 1,212 x 768 terms, amplified where a softmax
# sharpens and in the small entries of a gradient.
FP32 = dict(loss=1e-4, grad=1e-3, grad_worst=1e-2, sim=1e-4, r1_captions=1)
# bf16 autocast: matmul inputs rounded to 8 significant bits (relative 2^-9 = 2e-3 each), fp32
# accumulation; projections of 512-768 wide rows carry a few 1e-3, the attention and the loss
# a little more; gradients of near-zero entries lose most of their digits.
BF16 = dict(loss=2e-2, grad=1e-1, grad_worst=3e-1, sim=3e-2, r1_captions=3)
# HTAV in fp32 on CUDA: cuDNN runs the LSTM in TF32 unless torch.backends.cudnn.allow_tf32 is
# off (10 significant bits), and the soft-DTW recursion (32 x 101 cells of soft minima per pair)
# compounds the difference.
HEAD_FP32 = {"htav": dict(loss=2e-3, grad=2e-2, grad_worst=1e-1, sim=2e-3, r1_captions=2)}
# int8 tokens: |x - q s| <= s / 2 + fp16 rounding of s and of q s, with s = max|x| / 127: at
# most 0.5 / 127 + 2^-10 of the token's absmax; the loss and gradients move by about that much
# relative to the fp16 run.
INT8 = dict(token=5e-3, loss=1e-2, grad=5e-2)
# Stacked trials against their solo runs; weights: how far apart the best weights are, as a
# share of how far training moved them. fp32: the CPU contract (tests/fuse/test_stacked.py) is
# 1e-4 absolute for every stackable head (equal bit for bit for X-Pool on AVX-512); on CUDA
# vmap's batched matmuls pick other kernels than one trial's. bf16: the batched matmuls round
# each trial's activations apart by a bf16 ulp here and there, and AdamW's first steps move a
# weight by about lr whatever the size of its gradient, so a near-zero gradient whose sign that
# rounding flips moves its weight the other way (5-15 % of the movement on the CPU, quick sizes);
# the losses then part by up to about 1e-2 (meanP under its recipe's AdamW: 1.04e-2 on the CPU).
STACKED = {"fp32": dict(weights=1e-3, loss=1e-4, val_r1_captions=1),
           "bf16": dict(weights=3e-1, loss=2e-2, val_r1_captions=2)}
STACKED_VARIANTS = [dict(lr=3e-3, warmup=0.0, seed=42, weight_decay=0.2, temperature=0.05),
                    dict(lr=1e-3, warmup=0.3, seed=7, weight_decay=0.0, temperature=0.02,
                         grad_clip=0.5),
                    dict(lr=2e-3, warmup=0.1, seed=42, weight_decay=0.05, temperature=0.1)]
# Bit-for-bit comparisons: the same rows through the same kernels on one device.
EXACT = 0.0


ROW_NEEDS_S = 5.0  # the least time a correctness row must have left (the time guard)


def checks(device: torch.device, sizes: Sizes, workdir: Path) -> list[Check]:
    """Every correctness row, in the order they run (each needs ``ROW_NEEDS_S`` left)."""
    store = CheckStore(workdir / "check-store", sizes)
    rows = [Check("correctness", "write the check store", store.write)]
    for head in HEADS:
        for dtype in ("fp32", "bf16"):
            rows.append(Check("correctness", f"{head} {dtype} vs cpu fp32",
                              one_row(head_vs_cpu, store, head, device, dtype)))
    rows += [Check("correctness", f"streamed {resident} vs resident {resident}",
                   one_row(streamed_vs_resident, store, device, resident))
             for resident in ("fp16", "int8")]
    rows += [Check("correctness", "int8 vs fp16 resident", one_row(int8_vs_fp16, store, device)),
             Check("correctness", "pinned host vs device-resident",
                   one_row(host_vs_device, store, device)),
             Check("correctness", "scoring chunk sizes", one_row(chunk_sizes_row, store, device))]
    for head in (name for name, cls in HEADS.items() if cls.stack_refusal() is None):
        for dtype in ("fp32", "bf16"):
            rows.append(Check("correctness", f"stacked {head} {dtype} vs solo",
                              one_row(stacked_vs_solo, store, head, device, dtype, workdir)))
    return [rows[0], *(dataclasses.replace(check, needs_s=ROW_NEEDS_S) for check in rows[1:])]


# ---- the store and the runs on it ----------------------------------------------------------------

class CheckStore:
    """The small generated store every correctness row reads, and its splits by head (on the
    CPU, loaded once)."""

    def __init__(self, path: Path, sizes: Sizes):
        self.path, self.sizes = path, sizes
        self._splits: dict[tuple[str, str], tuple[SplitTensors, SplitTensors]] = {}
        self._references: dict[str, TrainedRun] = {}

    def write(self) -> list[Row]:
        from avr.extract.generated import GeneratorSettings, write_generated_store

        train, val, test = self.sizes.check_videos
        settings = GeneratorSettings(videos=train + val + test, val_videos=val,
                                     test_videos=test, captions_per_video=self.sizes.check_captions,
                                     shapes=self.sizes.shapes)
        summary = write_generated_store(self.path, settings)
        return [Row("correctness", "write the check store", "pass",
                    note=f"{summary['videos']} videos ({train} train, {val} val, {test} test), "
                         f"{summary['captions']} captions, {self.sizes.shapes} shapes, "
                         f"{summary['written_bytes'] / 1e6:.1f} MB")]

    def splits(self, head: str, resident: str = "fp16") -> tuple[SplitTensors, SplitTensors]:
        """The train and val splits with ``head``'s arrays, on the CPU."""
        key = (head, resident)
        if key not in self._splits:
            names = (video_inputs(head), head_class(head).caption_inputs)
            self._splits[key] = tuple(load_split(self.path, split, *names, resident=resident)
                                      for split in ("train", "val"))
        return self._splits[key]

    def reference(self, head: str) -> TrainedRun:
        """``head``'s run on the CPU in fp32, which every device run of it is compared with."""
        if head not in self._references:
            self._references[head] = trained_run(self, head, torch.device("cpu"), "fp32")
        return self._references[head]

    def config(self, head: str, device: torch.device, amp: bool, **changes) -> TrainConfig:
        options = {**head_options(self.sizes, head), "dropout": 0.0,
                   **changes.pop("head_options", {})}
        # one caption per video: every batch holds check_batch distinct videos, so stacked
        # trials share their batches (under every caption a seed is a group of its own)
        values = dict(head=head, epochs=1, batch_size=self.sizes.check_batch, lr=CHECK_LR,
                      warmup=0.0, seed=CHECK_SEED, device=str(device), amp=amp,
                      head_options=options, pairs="one")
        config = TrainConfig(**{**values, **changes})
        return schedule_for_store(self.path, config)[0]  # the rest as the head's recipe


def precision(device: torch.device, dtype: str):
    """bf16 rows on the CPU run under CPU bf16 autocast (``autocast`` alone keeps it off). On a
    CPU whose oneDNN has no bf16 LSTM (none without AVX-512 BF16), oneDNN is off for the block:
    torch's own LSTM then runs in float32 under autocast, the rest in bf16."""
    if dtype != "bf16" or device.type != "cpu":
        return nullcontext()
    stack = ExitStack()
    stack.enter_context(bf16_on_cpu())
    if not onednn_runs_bf16_lstm():
        with warnings.catch_warnings():  # torch warns of oneDNN's TF32 on Intel GPUs
            warnings.simplefilter("ignore")
            stack.enter_context(torch.backends.mkldnn.flags(enabled=False))
    return stack


@functools.cache
def onednn_runs_bf16_lstm() -> bool:
    lstm = torch.nn.LSTM(8, 8)
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lstm(torch.zeros(2, 1, 8))
    except RuntimeError:
        return False
    return True


@contextmanager
def noise_from_the_cpu():
    """``torch.rand_like`` drawn from the CPU's generator and moved to the tensor's device: the
    random draws of a head (GAIS's perturbation noise) are then the same numbers on every device,
    where CUDA's own generator would draw others."""
    draw = torch.rand_like

    def rand_like(tensor, *args, **kwargs):
        dtype = kwargs.pop("dtype", None) or tensor.dtype
        return draw(tensor, *args, device="cpu", dtype=torch.float32, **kwargs).to(
            device=tensor.device, dtype=dtype)

    with unittest.mock.patch.object(torch, "rand_like", rand_like):
        yield


@dataclass
class TrainedRun:
    loss: float  # mean over the steps
    grads: list[dict[str, torch.Tensor]]  # each step's gradients (as clipped), float32, CPU
    sim: torch.Tensor  # val [captions, videos], float32, CPU
    metrics: dict[str, dict[str, float]]


def trained_run(store: CheckStore, head: str, device: torch.device, dtype: str) -> TrainedRun:
    """``head`` trained ``check_steps`` batches on ``device`` by the trainer's own loop, then its
    val split scored by ``score_split``."""
    from avr.evaluate.metrics import retrieval_metrics
    from avr.evaluate.score import score_split
    from avr.fuse import trainer

    amp = dtype == "bf16"
    train, val = store.splits(head)
    config = store.config(head, device, amp)
    cache = CacheData(store.path, train.spec, ResidentSplit(train.to(device)), val.to(device))
    grads: list[dict[str, torch.Tensor]] = []
    with noise_from_the_cpu(), precision(device, dtype):
        run = trainer.build_run(config, cache, device)
        names = {id(p): name for name, p in run.state.head.named_parameters()}

        def keep(optimizer, args, kwargs):  # before each step, after clipping
            grads.append({names[id(p)]: p.grad.detach().float().cpu().clone()
                          for group in optimizer.param_groups for p in group["params"]
                          if p.grad is not None})

        handle = run.state.optimizer.register_step_pre_hook(keep)
        try:
            loss, _, _ = trainer.train_epoch(run, 0, max_batches=store.sizes.check_steps)
        finally:
            handle.remove()
        sim = score_split(run.state.head, cache.val.videos, cache.val.captions, device,
                          amp=amp).sim.cpu()
    return TrainedRun(loss, grads, sim, retrieval_metrics(sim, val.caption_video))


def head_vs_cpu(store: CheckStore, head: str, device: torch.device, dtype: str) -> Row:
    reference = store.reference(head)
    run = trained_run(store, head, device, dtype)
    tolerance = dict(BF16 if dtype == "bf16" else HEAD_FP32.get(head, FP32))
    captions = tolerance.pop("r1_captions")
    queries = reference.sim.shape
    grad, grad_worst = gradient_error(run.grads, reference.grads)
    measured = {"loss": relative(run.loss, reference.loss), "grad": grad,
                "grad_worst": grad_worst,
                "sim": float((run.sim - reference.sim).abs().max() / reference.sim.abs().max()),
                "t2v_r1_points": abs(run.metrics["t2v"]["R1"] - reference.metrics["t2v"]["R1"]),
                "v2t_r1_points": abs(run.metrics["v2t"]["R1"] - reference.metrics["v2t"]["R1"])}
    tolerance.update(t2v_r1_points=100 * captions / queries[0] + 1e-9,
                     v2t_r1_points=100 * captions / queries[1] + 1e-9)
    return compared(f"{head} {dtype} vs cpu fp32", measured, tolerance,
                       note=f"{len(run.grads)} steps of {store.sizes.check_batch}, val "
                            f"{queries[0]} captions x {queries[1]} videos",
                       loss=run.loss, cpu_loss=reference.loss,
                       onednn_bf16_lstm=onednn_runs_bf16_lstm() if device.type == "cpu" else None,
                       t2v_r1=run.metrics["t2v"]["R1"], cpu_t2v_r1=reference.metrics["t2v"]["R1"])


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / max(abs(reference), 1e-12)


def gradient_error(grads: list[dict[str, torch.Tensor]],
                   reference: list[dict[str, torch.Tensor]]) -> tuple[float, float]:
    """Errors of each step's gradients against the reference run's, relative to the largest the
    reference reached over the steps (at initialisation a head's gradient can be near zero, where
    any rounding is a large share of it): (the whole gradient vector, the worst tensor among those
    reaching at least 1 % of the whole); inf when the steps or parameters differ."""
    if not reference or len(grads) != len(reference) or any(
            g.keys() != r.keys() for g, r in zip(grads, reference)):
        return math.inf, math.inf
    scale = {name: max(float(r[name].norm()) for r in reference) for name in reference[0]}
    whole = max(math.sqrt(sum(float(r[name].norm()) ** 2 for name in r)) for r in reference)
    counted = [name for name in scale if scale[name] >= 0.01 * whole]
    errors = [{name: float((g[name] - r[name]).norm()) for name in r}
              for g, r in zip(grads, reference)]
    return (max(math.sqrt(sum(e * e for e in step.values())) for step in errors)
            / max(whole, 1e-30),
            max((step[name] / scale[name] for step in errors for name in counted), default=0.0))


# ---- residency ---------------------------------------------------------------------------------

def residency_config(store: CheckStore, device: torch.device, resident: str = "fp16"
                     ) -> TrainConfig:
    return store.config(RESIDENCY_HEAD, device, amp=False, resident=resident)


def rows_difference(rows: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest absolute difference between two batches' arrays, inf when their names,
    shapes, dtypes or devices differ."""
    if rows.keys() != reference.keys():
        return math.inf
    worst = 0.0
    for name, tensor in rows.items():
        other = reference[name]
        if (tensor.shape, tensor.dtype, tensor.device) != (other.shape, other.dtype,
                                                           other.device):
            return math.inf
        if tensor.numel():
            worst = max(worst, float((tensor.float() - other.float()).abs().max()))
    return worst


def loss_and_grads(head, videos, captions, device: torch.device, amp: bool = False
                   ) -> tuple[float, dict[str, torch.Tensor]]:
    """The trainer's loss of one batch (``trainer.batch_loss``) and its gradients."""
    from avr.fuse import trainer

    head.zero_grad(set_to_none=True)
    with autocast(device, amp):
        loss, _ = trainer.batch_loss(head, videos, captions, [_rows(videos)], device,
                                     ddp.SINGLE)
    loss.backward()
    return float(loss.detach()), {name: p.grad.detach().float().cpu().clone()
                         for name, p in head.named_parameters() if p.grad is not None}


def _rows(arrays: dict) -> int:
    return len(next(iter(arrays.values())))


def _head(store: CheckStore, device: torch.device):
    torch.manual_seed(CHECK_SEED)
    options = store.config(RESIDENCY_HEAD, device, False).head_options
    return build_head(RESIDENCY_HEAD, store.splits(RESIDENCY_HEAD)[0].spec, options).to(device)


def streamed_vs_resident(store: CheckStore, device: torch.device, resident: str) -> Row:
    from avr.store.group import open_store

    config = residency_config(store, device, resident)
    names = (video_inputs(RESIDENCY_HEAD), head_class(RESIDENCY_HEAD).caption_inputs)
    group, _ = open_store(store.path)
    settings = StoreSizes(group, *names, resident).stream_settings(
        config, STREAM_BUDGET, None, 2 * config.batch_size)
    stream = StreamedSplit(store.path, *names, resident, settings)
    held = store.splits(RESIDENCY_HEAD, resident)[0].to(device)
    order = stream.epoch_order(config, 0)
    head = _head(store, device)
    rows, losses, batches = 0.0, 0.0, 0
    for k, (videos, captions, _) in enumerate(itertools.islice(
            stream.batches(config, 0, ddp.SINGLE, device), store.sizes.check_steps)):
        video_rows, caption_rows = (torch.from_numpy(r).to(device) for r in order.batches[k])
        streamed = on_device(videos, device), on_device(captions, device)
        gathered = (on_device(held.video_rows(video_rows), device),
                    on_device(held.caption_rows(caption_rows), device))
        rows = max(rows, rows_difference(streamed[0], gathered[0]),
                   rows_difference(streamed[1], gathered[1]))
        loss, _ = loss_and_grads(head, *streamed, device)
        reference, _ = loss_and_grads(head, *gathered, device)
        losses = max(losses, relative(loss, reference))
        batches += 1
    return compared(f"streamed {resident} vs resident {resident}",
                       {"rows": rows if batches else math.nan, "loss": losses},
                       {"rows": EXACT, "loss": EXACT},
                       note=f"{batches} batches of {config.batch_size}: the same rows, bit for "
                            f"bit, through the same kernels",
                       chunks_per_read=settings.chunks_per_read,
                       buffer_pairs=settings.buffer_pairs)


def int8_vs_fp16(store: CheckStore, device: torch.device) -> Row:
    config = residency_config(store, device)
    fp16 = ResidentSplit(store.splits(RESIDENCY_HEAD, "fp16")[0].to(device))
    int8 = ResidentSplit(store.splits(RESIDENCY_HEAD, "int8")[0].to(device))
    head = _head(store, device)
    token, losses, grads, batches = 0.0, 0.0, 0.0, 0
    pairs = zip(fp16.batches(config, 0, ddp.SINGLE, device),
                int8.batches(config, 0, ddp.SINGLE, device))
    for (v16, c16, _), (v8, c8, _) in itertools.islice(pairs, store.sizes.check_steps):
        exact = on_device(v16, device), on_device(c16, device)
        rounded = on_device(v8, device), on_device(c8, device)
        for held, wanted in zip(rounded, exact):
            token = max(token, token_error(held, wanted))
        loss, grad = loss_and_grads(head, *rounded, device)
        reference, reference_grad = loss_and_grads(head, *exact, device)
        losses = max(losses, relative(loss, reference))
        grads = max(grads, gradient_error([grad], [reference_grad])[0])
        batches += 1
    return compared("int8 vs fp16 resident",
                       {"token": token if batches else math.nan, "loss": losses, "grad": grads},
                       dict(INT8), note=f"{batches} batches of {config.batch_size}; token: "
                                        f"error / the token's absmax")


def token_error(rows: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """The largest error of a dequantized token relative to its absmax (token arrays), or the
    largest difference (the other arrays, held as they are: 0 expected)."""
    worst = 0.0
    for name, wanted in reference.items():
        got = rows[name]
        if got.shape != wanted.shape or got.dtype != wanted.dtype:
            return math.inf
        difference = (got.float() - wanted.float()).abs()
        if is_token_array(tuple(wanted.shape), _numpy_dtype(wanted.dtype)):
            absmax = wanted.float().abs().amax(-1, keepdim=True).clamp_min(1e-12)
            difference = difference / absmax
        if difference.numel():
            worst = max(worst, float(difference.max()))
    return worst


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype("float16") if dtype.is_floating_point else np.dtype("bool")


def host_vs_device(store: CheckStore, device: torch.device) -> Row:
    config = residency_config(store, device)
    train = store.splits(RESIDENCY_HEAD)[0]
    host = ResidentSplit(place_split(dataclasses.replace(train), "host", device))
    resident = ResidentSplit(train.to(device))
    split_pinned = device.type == "cuda" and all(
        t.is_pinned() for t in (*host.data.videos.values(), *host.data.captions.values()))
    head = _head(store, device)
    rows, losses, pinned, batches = 0.0, 0.0, 0, 0
    pairs = zip(host.batches(config, 0, ddp.SINGLE, device),
                resident.batches(config, 0, ddp.SINGLE, device))
    for (vh, ch, _), (vd, cd, _) in itertools.islice(pairs, store.sizes.check_steps):
        pinned += all(t.is_pinned() for t in (*vh.values(), *ch.values()))
        moved = on_device(vh, device), on_device(ch, device)  # non_blocking copies
        rows = max(rows, rows_difference(moved[0], vd), rows_difference(moved[1], cd))
        loss, _ = loss_and_grads(head, *moved, device)
        reference, _ = loss_and_grads(head, vd, cd, device)
        losses = max(losses, relative(loss, reference))
        batches += 1
    measured = {"rows": rows if batches else math.nan, "loss": losses}
    if device.type == "cuda":
        measured["split_not_pinned"] = float(not split_pinned)
    return compared("pinned host vs device-resident", measured,
                       {name: EXACT for name in measured},
                       note=("the split pinned, each batch copied without blocking"
                             if device.type == "cuda" else
                             "on the CPU the host is the device: nothing to pin"),
                       batches=batches, batches_pinned=pinned)


def chunk_sizes_row(store: CheckStore, device: torch.device) -> Row:
    """``chunk_sizes`` on the check store's val split: within its bounds (on CUDA a scoring
    block fits ``SCORE_MEMORY_FRACTION`` of the free memory), scores equal to one video a
    block."""
    from avr.evaluate import score

    _, val = store.splits(RESIDENCY_HEAD)
    head = _head(store, device).eval()
    with torch.no_grad():
        texts = score.encode_rows(head.encode_texts, val.captions, device,
                                  score.ENCODE_TEXT_ROWS)
        videos = score.encode_rows(head.encode_videos, val.videos, device,
                                   score.ENCODE_VIDEO_ROWS)
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    chunks = score.chunk_sizes(device, texts, videos)
    chosen = score.score_states(head, texts, videos, chunks=chunks, out_device=device)
    one = score.score_states(head, texts, videos, chunks=score.ChunkSizes(score_videos=1),
                             out_device=device)
    count = score.row_count(videos)
    measured = {"sim": float((chosen - one).abs().max()),
                "out_of_range": float(not 1 <= chunks.score_videos <= max(count,
                                                                           score.SCORE_VIDEO_ROWS))}
    info = {"score_videos": chunks.score_videos, "score_texts": chunks.score_texts}
    if free is not None:
        row = max(sum(t[0].numel() for t in texts.values()),
                  sum(t[0].numel() for t in videos.values()))
        block = chunks.score_texts * chunks.score_videos * score.PAIR_COPIES * 4 * row
        measured["over_memory_share"] = max(0.0, block / (score.SCORE_MEMORY_FRACTION * free)
                                            - 1) if chunks.score_videos > 1 else 0.0
        info["free_gb"] = free / 1e9
    return compared("scoring chunk sizes", measured,
                       {"sim": 1e-5, "out_of_range": EXACT, **({"over_memory_share": EXACT}
                                                               if free is not None else {})},
                       note="chunked scores against one video a block: fp32, only the blocks' "
                            "shapes differ", **info)


# ---- stacked trials ------------------------------------------------------------------------------

def stacked_vs_solo(store: CheckStore, head: str, device: torch.device, dtype: str,
                    workdir: Path) -> Row:
    import tempfile

    from safetensors.torch import load_file

    from avr.fuse import stacked, trainer

    configs = [store.config(head, device, dtype == "bf16", epochs=store.sizes.stacked_epochs,
                            head_options={"temperature": v["temperature"]},
                            **{k: x for k, x in v.items() if k != "temperature"})
               for v in STACKED_VARIANTS[:store.sizes.stacked_trials]]
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, precision(device, dtype):
        folder = Path(tmp)
        cache = trainer.load_cache(store.path, head, device,
                                   head_options=[c.head_options for c in configs],
                                   config=configs[0])
        together = stacked.train_stacked(store.path, configs,
                                         [folder / f"stacked{k}" for k in range(len(configs))],
                                         cache)
        weights, losses, r1 = 0.0, 0.0, 0.0
        for k, config in enumerate(configs):
            alone = trainer.train(store.path, config, folder / f"alone{k}", cache=cache)
            mine = load_file(str(folder / f"stacked{k}" / "best.safetensors"))
            theirs = load_file(str(folder / f"alone{k}" / "best.safetensors"))
            weights = max(weights, moved_difference(mine, theirs, initial_weights(config,
                                                                                  cache.spec)))
            losses = max(losses, max(abs(a.loss - b.loss) for a, b in
                                     zip(together[k].history, alone.history)))
            r1 = max(r1, max(abs(a.val_r1 - b.val_r1) for a, b in
                             zip(together[k].history, alone.history)))
    val_captions = len(store.splits(head)[1].caption_video)
    tolerance = dict(STACKED[dtype])
    captions = tolerance.pop("val_r1_captions")
    tolerance["val_r1_points"] = 100 * captions / val_captions + 1e-9
    return compared(f"stacked {head} {dtype} vs solo",
                       {"weights": weights, "loss": losses, "val_r1_points": r1}, tolerance,
                       note=f"{len(configs)} trials x {store.sizes.stacked_epochs} epochs: best "
                            f"weights (apart / moved by training), and loss and val R@1 of every "
                            f"epoch")


def initial_weights(config: TrainConfig, spec) -> dict[str, torch.Tensor]:
    """The weights a run of ``config`` starts from (seeded as ``trainer.build_run`` seeds)."""
    from avr.fuse.trainer import seed_everything

    seed_everything(config.seed)
    head = build_head(config.head, spec, config.head_options)
    return {f"head.{name}": value.detach().float()  # as checkpoint.save_weights names them
            for name, value in head.state_dict().items()}


def moved_difference(weights: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                     initial: dict[str, torch.Tensor]) -> float:
    """How far apart two runs' weights ended, as a share of how far training moved the
    reference's from where both started (every tensor as one vector); inf when the names
    differ."""
    if weights.keys() != reference.keys() or not set(reference) <= set(initial):
        return math.inf
    apart = sum(float((weights[n].float() - reference[n].float()).norm()) ** 2 for n in reference)
    moved = sum(float((reference[n].float() - initial[n]).norm()) ** 2 for n in reference)
    return math.sqrt(apart) / max(math.sqrt(moved), 1e-30)
