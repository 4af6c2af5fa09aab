"""Run the avr command line in this process and SIGKILL it at one chosen write to a local
store: the Nth write of the store key KEY (``zarr.json`` is the root's metadata,
``frame_embeddings/c/1/0/0`` a chunk), just before or just after the write.

    python tests/support/kill_at_write.py KEY N before|after extract --dataset demo ...

A run that never reaches the point finishes normally.
"""

from __future__ import annotations

import os
import signal
import sys

from zarr.storage import LocalStore

from avr.cli import main


def kill_at_write(key: str, nth: int, when: str) -> None:
    real_set = LocalStore.set
    seen = 0

    async def set_and_maybe_die(self, written_key, value):
        nonlocal seen
        hit = written_key == key and (seen := seen + 1) == nth
        if hit and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        await real_set(self, written_key, value)
        if hit and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    LocalStore.set = set_and_maybe_die


if __name__ == "__main__":
    kill_at_write(sys.argv[1], int(sys.argv[2]), sys.argv[3])
    main(sys.argv[4:])
