"""Where the work runs: the ``--device`` flag of every command, and mixed precision on CUDA."""

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


def autocast(device: torch.device, amp: bool = True):
    """bf16 autocast on CUDA when ``amp``; full precision on the CPU (deterministic there)."""
    if device.type == "cuda" and amp:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


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
