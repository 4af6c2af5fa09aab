"""Rich progress bars shared by the stages: throughput, ETA and a few live fields."""

from __future__ import annotations

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)


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
