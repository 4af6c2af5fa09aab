"""Act at a known point of a run: right after the trainer logs its Nth epoch (counted over every
run the process trains, e.g. every trial of a sweep). The harnesses beside this file (kill,
pause, fill the disk) run the avr command line with one such action."""

from __future__ import annotations

from typing import Callable

from avr.fuse import checkpoint


def after_epoch(nth: int, action: Callable[[], None]) -> None:
    real_append = checkpoint.append_log
    seen = 0

    def append_and_maybe_act(run_dir, log):
        nonlocal seen
        real_append(run_dir, log)
        seen += 1
        if seen == nth:
            action()

    checkpoint.append_log = append_and_maybe_act
