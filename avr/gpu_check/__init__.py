"""`avr bench gpu`: what avr does on a GPU, checked and then measured, in one command that fits
a few minutes of a lent H100 or H200 (BENCHMARKS.md "The GPU check").

1. Correctness (``avr.gpu_check.correctness``), on a small generated store: every head trained
   a few steps and evaluated on the device, in fp32 and under bf16 autocast, against the same
   run on the CPU in fp32; streamed, int8 and pinned-host residency against device-resident
   rows; the stacked trials against their solo runs; the scoring blocks sized from free GPU
   memory against one video a block.
2. Figures (``avr.gpu_check.figures``): each head's train step and VATEX-extrapolated epoch
   (resident, host, streamed, int8), 15,000 x 1,500 scoring, a sweep stacked against one trial
   at a time, extraction, store-to-device reads; the peak GPU memory of each.

The contract:
- each row runs alone: an exception (a dtype or device mismatch, say) makes that row "error"
  with its message, and the check goes on; a correctness row outside a tolerance is "fail";
- a time guard (``Budget``) skips a row, recorded "skipped", when less time is left than it
  needs; loops inside a figure stop at the guard and extrapolate (said in the row);
- one JSON (``report_json``: every key is documented in BENCHMARKS.md) and one table (``table``);
- ``quick`` runs every row on tiny shapes in about a minute; with ``--device cpu`` the bf16
  rows run under CPU bf16 autocast (``avr.device.bf16_on_cpu``), so the check is tested where
  no GPU is at hand (tests/cli/test_bench_gpu.py).
"""

from __future__ import annotations

import math
import os
import platform
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from avr.errors import OutputFileError

JSON_VERSION = 1
# pass / fail: a correctness row within / outside its tolerances; measured: a figure taken;
# error: the row raised; skipped: the time guard (or the device) left it out.
STATUSES = ("pass", "fail", "measured", "error", "skipped")


@dataclass
class Row:
    """One line of the table and one entry of the JSON's ``rows``."""

    section: str  # correctness | figure
    name: str
    status: str = "measured"
    # correctness: the errors measured and the bound of each (a row passes when every measured
    # value is within its tolerance); info: what was seen beside them, not judged
    measured: dict[str, float] = field(default_factory=dict)
    tolerance: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    # figure: the value, its unit, whether it is extrapolated, the target it is held to and
    # whether it meets it (None: no target, or not measured)
    value: float | None = None
    unit: str = ""
    extrapolated: bool = False
    target: str | None = None
    meets: bool | None = None
    note: str = ""
    error: str | None = None
    seconds: float = 0.0
    peak_gpu_gb: float | None = None

    def judged(self) -> Row:
        """A correctness row's status from its measured errors and tolerances."""
        if self.section == "correctness" and self.status == "measured":
            within = all(name in self.measured and math.isfinite(self.measured[name])
                         and self.measured[name] <= bound
                         for name, bound in self.tolerance.items())
            self.status = "pass" if within else "fail"
        return self


def compared(name: str, measured: dict[str, float], tolerance: dict[str, float],
                note: str = "", **info: Any) -> Row:
    return Row("correctness", name, measured=measured, tolerance=tolerance, note=note, info=info)


def figure(name: str, value: float, unit: str, *, note: str = "", extrapolated: bool = False,
           target: str | None = None, meets: bool | None = None) -> Row:
    return Row("figure", name, value=value, unit=unit, note=note, extrapolated=extrapolated,
               target=target, meets=meets)


class Budget:
    """Seconds left of the check's budget."""

    def __init__(self, seconds: float):
        self.seconds, self.started = seconds, time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.seconds - self.elapsed()


@dataclass
class Check:
    """A row (or a few rows) to run: ``run()`` returns them; ``needs_s`` is the time it must
    have left to start (the time guard)."""

    section: str
    name: str
    run: Callable[[], list[Row]]
    needs_s: float = 0.0


