"""Training on several processes with torch.distributed (``torchrun --nproc-per-node N``).

What one step does on N ranks, and why it equals one process with the same global batch:

- Rank r holds only its shard of the train split: the videos whose position in the split is r
  modulo N, and their captions. Global batch b is the concatenation, in rank order, of the b-th
  ``batch_size / N`` pairs of every shard's own shuffled pair order
  (:func:`avr.fuse.sampling.epoch_batches`); one process run with ``shards=N`` composes exactly
  the same batches, which is what makes the two runs equal. Rank r encodes its own part of
  each batch; ``gather_counts`` tells every rank how many rows each part has.
- ``gather_state`` all-gathers every tensor of the text and video states, so every rank holds
  the states of the whole global batch in the original row order, and puts its own slice back in
  as the local tensor that carries gradients (open_clip's ``gather_features``). Every rank then
  computes the same global loss, ``head.loss(texts, videos)``, over all B x B pairs.
- Gradients. A parameter used by ``score`` or the loss (the temperature, X-Pool's pooling block,
  TEFAL's cross-attention) sees the whole batch on every rank and gets the full gradient there;
  a parameter used by ``encode_*`` gets only the part that flows through the local slice. So
  neither "sum" nor "average" of the raw gradients is right for both. We scale the gradient
  that reaches the local slice by N (``scale_gradient``) and then average gradients over ranks
  (``average_gradients``): encoder gradients become (1/N) * sum_r N * part_r = the full gradient,
  score gradients (1/N) * N * full = the full gradient, and a parameter used in both gets the
  sum of the two, as in one process. This is the same arithmetic as gathering with gradients
  (backward = reduce-scatter) and averaging, without a collective in the backward pass.
- The module is not wrapped in DistributedDataParallel: a head trains through ``loss``, which
  calls ``encode_*`` and ``score`` rather than ``forward``, and the averaging above is one
  all-reduce of the flattened gradients per step. Parameters start equal (broadcast from rank 0)
  and stay equal: every rank applies the same averaged gradient with the same optimizer.

Dropout draws differ from the one-process run (each rank draws masks for its own rows), so
equality with one process is exact only with ``dropout=0``; with dropout the runs are equal in
distribution. A batch to which some shard gives no pairs (the end of an epoch whose shards
differ in size) is skipped, by one process with ``shards=N`` too.

Rank 0 validates, writes checkpoints and logs and reports progress; the others wait for its
validation R@1 (``broadcast_object``) so that early stopping and the best epoch agree everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from avr.errors import AvrError

State = dict[str, torch.Tensor]

# torchrun sets these for every process it starts.
ENV_WORLD_SIZE, ENV_RANK, ENV_LOCAL_RANK = "WORLD_SIZE", "RANK", "LOCAL_RANK"


@dataclass(frozen=True)
class World:
    """This process's place among the training processes; ``World()`` is one process alone."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched_world() -> World:
    """The world torchrun describes in the environment; ``SINGLE`` when not launched by it."""
    size = int(os.environ.get(ENV_WORLD_SIZE, "1"))
    if size <= 1:
        return SINGLE
    try:
        return World(int(os.environ[ENV_RANK]), size, int(os.environ.get(ENV_LOCAL_RANK, "0")))
    except KeyError as missing:
        raise AvrError(f"{ENV_WORLD_SIZE}={size} is set but {missing} is not: start several "
                       f"training processes with `torchrun --nproc-per-node N -m avr train ...`"
                       ) from None


def check_shards(config, world: World) -> None:
    """Under torchrun every rank holds one shard of the train split: ``config.shards`` (a
    TrainConfig's) must be WORLD_SIZE."""
    if world.is_distributed and config.shards != world.size:
        raise AvrError(f"shards={config.shards} but torchrun started WORLD_SIZE={world.size} "
                       f"processes: pass --opt shards={world.size}, or start "
                       f"--nproc-per-node {config.shards} (a run with shards=N trains the same "
                       f"on one process or on N)")


def is_main_process() -> bool:
    """True on rank 0 or when not launched by torchrun: the process that prints and writes."""
    return launched_world().is_main


def place_device(device: torch.device, world: World) -> torch.device:
    """A rank trains on the GPU of its local rank; on the CPU every rank shares the host."""
    if device.type != "cuda" or not world.is_distributed:
        return device
    if world.local_rank >= torch.cuda.device_count():
        raise AvrError(f"local rank {world.local_rank} has no GPU: this machine has "
                       f"{torch.cuda.device_count()}; lower --nproc-per-node or train on --device cpu")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


