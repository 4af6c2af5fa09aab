"""``run_sweep``: the whole of ``avr sweep`` as one library call, for the command line and for
Python. It names the sweep, opens (or joins) its study, resolves and checks the plan against
the store, runs one worker until no trial is left to start, then writes the results.

- Nothing trains before the plan, the store and the head's arrays are checked.
- Callbacks report progress (``SweepCallbacks``); the result is typed (``SweepResult``).
- A database that fails or a full disk stops the worker with one error (``AvrError``); what
  finished is in the study, and the same call again resumes. A sweep whose every trial failed
  raises ``SweepFailedError`` carrying its result.
"""

from __future__ import annotations

import contextlib
import errno
import time
from dataclasses import dataclass
from pathlib import Path

from avr.errors import AvrError, SweepFailedError
from avr.fuse.sweep import results, storage as studies
from avr.fuse.sweep.plan import SweepPlan, check_store, resolve_plan
from avr.fuse.sweep.results import TrialRow
from avr.fuse.sweep.runs import SWEEPS_DIR, SweepRuns
from avr.fuse.sweep.worker import SweepCallbacks, run_worker


@dataclass
class SweepStart:
    """The sweep a worker is about to train, as ``on_start`` receives it."""

    name: str
    plan: SweepPlan
    storage_url: str
    schedule: str | None  # how the store's schedule sets unset epochs, batch and lr, or None
    done: int  # trials already finished and not failed
    best_val_r1: float  # the best val R@1 of those (0 when none)


@dataclass
class SweepResult:
    """Every finished trial of the study (ranked, best first) and what the sweep wrote."""

    name: str
    plan: SweepPlan
    storage_url: str
    location: str | Path  # the sweep's folder: a local path or a URL
    rows: list[TrialRow]
    paths: list[str]  # trials.csv and the plots, where they are

    @property
    def best(self) -> TrialRow | None:
        return next((row for row in self.rows if row.state == "complete"), None)

    @property
    def failed(self) -> list[TrialRow]:
        return [row for row in self.rows if row.state == "failed"]


def run_sweep(name: str | None = None, *, grid: str | None = None, search: str | None = None,
              trials: int | None = None, prune: bool = False, cache: str | Path | None = None,
              storage: str | None = None, head: str | None = None, epochs: int | None = None,
              batch_size: int | None = None, seed: int | None = None, device: str | None = None,
              memory_budget: float | None = None, resident: str | None = None,
              options: list[str] = (), save_runs: bool = False, parallel: int = 1,
              study_timeout: float = studies.STUDY_TIMEOUT_S, heartbeat: int | None = None,
              runs_dir: str | Path = SWEEPS_DIR,
              callbacks: SweepCallbacks = SweepCallbacks()) -> SweepResult:
    """Start the sweep ``name`` (``grid`` needed), or join or resume it, and train its trials
    until none is left to start; ``options`` are fixed ``key=value`` training or head options;
    ``study_timeout``: seconds to wait for another worker's lock on the study or for its
    database server; ``heartbeat``: seconds between a running trial's heartbeats (a new sweep's;
    a joined one keeps its own unless given); ``runs_dir``: a folder or a URL
    (:mod:`avr.fuse.sweep.runs`). Returns every finished trial of the study, ranked; the
    weights of all but the best trial are deleted unless ``save_runs``."""
    from avr.fuse.trainer import schedule_for_store

    if not study_timeout > 0:
        raise AvrError(f"--study-timeout {study_timeout}: must be > 0 seconds")
    flags = dict(head=head, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                 memory_budget=memory_budget, resident=resident)
    name = name or f"{head or 'tefal'}-{time.strftime('%Y%m%d-%H%M%S')}"
    runs = SweepRuns.of(runs_dir, name)
    url = studies.storage_url(name, storage, runs.work.parent)
    lock = studies.StudyLock(url, name, study_timeout)
    with _stopped_cleanly(url, runs.work):
        with lock:  # workers started together create the study once
            plan = resolve_plan(name, studies.stored_plan(name, url, study_timeout), grid=grid,
                                search=search, trials=trials, prune=prune,
                                cache=str(cache) if cache is not None else None, flags=flags,
                                opts=list(options), heartbeat=heartbeat)
            check_store(plan)
            _, schedule = schedule_for_store(plan.cache, plan.base)
            study_storage = studies.open_storage(url, study_timeout, plan.heartbeat)
            study = studies.open_study(name, plan, study_storage)
        finished = [row for row in results.finished_rows(study) if row.state != "failed"]
        callbacks.on_start(SweepStart(name, plan, study_storage.url, schedule, len(finished),
                                      max((row.best_val_r1 for row in finished), default=0.0)))
        run_worker(study, study_storage, plan, runs, callbacks, parallel=parallel, lock=lock)
        rows = results.finished_rows(study)
        paths = runs.publish([results.write_trials_csv(study, runs.work),
                              *results.write_plots(study, runs.work)])
        if not save_runs:
            results.drop_weights_of_others(study)
    result = SweepResult(name, plan, study_storage.url, runs.location, rows, paths)
    if rows and len(result.failed) == len(rows):
        raise SweepFailedError(f"sweep {name!r}: every trial failed ({len(rows)}); the first "
                               f"reason: {rows[0].error}", result)
    return result


@contextlib.contextmanager
def _stopped_cleanly(url: str, out_dir: Path):
    """A failing database or a full disk as one error naming the cause; the study keeps what
    finished, and the worker's running trial is retried when the sweep is started again."""
    resume = "run the same command again to resume (the finished trials are kept)"
    try:
        yield
    except AvrError:
        raise
    except studies.storage_errors() as error:
        raise studies.storage_failure(url, error, "{cause}; " + resume) from None
    except Exception as error:
        if not _disk_full(error):
            raise
        where = getattr(error, "filename", None) or out_dir
        raise AvrError(f"{where}: no space left on device; free some space and {resume}"
                       ) from None


def _disk_full(error: Exception) -> bool:
    """Whether ``error`` is a write that met a full disk (or quota): an OSError, or safetensors'
    own error around one (it writes weights in Rust)."""
    from safetensors import SafetensorError

    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(error, SafetensorError) and f"os error {errno.ENOSPC})" in str(error)
