"""One sweep worker: it asks the study for trials, trains them on the store it loaded once,
reports val R@1 after every epoch and tells the study how each ended.

- Trials are taken, and pruning decided, under the study's lock (``storage.StudyLock``): two
  workers never take one grid point, on one machine or several.
- A worker ends with the sweep: with nothing left to start, it waits while other workers
  train, so that a trial whose worker is lost is trained again.
- A running trial's heartbeat is recorded every ``plan.heartbeat`` s on a thread of its own. A
  worker killed mid-trial (SIGKILL, a lost machine) leaves its trial RUNNING; the next worker
  to look fails it and queues a copy with the same options (Optuna's
  RetryHeartbeatStaleTrialCallback; for a grid, the same point): at once when the dead worker
  ran on this machine (its pid is gone), after ``GRACE_HEARTBEATS`` missed heartbeats otherwise.
- A random or tpe trial that draws the options of a finished trial takes its result without
  training (``finished_twin``): training them again would repeat the run.
- ``parallel`` trials are asked at once and trained side by side, as one stacked model where
  their options allow (:mod:`avr.fuse.stacked`).
"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from avr.errors import AvrError
from avr.fuse.checkpoint import EpochLog
from avr.fuse.config import TrainConfig
from avr.fuse.sweep.plan import SweepPlan, head_fields, suggest, trial_config
from avr.fuse.sweep.results import TrialRow, trial_row, write_trials_csv
from avr.fuse.sweep.runs import SweepRuns
from avr.fuse.sweep.storage import (NUMERIC_GRID_ATTR, StudyLock, make_sampler, optuna_module,
                                    storage_errors)
from avr.fuse.trainer import CacheData, TrainResult, load_cache, schedule_for_store, train
from avr.store.lock import _process_runs, machine_identity

IDLE_POLL_S = 5.0  # a worker with nothing left to start looks at the study again this often


def worker_identity() -> dict[str, Any]:
    import psutil

    return {"machine": machine_identity(), "pid": os.getpid(),
            "pid_started": psutil.Process().create_time()}


def release_dead_trials(study, storage) -> None:
    """Fail the RUNNING trials whose worker is gone and queue a copy of each: a dead process of
    this machine at once, another machine's after the storage's grace period without a
    heartbeat."""
    optuna = optuna_module()
    here = machine_identity()
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not worker or worker["machine"] != here or _process_runs(worker["pid"],
                                                                      worker["pid_started"]):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "error", f"its worker (pid "
                                        f"{worker['pid']}) stopped while training it")
            storage.set_trial_state_values(trial._trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker released it first
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)
        retry(study, storage.get_trial(trial._trial_id))
    optuna.storages.fail_stale_trials(study)


def counted_trials(study) -> list:
    """The study's trials less those that a retry replaced (a killed worker's)."""
    retry_history = optuna_module().storages.RetryHeartbeatStaleTrialCallback.retry_history
    trials = study.get_trials(deepcopy=False)
    replaced = {n for t in trials for n in retry_history(t)}
    return [t for t in trials if t.number not in replaced]


def others_running(study) -> bool:
    """Whether a trial of the study is RUNNING (another worker's: this one has none then)."""
    RUNNING = optuna_module().trial.TrialState.RUNNING
    return bool(study.get_trials(deepcopy=False, states=(RUNNING,)))


def work_left(study, plan: SweepPlan) -> bool:
    """Whether this worker should ask for another trial: a queued retry, a grid point that no
    trial has finished or is training, or fewer than ``trials`` finished and running."""
    TrialState = optuna_module().trial.TrialState
    trials = counted_trials(study)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    taken = [t for t in trials if t.state.is_finished() or t.state == TrialState.RUNNING]
    if plan.search == "grid":
        return bool(set(range(plan.size())) - {t.system_attrs.get("grid_id") for t in taken})
    return len(taken) < plan.size()


class Heartbeat:
    """Records, every heartbeat interval of the storage, that this process still trains its
    running trials."""

    def __init__(self, storage):
        self.storage = storage
        self.trial_ids: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def add(self, trial_id: int) -> None:
        """Beat for this trial from now on; the first beat at once, so that a worker lost in
        its first seconds leaves a trial that goes stale."""
        self.storage.record_heartbeat(trial_id)
        self.trial_ids.add(trial_id)

    def _beat(self) -> None:
        errors = storage_errors()
        while not self._stop.wait(self.storage.heartbeat_interval):
            for trial_id in list(self.trial_ids):
                try:
                    self.storage.record_heartbeat(trial_id)
                except errors:
                    pass  # a database that went away: the worker's next call reports it


class ReportWriter:
    """Writes trials' per-epoch reports to the study on a thread of its own, in order, while
    training goes on: each report is a database transaction, and 16 stacked trials of 100
    epochs make 1,600 of them. ``wait`` before anything that reads a trial's reports (the
    pruner) or ends the trial; a failed write is raised there."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="avr-study")
        self._pending: list[Future] = []

    def __enter__(self) -> ReportWriter:
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)

    def report(self, trial, value: float, step: int) -> None:
        self._pending.append(self._pool.submit(trial.report, value, step))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for future in pending:
            future.result()


@dataclass
class SweepCallbacks:
    """What the command line shows while a sweep runs."""

    on_start: Callable[[Any], None] = lambda start: None  # a SweepStart: the study is open
    on_trial_start: Callable[[int, dict[str, Any]], None] = lambda number, options: None
    on_epoch: Callable[[int, EpochLog], None] = lambda number, log: None
    on_trial_end: Callable[[TrialRow], None] = lambda row: None


class CacheByHead:
    """The cache loaded once per head the sweep trains, with the arrays of every option value
    the sweep lists for that head."""

    def __init__(self, plan: SweepPlan, device):
        self.plan, self.device = plan, device
        self.loaded: dict[str, CacheData] = {}

    def __call__(self, head: str) -> CacheData:
        if head not in self.loaded:
            variants = [{axis.name: v} for axis in self.plan.axes if not axis.is_range
                        and axis.name in head_fields(head) for v in axis.values]
            base = self.plan.base.head_options if head == self.plan.base.head else {}
            self.loaded[head] = load_cache(self.plan.cache, head, self.device, head_options=[
                {**base, **variant} for variant in variants or [{}]], config=self.plan.base)
        return self.loaded[head]


def run_worker(study, storage, plan: SweepPlan, runs: SweepRuns,
               callbacks: SweepCallbacks = SweepCallbacks(), parallel: int = 1,
               lock: StudyLock | None = None) -> None:
    """Train trials of the study until none is left to start, ``parallel`` at a time (stacked
    where their options allow, :mod:`avr.fuse.stacked`), in ``runs``; write trials.csv after
    each round. ``lock`` (default: the study's own) is held while trials are taken and while
    the pruner decides."""
    from avr.device import resolve_device

    lock = lock or StudyLock(storage.url, study.study_name)
    numeric_grid = bool(study.user_attrs.get(NUMERIC_GRID_ATTR))
    caches = CacheByHead(plan, resolve_device(plan.base.device))
    worker = worker_identity()
    with Heartbeat(storage) as heartbeat, ReportWriter() as reports:
        while True:
            release_dead_trials(study, storage)
            with lock:
                asked = take_trials(study, plan, parallel, heartbeat, worker, numeric_grid)
            if not asked:
                if not others_running(study):
                    break
                # Wait for the trials other workers train: one whose worker is lost is
                # trained again here once its heartbeat is stale.
                time.sleep(min(IDLE_POLL_S, storage.heartbeat_interval))
                continue
            try:
                started = [_start(trial, options, study, plan, runs, callbacks)
                           for trial, options in asked]
                _run_trials([running for running in started if running is not None], study,
                            plan, caches, callbacks, reports, lock, runs)
            finally:
                heartbeat.trial_ids.difference_update(trial._trial_id for trial, _ in asked)
            runs.publish([write_trials_csv(study, runs.work)])


def take_trials(study, plan: SweepPlan, parallel: int, heartbeat: Heartbeat,
                worker: dict[str, Any], numeric_grid: bool = False
                ) -> list[tuple[Any, dict[str, Any]]]:
    """Up to ``parallel`` new trials of ``worker`` and their options; called under the study's
    lock, so that what a worker sees free is still free when it takes it (a grid point, a
    retry). A random or tpe trial draws from a sampler seeded by the trial's number: its draw
    depends on the study, not on which worker asked."""
    asked = []
    while len(asked) < parallel and work_left(study, plan):
        if plan.search != "grid":
            study.sampler = make_sampler(plan, len(study.get_trials(deepcopy=False)))
        trial = study.ask()
        heartbeat.add(trial._trial_id)
        trial.set_user_attr("worker", worker)
        asked.append((trial, suggest(trial, plan, numeric_grid)))
    return asked


@dataclass
class _Running:
    """A trial this worker trains: its Optuna trial, config and run directory."""

    trial: Any
    config: TrainConfig
    run_dir: Path
    pruned: bool = False


def _start(trial, options: dict[str, Any], study, plan: SweepPlan, runs: SweepRuns,
           callbacks: SweepCallbacks) -> _Running | None:
    """The trial to train, or None when it drew the options of a finished trial: it then
    takes that trial's result (:func:`repeat_finished`)."""
    if (earlier := finished_twin(study, trial)) is not None:
        callbacks.on_trial_start(trial.number, options)
        repeat_finished(study, trial, earlier, callbacks)
        return None
    run_dir = runs.trial_dir(trial.number)
    trial.set_user_attr("run_dir", runs.trial_location(trial.number))
    callbacks.on_trial_start(trial.number, options)
    config, _ = schedule_for_store(plan.cache, trial_config(plan.base, options))
    return _Running(trial, config, run_dir)


def finished_twin(study, trial):
    """The first complete or pruned trial of ``study`` with ``trial``'s options, or None.
    Random and TPE draw list values again (over 24 combinations of lists, TPE's 24 draws
    hold about 16 distinct ones), and every trial of a sweep starts from the same seed (or
    from the one it draws), so training the same options again repeats a run."""
    TrialState = optuna_module().trial.TrialState
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return next((t for t in study.get_trials(deepcopy=False, states=states)
                 if t.params == trial.params), None)


def repeat_finished(study, trial, earlier, callbacks: SweepCallbacks) -> None:
    """Tell the study that ``trial`` ended as ``earlier`` did, without training it: the same
    val R@1 after each epoch and the same state and value; its row says 0 epochs trained."""
    TrialState = optuna_module().trial.TrialState
    for epoch, value in sorted(earlier.intermediate_values.items()):
        trial.report(value, epoch)
    trial.set_user_attr("repeats", earlier.number)
    trial.set_user_attr("epochs", 0)
    trial.set_user_attr("seconds", 0.0)
    trial.set_user_attr("best_epoch", earlier.user_attrs.get("best_epoch"))
    if earlier.state == TrialState.PRUNED:
        study.tell(trial, state=TrialState.PRUNED)
    else:
        study.tell(trial, earlier.value)
    callbacks.on_trial_end(trial_row(told(trial)))


def _reporter(running: _Running, plan: SweepPlan, callbacks: SweepCallbacks,
              reports: ReportWriter, lock: StudyLock):
    """The trial's ``on_epoch``: report val R@1 to the study; True when the pruner stops it.
    The pruner reads the report at once, under the study's lock (each decision sees every
    report made before it); otherwise it is written in the background."""
    def on_epoch(epoch: int, log: EpochLog) -> bool:
        callbacks.on_epoch(running.trial.number, log)
        # A trial pruned after its last epoch has trained in full: it completes.
        if plan.prune and log.epoch < running.config.epochs:
            reports.wait()
            with lock:
                running.trial.report(log.val_r1, log.epoch)
                running.pruned = running.trial.should_prune()
        else:
            reports.report(running.trial, log.val_r1, log.epoch)
        return running.pruned

    return on_epoch


def _run_trials(trials: list[_Running], study, plan: SweepPlan, caches: CacheByHead,
                callbacks: SweepCallbacks, reports: ReportWriter, lock: StudyLock,
                runs: SweepRuns) -> None:
    """Train ``trials``: each stacked group together, a trial alone on its own."""
    from avr.fuse import stacked

    for group in stacked.groups([running.config for running in trials]):
        members = [trials[i] for i in group]
        cache = caches(members[0].config.head)
        started = time.perf_counter()
        try:
            if len(members) == 1:
                only = members[0]
                results = [train(plan.cache, only.config, only.run_dir, cache=cache,
                                 on_epoch=_reporter(only, plan, callbacks, reports, lock))]
            else:
                reporters = [_reporter(running, plan, callbacks, reports, lock)
                             for running in members]
                results = stacked.train_stacked(
                    plan.cache, [r.config for r in members], [r.run_dir for r in members],
                    cache, on_epoch=lambda k, log: reporters[k](log.epoch, log))
        except AvrError as error:
            reports.wait()
            for running in members:
                _tell(study, running, None, time.perf_counter() - started, callbacks, runs,
                      error=str(error))
            continue
        reports.wait()
        for running, result in zip(members, results):
            _tell(study, running, result, time.perf_counter() - started, callbacks, runs)


def _tell(study, running: _Running, result: TrainResult | None, seconds: float,
          callbacks: SweepCallbacks, runs: SweepRuns, error: str | None = None) -> None:
    """Record a trial's end in the study: failed (``error``), pruned or complete; its folder is
    where the study says first."""
    TrialState = optuna_module().trial.TrialState
    trial = running.trial
    runs.publish_trial(trial.number)
    trial.set_user_attr("seconds", seconds)
    if result is None:
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
    else:
        trial.set_user_attr("epochs", len(result.history))
        trial.set_user_attr("best_epoch", result.best_epoch)
        if running.pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, result.best_val_r1)
    callbacks.on_trial_end(trial_row(told(trial)))


def told(trial):
    """The frozen trial of an asked ``trial`` that was just told: one trial from the storage,
    not ``study.trials`` (every trial of the study with its reports, growing with the study)."""
    return trial.storage.get_trial(trial._trial_id)
