"""The installed `avr` console script, run as a user runs it: a subprocess of this checkout; and
the checks of what it prints."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from support.paths import REPO, SUPPORT

TRACEBACK_MARKS = ("Traceback", "╭─ Traceback", "File \"")


def run_avr(*args, cwd: Path | None = None, timeout: float = 120,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The console script with ``args``; ``env``: variables added to the environment."""
    script = Path(sys.executable).with_name("avr")
    assert script.exists(), f"the avr console script is not installed beside {sys.executable}"
    return subprocess.run([str(script), *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path.cwd()), "COLUMNS": "200",
                               **(env or {})})


def run_module(*args, cwd: Path, script: str | None = None, wait: bool = True):
    """``python -m avr ARGS`` (or ``python tests/support/SCRIPT ARGS``, a kill harness) in
    ``cwd``, running this checkout's code; with ``wait=False`` the started process."""
    command = [sys.executable, *([str(SUPPORT / script)] if script else ["-m", "avr"]),
               *map(str, args)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(done: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done


def assert_usage_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    """typer's short usage message naming the problem, exit status 2, nothing started."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert not any(mark in done.stderr for mark in TRACEBACK_MARKS), done.stderr
    assert "Usage: avr" in done.stderr
    for text in expected:
        assert text in done.stderr, done.stderr
    assert done.stdout == ""  # nothing started: no progress bar, no "training ..." line


def assert_one_line_error(done: subprocess.CompletedProcess, *expected: str) -> None:
    """One ``error:`` line holding each of ``expected``, exit status 2."""
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
