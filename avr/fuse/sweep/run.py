"""``run_sweep``: the whole of ``avr sweep`` as one library call, for the command line and for
Python. It names the sweep, opens (or joins) its study, resolves and checks the plan against
the store, runs one worker until no trial is left to start, then writes the results.

- Nothing trains before the plan, the store and the head's arrays are checked.
- Callbacks report progress (``SweepCallbacks``); the result is typed (``SweepResult``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from avr.fuse.sweep import results, storage as studies
from avr.fuse.sweep.plan import SweepPlan, check_store, resolve_plan
from avr.fuse.sweep.results import TrialRow
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
    out_dir: Path
    rows: list[TrialRow]
    paths: list[Path]  # trials.csv and the plots

    @property
    def best(self) -> TrialRow | None:
        return next((row for row in self.rows if row.state == "complete"), None)


def run_sweep(name: str | None = None, *, grid: str | None = None, search: str | None = None,
              trials: int | None = None, prune: bool = False, cache: str | Path | None = None,
              storage: str | None = None, head: str | None = None, epochs: int | None = None,
              batch_size: int | None = None, seed: int | None = None, device: str | None = None,
              memory_budget: float | None = None, resident: str | None = None,
              options: list[str] = (), save_runs: bool = False, parallel: int = 1,
              sweeps_dir: Path = studies.SWEEPS_DIR,
              callbacks: SweepCallbacks = SweepCallbacks()) -> SweepResult:
    """Start the sweep ``name`` (``grid`` needed), or join or resume it, and train its trials
    until none is left to start; ``options`` are fixed ``key=value`` training or head options.
    Returns every finished trial of the study, ranked; the weights of all but the best trial
    are deleted unless ``save_runs``."""
    from avr.fuse.trainer import schedule_for_store

    flags = dict(head=head, epochs=epochs, batch_size=batch_size, seed=seed, device=device,
                 memory_budget=memory_budget, resident=resident)
    name = name or f"{head or 'tefal'}-{time.strftime('%Y%m%d-%H%M%S')}"
    url = studies.storage_url(name, storage, sweeps_dir)
    with studies.opening(url):  # workers started together create the study once
        plan = resolve_plan(name, studies.stored_plan(name, url), grid=grid, search=search,
                            trials=trials, prune=prune,
                            cache=str(cache) if cache is not None else None, flags=flags,
                            opts=list(options))
        check_store(plan)
        _, schedule = schedule_for_store(plan.cache, plan.base)
        study_storage = studies.open_storage(url)
        study = studies.open_study(name, plan, study_storage)
    finished = [row for row in results.finished_rows(study) if row.state != "failed"]
    callbacks.on_start(SweepStart(name, plan, study_storage.url, schedule, len(finished),
                                  max((row.best_val_r1 for row in finished), default=0.0)))
    out_dir = studies.sweep_dir(name, sweeps_dir)
    run_worker(study, study_storage, plan, out_dir, callbacks, parallel=parallel)
    rows = results.finished_rows(study)
    paths = [results.write_trials_csv(study, out_dir), *results.write_plots(study, out_dir)]
    if not save_runs:
        results.drop_weights_of_others(study)
    return SweepResult(name, plan, study_storage.url, out_dir, rows, paths)
