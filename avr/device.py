"""Where the work runs: the ``--device`` flag of every command, and mixed precision on CUDA.

- ``resolve_device``: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch device;
- ``autocast``: bf16 autocast on CUDA when ``amp``, full precision on the CPU;
- ``bf16_on_cpu``: within it, ``autocast`` runs bf16 on the CPU as on CUDA (`avr bench gpu
  --device cpu` exercises the bf16 paths of training, scoring and stacked trials without a GPU).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from avr.errors import AvrError


def resolve_device(device: str) -> torch.device:
    """``auto`` is the GPU when there is one, else the CPU; asking for CUDA without it fails."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise AvrError(f"device {device!r} is not known; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AvrError(f"device {device}: CUDA is not available on this machine")
    return resolved


_BF16_ON_CPU = [False]  # set by ``bf16_on_cpu``


def autocast(device: torch.device, amp: bool = True):
    """bf16 autocast on CUDA when ``amp``; full precision on the CPU (deterministic there),
    unless inside ``bf16_on_cpu``."""
    if amp and (device.type == "cuda" or (device.type == "cpu" and _BF16_ON_CPU[0])):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


@contextmanager
def bf16_on_cpu() -> Iterator[None]:
    """Within the block, ``autocast(cpu, amp=True)`` is bf16 autocast, as on CUDA: the CPU mode
    of `avr bench gpu` checks the dtype handling of the bf16 paths where no GPU is at hand."""
    before = _BF16_ON_CPU[0]
    _BF16_ON_CPU[0] = True
    try:
        yield
    finally:
        _BF16_ON_CPU[0] = before


@contextmanager
def intra_op_threads(count: int) -> Iterator[None]:
    """Run the block on ``count`` intra-op threads, then restore the number there was. The CPU
    kernels split their sums by thread, so the thread count decides the last bits of a result
    (and, over hundreds of steps, which epoch a run keeps): fixing it makes runs repeat across
    machines with different numbers of cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
