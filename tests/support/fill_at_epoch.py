"""Run the avr command line in this process and fill the disk of FOLDER right after the trainer
logs its Nth epoch, so that what the command writes next meets a full disk.

    python tests/support/fill_at_epoch.py N FOLDER sweep --name S ...
"""

from __future__ import annotations

import sys
from pathlib import Path

from avr.cli import main
from at_epoch import after_epoch  # this folder is on the path when run as a script
from disks import fill

if __name__ == "__main__":
    after_epoch(int(sys.argv[1]), lambda: fill(Path(sys.argv[2])))
    main(sys.argv[3:])
