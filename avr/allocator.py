"""How the `avr` process takes memory from glibc: freed blocks are kept for the next step.

Why. A training step on the CPU allocates its large activations afresh (TEFAL on VATEX's
shapes: a float32 copy of a batch's AST tokens alone is 476 MB, and a dozen such tensors live
through a step). glibc serves every block above its mmap threshold (at most 32 MiB) with a
mapping of its own and unmaps it when it is freed, so each step maps gigabytes of fresh pages
again and the kernel zeroes them one page fault at a time: a VATEX-sized TEFAL epoch spent more
system time in those faults than a quarter of its training (BENCHMARKS.md, "The CPU training
step's page faults").

What. ``keep_freed_memory`` (the console script calls it first) sets glibc's ``M_MMAP_MAX`` to
0, so large blocks come from the heap like small ones, and ``M_TRIM_THRESHOLD`` to -1, so freed
heap memory stays mapped for the next step instead of going back to the kernel.

The contract:
- allocator only: where memory comes from changes, no value computed does (PyTorch aligns its
  CPU tensors to 64 bytes either way); tests/test_allocator.py trains the same run both ways;
- the peak resident memory stays the peak: freed memory is reused, not added to, but it is not
  returned to the system before the process ends;
- glibc only (Linux); elsewhere, or when the user set glibc's malloc tunables themselves
  (``MALLOC_MMAP_MAX_``, ``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``,
  ``MALLOC_TOP_PAD_`` or ``glibc.malloc.*`` in ``GLIBC_TUNABLES``), nothing changes.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
USER_SETTINGS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_",
                 "MALLOC_TOP_PAD_")


def user_set_malloc(environ: dict[str, str] | None = None) -> bool:
    """Whether the environment already tunes glibc's malloc (then avr leaves it alone)."""
    environ = os.environ if environ is None else environ
    return any(name in environ for name in USER_SETTINGS) or \
        "glibc.malloc." in environ.get("GLIBC_TUNABLES", "")


def keep_freed_memory() -> bool:
    """Keep freed memory in the process for the next allocation (module docstring); whether
    glibc took the settings."""
    if user_set_malloc():
        return False
    libc = _glibc()
    if libc is None:
        return False
    return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, -1))


def _glibc():
    """The C library when it is glibc (it alone has these mallopt parameters), else None."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018 - present in glibc alone
    except (OSError, AttributeError):
        return None
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    libc.mallopt.restype = ctypes.c_int
    return libc
