"""Run the avr command line as a sweep worker on another machine (its machine identity is not
this one's, so its pid means nothing here) and SIGKILL it right after the trainer logs its Nth
epoch: what a machine lost mid-trial leaves in a study. Only the study's heartbeat can tell
the other workers that it is gone.

    python tests/support/lost_machine.py N sweep --name S ...
"""

from __future__ import annotations

import sys

from avr.cli import main
from avr.fuse.sweep import worker
from avr.store import lock
from kill_at_epoch import kill_at_epoch  # this folder is on the path when run as a script


def another_machine() -> str:
    return "a machine that is not this one"


if __name__ == "__main__":
    lock.machine_identity = worker.machine_identity = another_machine
    kill_at_epoch(int(sys.argv[1]))
    main(sys.argv[2:])
