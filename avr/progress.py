"""Rich progress bars shared by the stages: throughput, ETA and a few live fields.

- ``progress_bar``: the bar itself (count of total, rate, elapsed, ETA, optional fields);
- ``Meter``: the tasks of one job on such a bar, each with its rate (items/s, or MB/s of the
  bytes its advances carry) and a count of failures; silent without a console, so library
  code reports progress the same way whether a command or a test calls it.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

BYTES_UNIT = "MB"  # a task of this unit shows the rate of the bytes its advances carry


def progress_bar(console: Console | None = None, *, unit: str = "items",
                 fields: str = "") -> Progress:
    """A bar with count, rate (``unit``/s), elapsed, ETA and an optional template of task fields,
    e.g. ``fields="loss {task.fields[loss]:.3f}"``."""
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    ]
    if fields:
        columns.append(TextColumn(fields))
    return Progress(*columns, console=console, transient=False)


def rate_text(count: float, seconds: float, unit: str) -> str:
    return f"{count / seconds:,.1f} {unit}/s" if seconds > 0 else f"- {unit}/s"


class Meter:
    """The tasks of one job on a progress bar (``with Meter(console) as meter``); every call is a
    no-op without a console. ``add`` returns a task handle (None when silent or empty)."""

    def __init__(self, console: Console | None):
        self.bar = progress_bar(console, fields="{task.fields[extra]}") if console else None
        self.tasks: dict[int, list] = {}  # task -> [started, unit, count, bytes]

    def __enter__(self) -> Meter:
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def add(self, description: str, total: int, unit: str = "items") -> int | None:
        """A task of ``total`` items whose rate is in ``unit`` (``BYTES_UNIT``: MB/s)."""
        if self.bar is None or total == 0:
            return None
        task = self.bar.add_task(description, total=total, rate="", extra="")
        self.tasks[task] = [time.perf_counter(), unit, 0, 0]
        return task

    def advance(self, task: int | None, count: int, *, nbytes: int = 0,
                failed: int | None = None) -> None:
        """``count`` more items done (carrying ``nbytes``); ``failed``: failures so far."""
        if self.bar is None or task is None:
            return
        state = self.tasks[task]
        state[2] += count
        state[3] += nbytes
        started, unit = state[0], state[1]
        done = state[3] / 1e6 if unit == BYTES_UNIT else state[2]
        self.bar.update(task, advance=count, extra=f"[red]{failed} failed[/]" if failed else "",
                        rate=rate_text(done, time.perf_counter() - started, unit))