def one_row(function, *args) -> Callable[[], list[Row]]:
    """What a check runs when it makes one row: ``function(*args)``."""
    return lambda: [function(*args)]


def run_one(check: Check, device: torch.device, budget: Budget) -> list[Row]:
    """The check's rows, isolated and judged (module docstring); skipped when the budget has
    less time left than it needs."""
    if budget.left() < check.needs_s:
        return [Row(check.section, check.name, "skipped",
                    note=f"time guard: {max(budget.left(), 0):.0f} s left of the budget, "
                         f"this needs about {check.needs_s:.0f} s")]
    started = time.perf_counter()
    peak = None
    try:
        if device.type == "cuda":  # inside: a CUDA error left by an earlier row fails this one
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        rows = check.run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) / 1e9
    except Exception as error:  # noqa: BLE001 - a row's failure is recorded, the check goes on
        rows = [Row(check.section, check.name, "error", error=error_text(error))]
    seconds = time.perf_counter() - started
    for row in rows:
        row.seconds, row.peak_gpu_gb = seconds, peak
        row.judged()
    return rows


def error_text(error: BaseException) -> str:
    """The exception in one line, with the innermost frame of avr that raised it."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "avr" in f.filename]
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}{where}"


# ---- the whole check ---------------------------------------------------------------------------

@dataclass
class Report:
    command: str
    device: dict[str, Any]
    mode: str  # full | quick
    budget_s: float
    started: str
    sizes: dict[str, Any]
    rows: list[Row]
    seconds: float = 0.0
    finished: bool = False  # False while rows are still to run (the JSON is written after each)

    @property
    def correctness_rows(self) -> list[Row]:
        return [row for row in self.rows if row.section == "correctness"]

    def summary(self) -> str:
        """The line after the table: the correctness rows by status."""
        counts = {status: sum(row.status == status for row in self.correctness_rows)
                  for status in ("pass", "fail", "error", "skipped")}
        return (f"correctness: {counts['pass']} passed, {counts['fail']} failed, "
                f"{counts['error']} errors, {counts['skipped']} skipped")

    @property
    def passed(self) -> bool:
        """Every correctness row ran and passed (a skipped one passes nothing)."""
        rows = self.correctness_rows
        return bool(rows) and all(row.status == "pass" for row in rows)


def device_info(device: torch.device) -> dict[str, Any]:
    info = {"type": device.type, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cpu_count": os.cpu_count(), "intra_op_threads": torch.get_num_threads(),
            "name": platform.processor() or platform.machine(), "memory_gb": None}
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        info.update(name=properties.name, memory_gb=properties.total_memory / 1e9)
    return info


def run_gpu_check(device: torch.device, *, budget_s: float, quick: bool = False,
                  workdir: Path | None = None, out: Path | None = None,
                  command: str = "avr bench gpu", console=None) -> Report:
    """The whole check on ``device`` (module docstring): correctness rows, then figures while
    the budget lasts. ``workdir``: where the generated stores go (a temporary folder inside);
    ``out``: the JSON, written again after every check (a run killed on the way leaves the rows
    it finished)."""
    import tempfile

    from avr.gpu_check import correctness as correctness_rows
    from avr.gpu_check import figures as figure_rows
    from avr.gpu_check.sizes import FULL, QUICK
    from avr.progress import Meter

    sizes = QUICK if quick else FULL
    budget = Budget(budget_s)
    report = Report(command, device_info(device), "quick" if quick else "full", budget_s,
                    time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), asdict(sizes), [])
    with tempfile.TemporaryDirectory(dir=workdir, prefix="avr-gpu-check-") as tmp:
        checks = (correctness_rows.checks(device, sizes, Path(tmp))
                  + figure_rows.checks(device, sizes, Path(tmp), budget))
        with Meter(console) as meter:
            task = meter.add("gpu check", len(checks), unit="checks")
            for check in checks:
                report.rows += run_one(check, device, budget)
                report.seconds = budget.elapsed()
                if out is not None:
                    write_json(report, out)
                meter.advance(task, 1, failed=sum(r.status in ("fail", "error")
                                                  for r in report.rows) or None)
    report.finished = True
    if out is not None:
        write_json(report, out)
    return report


def report_json(report: Report) -> dict[str, Any]:
    """The JSON ``avr bench gpu --out`` writes (BENCHMARKS.md documents every key)."""
    return {"version": JSON_VERSION, "command": report.command, "device": report.device,
            "mode": report.mode, "budget_s": report.budget_s, "started": report.started,
            "seconds": report.seconds, "finished": report.finished, "sizes": report.sizes,
            "passed": report.passed,
            "counts": {status: sum(row.status == status for row in report.rows)
                       for status in STATUSES},
            "rows": [_plain(asdict(row)) for row in report.rows]}


def _plain(value: Any) -> Any:
    """JSON-safe: a non-finite float (a mismatch measures inf) as the string "inf" or "nan"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def check_output(path: Path) -> None:
    """Refuse, before any work, an ``--out`` that cannot be written."""
    if path.is_dir():
        raise OutputFileError(f"--out {path}: is a folder; name the JSON file to write")
    if not path.parent.is_dir() or not os.access(path.parent, os.W_OK):
        raise OutputFileError(f"--out {path}: the folder {path.parent} does not exist or is "
                              f"not writable")


