"""Run the avr command line in this process and pause it right after the trainer logs its Nth
epoch: it creates FILE, then waits until FILE is removed. A test acts at that known point of a
run (stops a server, say) and then lets it go on.

    python tests/support/pause_at_epoch.py N FILE sweep --name S ...
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from avr.cli import main
from at_epoch import after_epoch  # this folder is on the path when run as a script


def pause(flag: Path) -> None:
    flag.touch()
    while flag.exists():
        time.sleep(0.1)


if __name__ == "__main__":
    after_epoch(int(sys.argv[1]), lambda: pause(Path(sys.argv[2])))
    main(sys.argv[3:])
