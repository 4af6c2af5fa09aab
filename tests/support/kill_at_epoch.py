"""Run the avr command line in this process and SIGKILL it right after the trainer logs its Nth
epoch (counted over every run the process trains, e.g. every trial of a sweep).

    python tests/support/kill_at_epoch.py N sweep --name S ...

A run that never reaches the Nth epoch finishes normally.
"""

from __future__ import annotations

import os
import signal
import sys

from avr.cli import main
from at_epoch import after_epoch  # this folder is on the path when run as a script


def kill_at_epoch(nth: int) -> None:
    after_epoch(nth, lambda: os.kill(os.getpid(), signal.SIGKILL))


if __name__ == "__main__":
    kill_at_epoch(int(sys.argv[1]))
    main(sys.argv[2:])
