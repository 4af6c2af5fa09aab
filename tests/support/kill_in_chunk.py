"""A dask worker preload (`dask worker --preload tests/support/kill_in_chunk.py`) that SIGKILLs
its worker midway through writing a video chunk: after the first half of the chunk's arrays are
written, before the rest and before its done mask. Only the first worker to get there dies: it
claims the file named by ``AVR_KILL_MARKER`` (created exclusively), so a retry runs normally."""

from __future__ import annotations

import os
import signal


def dask_setup(worker) -> None:
    from avr.extract import pipeline

    real_write_rows = pipeline._write_rows
    marker = os.environ["AVR_KILL_MARKER"]

    def write_half_then_die(group, layout, start, stop, rows, values, region_is_fresh):
        names = sorted(values)
        if "frame_embeddings" in values and _claim(marker):  # a video chunk
            half = {name: values[name] for name in names[:len(names) // 2]}
            real_write_rows(group, layout, start, stop, rows, half, region_is_fresh)
            os.kill(os.getpid(), signal.SIGKILL)
        real_write_rows(group, layout, start, stop, rows, values, region_is_fresh)

    pipeline._write_rows = write_half_then_die


def _claim(marker: str) -> bool:
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        return True
    except FileExistsError:
        return False
