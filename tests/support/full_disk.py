"""Run the avr command line in this process with the disk full after N files: once N files have
been written through a temporary (every file of a run folder; the lock's own files do not
count), each such write fails with ENOSPC.

    python tests/support/full_disk.py N train --cache C --run-dir R ...
"""

from __future__ import annotations

import errno
import pathlib
import sys

from avr.cli import main


def fill_disk_after(files: int) -> None:
    real_write = pathlib.Path.write_bytes
    written = 0

    def write_bytes(path, data):
        nonlocal written
        if path.name.endswith(".tmp") and not path.name.startswith("avr.lock"):
            written += 1
            if written > files:
                raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, data)

    pathlib.Path.write_bytes = write_bytes


if __name__ == "__main__":
    fill_disk_after(int(sys.argv[1]))
    main(sys.argv[2:])