@contextmanager
def session(device: torch.device) -> Iterator[tuple[World, torch.device]]:
    """Join the process group torchrun describes (NCCL on CUDA, gloo on the CPU) once, yield
    (world, this rank's device), and leave it at the end. Outside torchrun: (SINGLE, device).
    A process group that the caller already initialised is used as is and left open."""
    world = launched_world()
    if not world.is_distributed:
        yield SINGLE, device
        return
    device = place_device(device, world)
    created = not dist.is_initialized()
    if created:
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend, timeout=timedelta(minutes=30), **kwargs)
    if dist.get_world_size() != world.size:
        raise AvrError(f"the process group has {dist.get_world_size()} ranks but "
                       f"{ENV_WORLD_SIZE}={world.size}")
    try:
        yield world, device
    finally:
        if created:
            dist.destroy_process_group()


# ---- rows of a global batch --------------------------------------------------------------------

def gather_counts(count: int, world: World, device: torch.device) -> list[int]:
    """Every rank's ``count`` in rank order (the rows each rank holds of one global batch)."""
    if not world.is_distributed:
        return [count]
    mine = torch.tensor([count], dtype=torch.int64, device=device)
    parts = [torch.empty_like(mine) for _ in range(world.size)]
    dist.all_gather(parts, mine)
    return [int(part) for part in parts]


# ---- the global batch's states -------------------------------------------------------------------

class _ScaleGradient(torch.autograd.Function):
    """Identity forward; the gradient multiplied by ``factor`` on the way back."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, factor: float) -> torch.Tensor:
        ctx.factor = factor
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad * ctx.factor, None


def scale_gradient(tensor: torch.Tensor, factor: float) -> torch.Tensor:
    if not tensor.requires_grad:
        return tensor
    return _ScaleGradient.apply(tensor, factor)


def gather_rows(local: torch.Tensor, counts: list[int], world: World) -> torch.Tensor:
    """Concatenate every rank's rows (``counts[r]`` from rank r) in rank order; this rank's own
    rows are ``local`` itself with its gradient scaled by ``world.size`` (see module docstring)."""
    if local.shape[0] != counts[world.rank]:
        raise AvrError(f"rank {world.rank} holds {local.shape[0]} rows, expected "
                       f"{counts[world.rank]}")
    wire = local.detach()
    if wire.dtype == torch.bool:  # not every backend reduces or gathers bool
        wire = wire.to(torch.uint8)
    longest = max(counts)
    if wire.shape[0] < longest:  # all_gather needs equal shapes: pad, then trim
        pad = wire.new_zeros((longest - wire.shape[0], *wire.shape[1:]))
        wire = torch.cat([wire, pad])
    parts = [torch.empty_like(wire) for _ in range(world.size)]
    dist.all_gather(parts, wire.contiguous())
    parts = [part[:count].to(local.dtype) for part, count in zip(parts, counts)]
    parts[world.rank] = scale_gradient(local, float(world.size))
    return torch.cat(parts)


def gather_state(state: State, counts: list[int], world: World) -> State:
    """Every tensor of a head's text or video state, gathered over ranks in global row order."""
    return {name: gather_rows(tensor, counts, world) for name, tensor in state.items()}


# ---- parameters and gradients ------------------------------------------------------------------

def average_gradients(parameters: Iterable[torch.nn.Parameter], world: World) -> None:
    """Average ``.grad`` over ranks with one all-reduce per dtype. Every rank computes the same
    global loss graph, so the same parameters have gradients on every rank."""
    if not world.is_distributed:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for param in parameters:
        if param.grad is not None:
            by_dtype.setdefault(param.grad.dtype, []).append(param.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world.size
        offset = 0
        for grad in grads:
            grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
            offset += grad.numel()


def broadcast_module(module: torch.nn.Module, world: World) -> None:
    """Give every rank rank 0's parameters and float buffers (equal seeds already make them equal;
    this keeps them so whatever a head's initialisation draws)."""
    if not world.is_distributed:
        return
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.is_floating_point():
                dist.broadcast(tensor.data, src=0)


def broadcast_object(value: Any, world: World) -> Any:
    """Rank 0's ``value`` on every rank (a picklable object: a path, a number, a flag)."""
    if not world.is_distributed:
        return value
    box = [value if world.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.is_distributed:
        dist.barrier()
