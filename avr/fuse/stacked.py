"""Several trials of one head trained side by side as one stacked model (``avr sweep --parallel``).

Trials whose options change no shape of the head (lr, weight decay, warmup, gradient clip,
seed, early stop, the initial temperature) share one set of modules: their parameters are
stacked along a new first dimension (``torch.func.stack_module_state``), one batch step is
``vmap`` over the trials of the head's loss run through ``functional_call``, then one backward
pass of the trials' summed losses, and one AdamW step updates the stacked parameters with each
trial's own learning rate, schedule, weight decay and gradient clip. The batch's rows are
gathered once for every trial (trials of one seed draw the same batches); at the end of an
epoch every trial is validated by one vmapped scoring of the val split when it fits
(``STACKED_VAL_BYTES``).

Each trial is what ``avr.fuse.trainer.train`` makes of it alone, step for step: its head is
built after seeding with its own seed, batches come from the split's ``batches``, the update is
torch's AdamW as ``avr.fuse.optim`` sets it (``StackedAdamW``) after ``clip_grad_norm_``, the
learned logit scale is clamped after each step, and the end of every epoch (log, best
checkpoint, early stop, ``config.json``, ``log.csv``, TensorBoard) is the trainer's own
``end_epoch``. With dropout, each trial draws its own masks (``randomness="different"``), not
the ones it draws alone. With dropout 0 the LayerNorms compute what each trial's own kernel does
(``_TrialLayerNorm``) and the AdamW step repeats torch's arithmetic (``StackedAdamW``): what
remains between a stacked trial and its solo run is the rounding of vmap's batched matmuls and
reductions, none at all for X-Pool on an AVX-512 CPU (BENCHMARKS.md gives the measured
differences). A stacked trial's run directory has no ``last.safetensors``: it holds no optimizer
of its own to resume.

A head declares whether its trials stack (``RetrievalHead.stackable``; the contract test holds
every stackable head's stacked trials to its solo runs); the others, and every trial on a train
split that refuses it (``TrainSplit.stack_refusal``: a streamed one), train one at a time.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from avr.device import autocast, resolve_device
from avr.errors import AvrError
from avr.fuse import checkpoint, ddp
from avr.fuse.checkpoint import EpochLog, RunProgress
from avr.fuse.config import TrainConfig
from avr.fuse.heads import build_head, head_class
from avr.fuse.heads.base import RetrievalHead, symmetric_infonce
from avr.fuse.loading import CacheData
from avr.fuse.optim import StackedAdamW
from avr.fuse.loggers import RunLoggers
from avr.fuse.trainer import (TrainResult, claim_run_folder, end_epoch, run_config_dict,
                              schedule_for_store, seed_everything, val_metrics)
from avr.store.quantize import on_device

# Options a stacked group may differ in: none of them changes a shape or a module attribute.
STACKED_TRAIN_OPTIONS = ("lr", "scale_lr", "weight_decay", "warmup", "grad_clip", "seed",
                         "early_stop")
STACKED_HEAD_OPTIONS = ("temperature",)
STACKED_VAL_BYTES = 256 * 2**20  # the most the vmapped validation of every trial may work in


def stackable(head: str) -> bool:
    """Whether trials of ``head`` train stacked: what the head declares
    (``RetrievalHead.stack_refusal``)."""
    return head_class(head).stack_refusal() is None


def group_key(config: TrainConfig) -> str:
    """Trials with one key train as one stacked group. With ``pairs="all"`` the seed is part of
    it: batches of two seeds may then keep different numbers of distinct videos."""
    train = {k: v for k, v in dataclasses.asdict(config).items()
             if k not in STACKED_TRAIN_OPTIONS and k != "head_options"}
    if config.pairs == "all":
        train["seed"] = config.seed
    head = {k: v for k, v in config.head_options.items() if k not in STACKED_HEAD_OPTIONS}
    return repr((sorted(train.items()), sorted(head.items())))


def groups(configs: list[TrainConfig]) -> list[list[int]]:
    """Indices of ``configs`` by stacked group, in order; a head that cannot stack gives each
    trial a group of its own."""
    by_key: dict[str, list[int]] = {}
    for index, config in enumerate(configs):
        key = group_key(config) if stackable(config.head) else f"alone {index}"
        by_key.setdefault(key, []).append(index)
    return list(by_key.values())


class _TrialLayerNorm(torch.autograd.Function):
    """``F.layer_norm`` whose vmap rule computes, for each trial, what torch's kernel computes
    on that trial's slice alone.

    vmap's batching rule for a LayerNorm with stacked affine parameters normalises without them
    and then multiplies and adds, so its outputs round differently from the fused kernel's (by
    up to 1e-6) and its weight and bias gradients are reduced in another order (up to 1e-4 on a
    [16, 48, 16, 64] input), which training at a high lr amplifies to 1e-2 over a few hundred
    steps. Here a stacked trial's LayerNorms compute, forward and backward, exactly what they
    compute alone: in float32 outside autocast through ``_StackedLayerNorm``, else slice by
    slice through torch's kernel."""

    @staticmethod
    def forward(x, weight, bias, eps):
        return F.layer_norm(x, weight.shape, weight, bias, eps)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.eps = inputs
        ctx.save_for_backward(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        inputs = [t.detach().requires_grad_(True) for t in ctx.saved_tensors]
        with torch.enable_grad():
            out = F.layer_norm(inputs[0], inputs[1].shape, inputs[1], inputs[2], ctx.eps)
        return (*torch.autograd.grad(out, inputs, grad), None)

    @staticmethod
    def vmap(info, in_dims, x, weight, bias, eps):
        x, weight, bias = (t.expand(info.batch_size, *t.shape) if d is None else t.movedim(d, 0)
                           for t, d in zip((x, weight, bias), in_dims))
        if x.dtype == weight.dtype == bias.dtype == torch.float32 and \
                not torch.is_autocast_enabled(x.device.type):
            return _StackedLayerNorm.apply(x, weight, bias, eps)[0], 0
        # unbind, not select: the backward stacks the slices' gradients in one copy
        return torch.stack([torch.layer_norm(x_k, w_k.shape, w_k, b_k, eps) for x_k, w_k, b_k
                            in zip(x.unbind(0), weight.unbind(0), bias.unbind(0))]), 0


class _StackedLayerNorm(torch.autograd.Function):
    """The LayerNorms of stacked trials (x [K, ..., D], weight and bias [K, D], float32) with
    each trial's values, forward and backward, equal to torch's fused kernel on its slice. The
    forward is batched: the kernel without affine parameters normalises every row as it would
    alone (rows are independent; their means and reciprocal deviations come out bit for bit),
    then ``addcmul`` applies each trial's weight and bias as the fused kernel does (one
    multiply-add; checked equal in tests/fuse/test_stacked.py). The backward runs the kernel's own
    backward (``native_layer_norm_backward``) on each trial's slice with those statistics: its
    weight and bias gradients are reductions over the trial's rows in the kernel's order."""

    @staticmethod
    def forward(x, weight, bias, eps):
        normed, mean, rstd = torch.native_layer_norm(x, weight.shape[1:], None, None, eps)
        shape = (len(weight),) + (1,) * (x.dim() - weight.dim()) + tuple(weight.shape[1:])
        return torch.addcmul(bias.view(shape), normed, weight.view(shape)), mean, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, ctx.eps = inputs
        _, mean, rstd = output
        ctx.mark_non_differentiable(mean, rstd)
        ctx.save_for_backward(x, weight, bias, mean, rstd)

    @staticmethod
    def backward(ctx, grad, _mean, _rstd):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        mask = list(ctx.needs_input_grad[:3])
        per_trial = [torch.ops.aten.native_layer_norm_backward(
            grad[k], x[k], list(weight.shape[1:]), mean[k], rstd[k], weight[k], bias[k], mask)
            for k in range(len(weight))]
        return (*(torch.stack(parts) if wanted else None
                  for parts, wanted in zip(zip(*per_trial), mask)), None)


class _TrialLayerNormModule(nn.LayerNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _TrialLayerNorm.apply(x, self.weight, self.bias, self.eps)


def _stacked_template(head: RetrievalHead) -> RetrievalHead:
    """A copy of ``head`` for ``functional_call`` over stacked parameters: its LayerNorms run
    torch's kernel per trial (``_TrialLayerNorm``). Linears stay batched (one wider matmul):
    run per trial they cost a third more and still leave TEFAL's and MeanP's other batched
    reductions (scores, pooling) apart from their solo runs by rounding."""
    template = copy.deepcopy(head)
    for module in template.modules():
        if type(module) is nn.LayerNorm and module.weight is not None and \
                module.bias is not None:
            module.__class__ = _TrialLayerNormModule
    return template


class _PairScores(nn.Module):
    """Every (caption, video) score of a split as ``forward``, as ``score_split`` computes them
    (float32 [captions, videos]), for ``functional_call``."""

    def __init__(self, head: RetrievalHead):
        super().__init__()
        self.head = head

    def forward(self, videos, captions) -> torch.Tensor:
        head = self.head
        return head.score(head.encode_texts(captions), head.encode_videos(videos)).float()


class _PairLoss(nn.Module):
    """The head's training loss on a batch of pairs as ``forward``, for ``functional_call``."""

    def __init__(self, head: RetrievalHead):
        super().__init__()
        self.head = head

    def forward(self, videos, captions) -> torch.Tensor:
        head = self.head
        return symmetric_infonce(head.logits(head.encode_texts(captions),
                                             head.encode_videos(videos)))


@dataclass
class _Trial:
    config: TrainConfig
    head: RetrievalHead  # its own module: initialised with its seed, holds it for validation
    run_dir: Path
    progress: RunProgress = dataclasses.field(default_factory=RunProgress)
    loggers: RunLoggers | None = None
    active: bool = True


def train_stacked(cache_path, configs: list[TrainConfig], run_dirs: list[Path], cache: CacheData,
                  on_epoch: Callable[[int, EpochLog], bool | None] | None = None
                  ) -> list[TrainResult]:
    """Train ``configs`` (one stacked group: ``group_key`` equal, ``stackable`` head) together;
    trial k's run goes to ``run_dirs[k]`` (each locked as a run's folder is, and refused when it
    holds a run). ``on_epoch(k, log)`` returning True stops trial k."""
    with contextlib.ExitStack() as folders:
        for run_dir in run_dirs:
            folders.enter_context(claim_run_folder(Path(run_dir), ddp.SINGLE, new=True))
        return _train_together(cache_path, configs, [Path(d) for d in run_dirs], cache,
                               on_epoch)


def _train_together(cache_path, configs: list[TrainConfig], run_dirs: list[Path],
                    cache: CacheData, on_epoch) -> list[TrainResult]:
    configs = [schedule_for_store(cache_path, config)[0] for config in configs]  # as train's
    first = configs[0]
    device = resolve_device(first.device)
    data = cache.train
    if data.stack_refusal is not None:
        raise AvrError(data.stack_refusal)
    total_steps = data.steps_per_epoch(first) * first.epochs
    trials = []
    for config, run_dir in zip(configs, run_dirs):
        config.validate()
        seed_everything(config.seed)  # each head starts as it would alone
        head = build_head(config.head, cache.spec, config.head_options).to(device)
        recorded = run_config_dict(cache_path, config, None, cache.identity, head, ddp.SINGLE,
                                   cache.plan)
        checkpoint.write_config(run_dir, recorded)
        trials.append(_Trial(config, head, run_dir,
                             loggers=RunLoggers(run_dir, recorded, config.loggers)))
    trainable = {name for name, p in trials[0].head.named_parameters() if p.requires_grad}
    stacked, buffers = stack_module_state([_PairLoss(t.head) for t in trials])
    params = {k: v.detach().requires_grad_(True) for k, v in stacked.items()
              if k[len("head."):] in trainable}
    buffers.update({k: v.detach() for k, v in stacked.items() if k not in params})  # frozen
    optimizer = StackedAdamW(params, [t.config for t in trials], total_steps,
                             trials[0].head.parameter_groups())
    template = _stacked_template(trials[0].head)
    model, scores = _PairLoss(template), _PairScores(template)
    shared = len({t.config.seed for t in trials}) == 1  # one batch order for every trial

    def loss_of(trial_params, trial_buffers, videos, captions):
        return functional_call(model, (trial_params, trial_buffers), (videos, captions))

    # The forward is vmapped; the backward is plain autograd of the summed losses (trial k's
    # loss depends on its own slice only), a quarter cheaper than vmap(grad_and_value), whose
    # backward goes through vmap's batching rules op by op.
    losses_of = vmap(loss_of, in_dims=(0, 0, None if shared else 0, None if shared else 0),
                     randomness="different")
    started = time.perf_counter()
    for epoch in range(first.epochs):
        active = [t.active for t in trials]
        if not any(active):
            break
        epoch_start = time.perf_counter()
        model.train()
        losses, seen = [], 0
        for batch in _stacked_batches(data, [t.config for t in trials], epoch, shared, device):
            videos, captions, pairs = batch
            with autocast(device, first.amp):
                loss = losses_of(params, buffers, videos, captions)
            loss.sum().backward()
            optimizer.step({name: p.grad for name, p in params.items()}, active)
            for p in params.values():
                p.grad = None
            losses.append(loss.detach())
            seen += pairs
        train_seconds = time.perf_counter() - epoch_start
        mean_loss = torch.stack(losses).float().mean(0) if losses else None
        lr = optimizer.lrs()
        val = _stacked_val_metrics(scores, params, buffers, cache, device, first)
        log_scale = {**params, **buffers}["head.logit_scale"].detach()  # RetrievalHead.scale()
        for k, trial in enumerate(trials):
            if not trial.active:
                continue
            log = _trial_log(trial, epoch, float(mean_loss[k]) if mean_loss is not None
                             else math.nan, lr[k], time.perf_counter() - epoch_start,
                             seen / max(train_seconds, 1e-9), cache, device,
                             None if val is None else val[k],
                             float(1.0 / log_scale[k].exp()),
                             lambda k=k: _load_trial(trials[k].head, params, buffers, k))
            early = end_epoch(trial.progress, log, trial.config, trial.head, trial.run_dir,
                              trial.loggers)
            stop = on_epoch is not None and on_epoch(k, log)
            trial.active = not (stop or early)
    for trial in trials:
        trial.loggers.close()
    seconds = time.perf_counter() - started
    return [TrainResult(t.run_dir, t.progress.best_epoch, t.progress.best_r1, t.progress.history,
                        seconds, data.num_videos) for t in trials]


def _stacked_batches(data, configs: list[TrainConfig], epoch: int, shared: bool,
                     device: torch.device):
    """Each step's (videos, captions, pairs per trial): gathered once when every trial draws the
    same batch, else stacked along a first trial dimension."""
    if shared:
        for videos, captions, counts in data.batches(configs[0], epoch, ddp.SINGLE, device):
            yield on_device(videos, device), on_device(captions, device), sum(counts)
        return
    for steps in zip(*(data.batches(c, epoch, ddp.SINGLE, device) for c in configs)):
        gathered = [(on_device(v, device), on_device(c, device)) for v, c, _ in steps]
        videos = {k: torch.stack([g[0][k] for g in gathered]) for k in gathered[0][0]}
        captions = {k: torch.stack([g[1][k] for g in gathered]) for k in gathered[0][1]}
        yield videos, captions, sum(steps[0][2])


@torch.no_grad()
def _load_trial(head: RetrievalHead, params: dict[str, torch.Tensor],
                buffers: dict[str, torch.Tensor], k: int) -> None:
    """Copy trial k's slice of the stacked state into its own head module's tensors."""
    own = {**dict(head.named_parameters()), **dict(head.named_buffers())}
    for name, value in (*params.items(), *buffers.items()):
        own[name[len("head."):]].copy_(value[k])


@torch.no_grad()
def _stacked_val_metrics(scores: _PairScores, params: dict[str, torch.Tensor],
                         buffers: dict[str, torch.Tensor], cache: CacheData,
                         device: torch.device, config: TrainConfig
                         ) -> list[dict[str, float]] | None:
    """Val metrics of every trial from one vmapped scoring of the whole val split (``avr
    eval``'s conventions, as ``trainer.val_metrics``); None when the split is not plain tensors or its
    scores' work for every trial would pass ``STACKED_VAL_BYTES`` (or the plan's working
    memory under --memory-budget): then trial by trial."""
    from avr.evaluate import metrics
    from avr.evaluate.score import pair_bytes

    val = cache.val
    if not all(isinstance(v, torch.Tensor) for v in (*val.videos.values(),
                                                      *val.captions.values())):
        return None  # int8 or left in the store: score_split's blocks handle those
    videos, captions = on_device(val.videos, device), on_device(val.captions, device)
    trials = len(next(iter(params.values())))
    scores.eval()
    with autocast(device, config.amp):
        one = scores.head.encode_videos({k: v[:1] for k, v in videos.items()})
    work = trials * val.num_videos * len(val.caption_video) * pair_bytes(one)
    limit = STACKED_VAL_BYTES
    if cache.plan is not None and cache.plan.work_bytes is not None:
        limit = min(limit, cache.plan.work_bytes)
    if work > limit:
        return None
    with autocast(device, config.amp):
        sim = vmap(lambda p, b: functional_call(scores, (p, b), (videos, captions)))(
            params, buffers)
    targets = val.caption_video.cpu()
    return [metrics.metrics_from_ranks(metrics.t2v_ranks(s.cpu(), targets)) for s in sim]


def _trial_log(trial: _Trial, epoch: int, loss: float, lr: float, seconds: float,
               pairs_per_s: float, cache: CacheData, device: torch.device,
               val: dict[str, float] | None, temperature: float,
               load: Callable[[], None]) -> EpochLog:
    """One trial's epoch: its val metrics (unless given) and its log. ``load()`` copies the
    trial's stacked state into ``trial.head``: done only when the head validates itself or may
    be saved as the trial's best."""
    if val is None or val["R1"] > trial.progress.best_r1:
        load()
    if val is None:
        val = val_metrics(trial.head, cache.val, device, trial.config,
                          cache.plan.work_bytes if cache.plan else None)
    return EpochLog(epoch + 1, loss, val["R1"], lr, seconds, pairs_per_s, temperature, {},
                    val["R5"], val["R10"], val["MdR"])
