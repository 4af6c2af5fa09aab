"""The installed `avr` console script, run as a user runs it: a subprocess of this checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_avr(*args, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("avr")
    assert script.exists(), f"the avr console script is not installed beside {sys.executable}"
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path.cwd()), "COLUMNS": "200"})