def write_json(report: Report, path: Path) -> None:
    import json

    text = json.dumps(report_json(report), indent=2, default=_json_value) + "\n"
    partial = path.with_name(path.name + ".partial")
    try:
        partial.write_text(text)
        os.replace(partial, path)  # a kill mid-write leaves the last whole JSON
    except OSError as error:
        raise OutputFileError(f"--out {path}: cannot be written ({error.strerror})") from None


def _json_value(value: Any) -> Any:
    if isinstance(value, (torch.dtype, torch.device, Path)):
        return str(value)
    raise TypeError(f"not JSON: {value!r}")


# ---- the table ---------------------------------------------------------------------------------

def table(report: Report):
    """One rich table: every row's status, its worst error against its tolerance (correctness)
    or its value against its target (figures), peak GPU memory and seconds."""
    from rich.table import Table

    colours = {"pass": "green", "measured": "green", "fail": "red", "error": "red",
               "skipped": "yellow"}
    result = Table(title=f"avr bench gpu ({report.mode}) on {report.device['name']}: "
                         f"{report.seconds:.0f} s of a {report.budget_s:.0f} s budget")
    for column, justify in (("", "left"), ("check or figure", "left"), ("status", "left"),
                            ("value", "right"), ("tolerance or target", "left"),
                            ("meets", "left"), ("peak GPU GB", "right"), ("s", "right")):
        result.add_column(column, justify=justify, overflow="fold")
    for row in report.rows:
        value, bound = _cells(row)
        meets = "" if row.meets is None else ("yes" if row.meets else "no")
        peak = "" if row.peak_gpu_gb is None else f"{row.peak_gpu_gb:.2f}"
        result.add_row(row.section, row.name, f"[{colours[row.status]}]{row.status}[/]", value,
                       bound, meets, peak, f"{row.seconds:.1f}")
    return result


def _cells(row: Row) -> tuple[str, str]:
    if row.status == "error":
        return "", row.error or ""
    if row.status == "skipped":
        return "", row.note
    if row.section == "correctness":
        if not row.tolerance:
            return "", row.note
        worst = max(row.tolerance, key=lambda k: _ratio(row.measured.get(k, math.nan),
                                                        row.tolerance[k]))
        return (f"{worst} {row.measured.get(worst, math.nan):.2e}",
                f"<= {row.tolerance[worst]:.1e}")
    value = "" if row.value is None else f"{row.value:,.4g} {row.unit}"
    if row.extrapolated:
        value += " (extrapolated)"
    return value, row.target or row.note


def _ratio(measured: float, bound: float) -> float:
    if not math.isfinite(measured):
        return math.inf
    return measured / bound if bound > 0 else (math.inf if measured > 0 else 0.0)
