"""Run the avr command line in this process and SIGKILL it right after the trainer logs its Nth
epoch (counted over every run the process trains, e.g. every trial of a sweep); with N = 0, as
the first epoch saves its last checkpoint (before last.safetensors and the log's first row).

    python tests/support/kill_at_epoch.py N sweep --name S ...

A run that never reaches the Nth epoch finishes normally.
"""

from __future__ import annotations

import os
import signal
import sys

from avr.cli import main
from avr.fuse import checkpoint
from at_epoch import after_epoch  # this folder is on the path when run as a script


def kill_at_epoch(nth: int) -> None:
    if nth == 0:
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        checkpoint.TrainState.save_last = die
        return
    after_epoch(nth, lambda: os.kill(os.getpid(), signal.SIGKILL))


if __name__ == "__main__":
    kill_at_epoch(int(sys.argv[1]))
    main(sys.argv[2:])
