"""Hyperparameter sweeps as Optuna studies: samplers, pruning, storage that many workers share.

A sweep is a study named ``--name`` in an Optuna RDB (``runs/sweeps/<name>/study.db``, SQLite,
unless ``--storage URL``). Its definition (the cache, ``--grid``, ``--search``, ``--trials``,
``--prune`` and the fixed training options) is stored in the study, so ``avr sweep --name S``
started again, or started N times on N GPUs or machines against one database, trains the same
sweep: each process asks the study for the next trial, trains it on the cache it loaded once,
and tells the study the result.

``--grid`` gives the searched options (:func:`avr.fuse.config.parse_search_space`): lists
(``fusion=add,concat``, ``head=xpool,tefal``) and ranges (``lr=1e-5:1e-3:log``). ``--search
grid`` (Optuna's GridSampler) trains every combination of lists; ``random`` and ``tpe`` draw
``--trials`` configurations. Every trial reports val R@1 after each epoch; with ``--prune``
Optuna's HyperbandPruner (``PRUNER_SETTINGS``) stops hopeless ones. A random or tpe trial that
draws the options of a trial that finished (complete or pruned) takes that trial's result
without training (:func:`finished_twin`): training them again would repeat the run.

A worker killed mid-trial (SIGKILL, a lost machine) leaves its trial RUNNING in the study. The
next worker to look fails it and queues a copy with the same options (Optuna's
RetryHeartbeatStaleTrialCallback; for a grid, the same grid point): at once when the dead worker
ran on this machine (its pid is gone), after ``GRACE_S`` without a heartbeat otherwise.

``--parallel K`` has a worker ask for K trials at once and train them side by side, as one
stacked model where their options allow (:mod:`avr.fuse.stacked`).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import json
import math
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from sqlalchemy.exc import SQLAlchemyError

from avr.errors import AvrError
from avr.fuse import checkpoint
from avr.fuse.checkpoint import EpochLog
from avr.fuse.config import (TRAIN_FIELDS, Axis, TrainConfig, grid_points, head_options,
                             parse_search_space, split_options)
from avr.fuse.fields import typed_fields
from avr.fuse.heads import head_class
from avr.fuse.trainer import CacheData, TrainResult, load_cache, schedule_for_store, train
from avr.store.lock import _process_runs, machine_identity

SEARCHES = ("grid", "random", "tpe")
SWEEPS_DIR = checkpoint.DEFAULT_RUNS_DIR / "sweeps"
STUDY_FILE = "study.db"
TRIALS_FILE = "trials.csv"
CURVES_PLOT = "val_r1.png"
IMPORTANCES_PLOT = "importances.png"
TRIALS_COLUMNS = ("trial", "state", "epochs", "best_val_r1", "seconds")
HEARTBEAT_S = 20  # a running trial's heartbeat in the study
GRACE_S = 120  # a trial of another machine without a heartbeat this long is taken as dead
# Hyperband over epochs: brackets of successive halving from 1 epoch up to all of them, keeping
# the best third at each rung (Li et al. 2018's eta = 3, Optuna's default). Replayed on the demo's
# tefal grid (benchmarks/prune_replay.py, BENCHMARKS.md), no Hyperband, successive-halving or
# median setting reliably both trained at most 40 % of the epochs and kept the grid's best (at
# best in 19 of 30 TPE studies, and worse than this one at 60 epochs a trial), so the paper's
# setting stays.
PRUNER_SETTINGS = dict(min_resource=1, reduction_factor=3)
PLAN_ATTR = "avr_sweep"  # the study's user attribute holding the sweep's definition
STATE_NAMES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}


# ---- what a sweep is -------------------------------------------------------------------------

@dataclass
class SweepPlan:
    """A sweep's definition; stored in its study so that every worker trains the same sweep."""

    cache: str
    grid: str
    search: str
    trials: int | None  # configurations to draw (random, tpe); a grid trains all of its points
    prune: bool
    base: TrainConfig  # the fixed options every trial starts from

    def to_json(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "base": dataclasses.asdict(self.base)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SweepPlan:
        return cls(**{**data, "base": TrainConfig(**data["base"])})

    @property
    def axes(self) -> list[Axis]:
        return checked_axes(self.base, parse_search_space(self.grid))

    def size(self) -> int:
        """Trials the sweep trains: every grid point, or ``trials``."""
        return len(grid_points(self.axes)) if self.search == "grid" else int(self.trials)


def checked_axes(base: TrainConfig, axes: list[Axis]) -> list[Axis]:
    """``axes`` with the head axis first and every value typed as the option it sets (a
    training option, or an option of at least one of the searched heads)."""
    head_axis = [axis for axis in axes if axis.name == "head"]
    heads = list(head_axis[0].values) if head_axis else [base.head]
    if head_axis and head_axis[0].is_range:
        raise AvrError("--grid: head takes a list of heads (head=xpool,tefal), not a range")
    for head in heads:
        head_class(head)
    checked = head_axis[:]
    for axis in axes:
        if axis.name == "head":
            continue
        config_class = _option_class(axis.name, heads)
        bounds = (axis.low, axis.high) if axis.is_range else axis.values
        typed = [typed_fields(config_class, {axis.name: v}, "--grid")[axis.name] for v in bounds]
        if axis.is_range:
            if any(isinstance(v, (bool, str)) for v in typed):
                raise AvrError(f"--grid: {axis.text()}: a range needs a numeric option")
            checked.append(dataclasses.replace(axis, low=typed[0], high=typed[1]))
        else:
            checked.append(dataclasses.replace(axis, values=tuple(typed)))
    return checked


def _option_class(name: str, heads: list[str]) -> type:
    if name in TRAIN_FIELDS - {"head", "head_options"}:
        return TrainConfig
    for head in heads:
        if name in _head_fields(head):
            return head_class(head).Config
    split_options({name: None}, heads[0])  # raises, naming the options there are
    raise AssertionError(name)


def _head_fields(head: str) -> set[str]:
    return {f.name for f in dataclasses.fields(head_class(head).Config)}


def trial_config(base: TrainConfig, options: dict[str, Any]) -> TrainConfig:
    """The checked TrainConfig of one trial: ``base`` with the trial's options. When the head is
    searched, options of other heads (fixed or searched) are left out of this head's config."""
    head = options.get("head", base.head)
    fields = _head_fields(head)
    fixed = {k: v for k, v in base.head_options.items() if head == base.head or k in fields}
    searched = {k: v for k, v in options.items()
                if k != "head" and (k in fields or k in TRAIN_FIELDS)}
    train_opts, head_opts = split_options(searched, head)
    config = dataclasses.replace(
        base, head=head, head_options={**fixed, **head_options(head, head_opts, "--grid")},
        **typed_fields(TrainConfig, train_opts, "--grid"))
    config.validate()
    return config


def check_plan(plan: SweepPlan) -> None:
    """Refuse, before any training, a sweep with a configuration that cannot train: every grid
    point, or for random and tpe every listed value and both ends of every range."""
    if plan.search not in SEARCHES:
        raise AvrError(f"--search {plan.search!r} is not one of {', '.join(SEARCHES)}")
    if plan.search != "grid" and not (plan.trials or 0) >= 1:
        raise AvrError(f"--search {plan.search} needs --trials N (N >= 1)")
    axes = plan.axes
    for options in grid_points(axes) if plan.search == "grid" else _probe_points(axes):
        trial_config(plan.base, options)


def _probe_points(axes: list[Axis]) -> list[dict[str, Any]]:
    """Configurations that together take every listed value and both ends of every range."""
    first = {a.name: a.low if a.is_range else a.values[0] for a in axes}
    points = [first]
    for axis in axes:
        for value in (axis.low, axis.high) if axis.is_range else axis.values:
            points.append({**first, axis.name: value})
    return points


def resolve_plan(name: str, stored: SweepPlan | None, *, grid: str | None, search: str | None,
                 trials: int | None, prune: bool, cache: str | None, flags: dict[str, Any],
                 opts: list[str]) -> SweepPlan:
    """The plan this worker trains: a new one from the options given (``flags`` None where not
    given), or the stored one with the options given laid over it (``open_study`` refuses a
    plan that differs from the stored one)."""
    from avr.fuse.config import train_config

    if stored is None:
        if grid is None:
            raise AvrError(f"there is no sweep named {name!r} yet: start it with --grid "
                           f"\"lr=1e-5:1e-3:log temperature=0.02:0.1\" (and --search, --trials)")
        base, _ = train_config(None, flags, opts)
        plan = SweepPlan(cache or "cache", grid, search or "grid", trials, prune, base)
    else:
        base, _ = train_config(None, flags, opts, start=stored.base)
        plan = SweepPlan(cache or stored.cache, grid or stored.grid, search or stored.search,
                         trials if trials is not None else stored.trials, prune or stored.prune,
                         base)
    check_plan(plan)
    return plan


def quiet_optuna() -> None:
    """Optuna's log lines and experimental-feature warnings stay out of avr's output; avr's
    own progress bar and table say what happens."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we beat without optimize


# ---- the study -------------------------------------------------------------------------------

def sweep_dir(name: str, sweeps_dir: Path = SWEEPS_DIR) -> Path:
    return sweeps_dir / name


def storage_url(name: str, storage: str | None, sweeps_dir: Path = SWEEPS_DIR) -> str:
    if storage:
        return storage
    return f"sqlite:///{(sweep_dir(name, sweeps_dir) / STUDY_FILE).resolve()}"


@contextlib.contextmanager
def opening(url: str):
    """Held while a worker reads, creates or joins the study at ``url``: two workers started
    together would otherwise both create the tables of a new SQLite file (one fails with "table
    studies already exists") or both store the plan. Also held while a worker takes its next
    trials (``run_worker``), so that two workers never take one grid point. The guard is a file
    lock beside a SQLite file; for a server database (PostgreSQL, MySQL) :func:`open_storage`
    instead opens again once when another worker made the tables meanwhile, and two workers on
    different machines asking at the same moment for the last free grid point can both get it
    (Optuna's grid sampler then repeats a point): the second takes the first one's result when
    it has finished (:func:`finished_twin`), else trains it again."""
    if not url.startswith("sqlite:///"):
        yield
        return
    path = Path(url.removeprefix("sqlite:///"))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".open-lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_storage(url: str) -> RDBStorage:
    """The Optuna database at ``url``, with heartbeats (a SQLite file and its folder are made)."""
    quiet_optuna()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # SQLite serialises writers; a worker waits for another's write rather than failing.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    retry = RetryHeartbeatStaleTrialCallback(max_retry=None)
    def connect():
        return RDBStorage(url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S,
                          grace_period=GRACE_S, heartbeat_stale_trial_callback=retry)

    try:
        try:
            return connect()
        except SQLAlchemyError as error:
            if "already exists" not in str(error):
                raise
            time.sleep(1.0)  # another worker was creating the tables: they are there now
            return connect()
    except (optuna.exceptions.StorageInternalError, SQLAlchemyError, ValueError,
            ImportError) as error:
        raise AvrError(f"--storage {url}: cannot open it as an Optuna database: {error}") from None


def stored_plan(name: str, url: str) -> SweepPlan | None:
    """The definition of the study ``name`` at ``url``, or None when there is no such study
    (a default SQLite file that does not exist is not made)."""
    if url.startswith("sqlite:///") and not Path(url.removeprefix("sqlite:///")).exists():
        return None
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError:
        return None
    data = study.user_attrs.get(PLAN_ATTR)
    if data is None:
        raise AvrError(f"study {name!r} in {url} was not made by avr sweep: choose another "
                       f"--name")
    return SweepPlan.from_json(data)


def open_study(name: str, plan: SweepPlan, storage):
    """Create the study ``name`` for ``plan``, or join it (it must hold the same plan)."""
    check_plan(plan)
    epochs = schedule_for_store(plan.cache, plan.base)[0].epochs  # unset: the store's schedule
    pruner = (optuna.pruners.HyperbandPruner(max_resource=epochs, **PRUNER_SETTINGS)
              if plan.prune else optuna.pruners.NopPruner())
    study = optuna.create_study(study_name=name, storage=storage, pruner=pruner,
                                direction="maximize", load_if_exists=True)
    study.sampler = make_sampler(plan, len(study.trials))
    stored = study.user_attrs.get(PLAN_ATTR)
    if stored is None:
        study.set_user_attr(PLAN_ATTR, plan.to_json())
    elif differences := plan_differences(SweepPlan.from_json(stored), plan):
        raise AvrError(f"sweep {name!r} exists with another definition ({differences}): join "
                       f"it with `avr sweep --name {name}` alone, or choose another --name")
    return study


def plan_differences(stored: SweepPlan, given: SweepPlan) -> str:
    """What ``given`` changes in ``stored``, or "". The device is each worker's own."""
    old, new = stored.to_json(), given.to_json()
    old.update(old.pop("base")), new.update(new.pop("base"))
    return "; ".join(f"{key}: {old.get(key)!r} there, {new.get(key)!r} here"
                     for key in sorted(set(old) | set(new))
                     if key != "device" and old.get(key) != new.get(key))


def make_sampler(plan: SweepPlan, trials_before: int):
    """The sampler of a worker that joins the study when it holds ``trials_before`` trials.
    Every worker's grid is in one order (the grid's seed shuffles it: a grid id names the same
    point everywhere); random and tpe draw from the seed plus ``trials_before``, so a worker
    joining a study does not repeat the draws of the one that started it."""
    seed = plan.base.seed
    if plan.search == "grid":
        space = {axis.name: list(axis.values) for axis in plan.axes}
        return GridSampler(space, seed=seed)
    if plan.search == "random":
        return optuna.samplers.RandomSampler(seed=seed + trials_before)
    # The constant liar counts running trials as bad ones: workers and --parallel asks spread.
    return optuna.samplers.TPESampler(seed=seed + trials_before, constant_liar=True)


class GridSampler(optuna.samplers.GridSampler):
    """Optuna's GridSampler, asked and told outside ``Study.optimize``: the worker loop, not the
    sampler, decides when the grid is done (``work_left``)."""

    def after_trial(self, study, trial, state, values) -> None:
        return None


# ---- one worker ------------------------------------------------------------------------------

@dataclass
class TrialRow:
    """One finished trial as trials.csv and the ranked table show it."""

    number: int
    state: str  # complete | pruned | failed
    epochs: int
    best_val_r1: float
    seconds: float
    options: dict[str, Any]
    best_epoch: int | None
    run_dir: str | None
    curve: list[float]  # val R@1 after each epoch
    repeats: int | None  # the finished trial whose options it drew, taking its result


def worker_identity() -> dict[str, Any]:
    import psutil

    return {"machine": machine_identity(), "pid": os.getpid(),
            "pid_started": psutil.Process().create_time()}


def release_dead_trials(study, storage) -> None:
    """Fail the RUNNING trials whose worker is gone and queue a copy of each: a dead process of
    this machine at once, another machine's after ``GRACE_S`` without a heartbeat."""
    here = machine_identity()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker")
        if not worker or worker["machine"] != here or _process_runs(worker["pid"],
                                                                      worker["pid_started"]):
            continue
        try:
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker released it first
        retry = RetryHeartbeatStaleTrialCallback(max_retry=None)
        retry(study, storage.get_trial(trial._trial_id))
    optuna.storages.fail_stale_trials(study)


def counted_trials(study) -> list:
    """The study's trials less those that a retry replaced (a killed worker's)."""
    trials = study.get_trials(deepcopy=False)
    replaced = {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}
    return [t for t in trials if t.number not in replaced]


def work_left(study, plan: SweepPlan) -> bool:
    """Whether this worker should ask for another trial: a queued retry, a grid point that no
    trial has finished or is training, or fewer than ``trials`` finished and running."""
    trials = counted_trials(study)
    if any(t.state == TrialState.WAITING for t in trials):
        return True
    taken = [t for t in trials if t.state.is_finished() or t.state == TrialState.RUNNING]
    if plan.search == "grid":
        return bool(set(range(plan.size())) - {t.system_attrs.get("grid_id") for t in taken})
    return len(taken) < plan.size()


def suggest(trial, plan: SweepPlan) -> dict[str, Any]:
    """The trial's options. random and tpe draw only the options of the trial's head (a
    conditional space); a grid point sets every axis, and the trial ignores other heads'."""
    options: dict[str, Any] = {}
    head = plan.base.head
    for axis in plan.axes:
        if plan.search != "grid" and axis.name not in TRAIN_FIELDS and axis.name != "head" \
                and axis.name not in _head_fields(head):
            continue
        options[axis.name] = _suggest_axis(trial, axis)
        if axis.name == "head":
            head = options["head"]
    return options


def _suggest_axis(trial, axis: Axis) -> Any:
    if not axis.is_range:
        return trial.suggest_categorical(axis.name, list(axis.values))
    if all(isinstance(v, int) for v in (axis.low, axis.high, axis.step or 1)):
        return trial.suggest_int(axis.name, axis.low, axis.high, step=axis.step or 1, log=axis.log)
    return trial.suggest_float(axis.name, axis.low, axis.high, step=axis.step, log=axis.log)


class Heartbeat:
    """Records, every ``HEARTBEAT_S``, that this process still trains its running trials."""

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
        while not self._stop.wait(HEARTBEAT_S):
            for trial_id in list(self.trial_ids):
                self.storage.record_heartbeat(trial_id)


class ReportWriter:
    """Writes trials' per-epoch reports to the study on a thread of its own, in order, while
    training goes on: each report is a database transaction (3 ms on a quiet SQLite file, 50 ms
    on a busy machine), and 16 stacked trials of 100 epochs make 1,600 of them. ``wait`` before
    anything that reads a trial's reports (the pruner) or ends the trial; a failed write is
    raised there."""

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
    """What the command line shows while a worker trains."""

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
                        and axis.name in _head_fields(head) for v in axis.values]
            base = self.plan.base.head_options if head == self.plan.base.head else {}
            self.loaded[head] = load_cache(self.plan.cache, head, self.device, head_options=[
                {**base, **variant} for variant in variants or [{}]], config=self.plan.base)
        return self.loaded[head]


def run_worker(study, storage, plan: SweepPlan, out_dir: Path,
               callbacks: SweepCallbacks = SweepCallbacks(), parallel: int = 1) -> None:
    """Train trials of the study until none is left to start, ``parallel`` at a time (stacked
    where their options allow, :mod:`avr.fuse.stacked`); write trials.csv after each round."""
    from avr.device import resolve_device

    caches = CacheByHead(plan, resolve_device(plan.base.device))
    worker = worker_identity()
    with Heartbeat(storage) as heartbeat, ReportWriter() as reports:
        while True:
            release_dead_trials(study, storage)
            asked = []
            # One worker at a time looks for work and takes it: two workers asking at once
            # could both see the last grid point free, and Optuna's grid sampler hands the second
            # a point already taken. Held for a SQLite file (the workers of one machine); for a
            # server database see ``opening``.
            with opening(storage.url):
                while len(asked) < parallel and work_left(study, plan):
                    asked.append(study.ask())
                    heartbeat.add(asked[-1]._trial_id)
            if not asked:
                break
            try:
                started = [_start(trial, study, plan, out_dir, worker, callbacks)
                           for trial in asked]
                _run_trials([running for running in started if running is not None], study,
                            plan, caches, callbacks, reports)
            finally:
                heartbeat.trial_ids.difference_update(trial._trial_id for trial in asked)
            write_trials_csv(study, out_dir)


@dataclass
class _Running:
    """A trial this worker trains: its Optuna trial, config and run directory."""

    trial: Any
    config: TrainConfig
    run_dir: Path
    pruned: bool = False


def _start(trial, study, plan: SweepPlan, out_dir: Path, worker: dict[str, Any],
           callbacks: SweepCallbacks) -> _Running | None:
    """The trial to train, or None when it draws the options of a finished trial: it then
    takes that trial's result (:func:`repeat_finished`)."""
    options = suggest(trial, plan)
    trial.set_user_attr("worker", worker)
    if (earlier := finished_twin(study, trial)) is not None:
        callbacks.on_trial_start(trial.number, options)
        repeat_finished(study, trial, earlier, callbacks)
        return None
    run_dir = out_dir / f"trial-{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    callbacks.on_trial_start(trial.number, options)
    config, _ = schedule_for_store(plan.cache, trial_config(plan.base, options))
    return _Running(trial, config, run_dir)


def finished_twin(study, trial):
    """The first complete or pruned trial of ``study`` with ``trial``'s options, or None.
    Random and TPE draw list values again (over 24 combinations of lists, TPE's 24 draws
    hold about 16 distinct ones), and every trial of a sweep starts from the same seed (or
    from the one it draws), so training the same options again repeats a run."""
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return next((t for t in study.get_trials(deepcopy=False, states=states)
                 if t.params == trial.params), None)


def repeat_finished(study, trial, earlier, callbacks: SweepCallbacks) -> None:
    """Tell the study that ``trial`` ended as ``earlier`` did, without training it: the same
    val R@1 after each epoch and the same state and value; its row says 0 epochs trained."""
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
              reports: ReportWriter):
    """The trial's ``on_epoch``: report val R@1 to the study; True when the pruner stops it.
    The pruner reads the report at once; otherwise it is written in the background."""
    def on_epoch(epoch: int, log: EpochLog) -> bool:
        callbacks.on_epoch(running.trial.number, log)
        # A trial pruned after its last epoch has trained in full: it completes.
        if plan.prune and log.epoch < running.config.epochs:
            reports.wait()
            running.trial.report(log.val_r1, log.epoch)
            running.pruned = running.trial.should_prune()
        else:
            reports.report(running.trial, log.val_r1, log.epoch)
        return running.pruned

    return on_epoch


def _run_trials(trials: list[_Running], study, plan: SweepPlan, caches: CacheByHead,
                callbacks: SweepCallbacks, reports: ReportWriter) -> None:
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
                                 on_epoch=_reporter(only, plan, callbacks, reports))]
            else:
                reporters = [_reporter(running, plan, callbacks, reports) for running in members]
                results = stacked.train_stacked(
                    plan.cache, [r.config for r in members], [r.run_dir for r in members],
                    cache, on_epoch=lambda k, log: reporters[k](log.epoch, log))
        except AvrError as error:
            reports.wait()
            for running in members:
                _tell(study, running, None, time.perf_counter() - started, callbacks,
                      error=str(error))
            continue
        reports.wait()
        for running, result in zip(members, results):
            _tell(study, running, result, time.perf_counter() - started, callbacks)


def _tell(study, running: _Running, result: TrainResult | None, seconds: float,
          callbacks: SweepCallbacks, error: str | None = None) -> None:
    """Record a trial's end in the study: failed (``error``), pruned or complete."""
    trial = running.trial
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
    not ``study.trials`` (every trial of the study with its reports: 0.1 s at 16 trials of 100
    epochs, and growing with the study)."""
    return trial.storage.get_trial(trial._trial_id)


# ---- results ---------------------------------------------------------------------------------

def trial_row(trial) -> TrialRow:
    curve = [trial.intermediate_values[step] for step in sorted(trial.intermediate_values)]
    seconds = trial.user_attrs.get("seconds")
    if seconds is None and trial.datetime_start and trial.datetime_complete:
        seconds = (trial.datetime_complete - trial.datetime_start).total_seconds()
    best = max(curve) if curve else (trial.value if trial.value is not None else math.nan)
    return TrialRow(trial.number, STATE_NAMES[trial.state.name],
                    trial.user_attrs.get("epochs", len(curve)), best,
                    seconds if seconds is not None else math.nan, dict(trial.params),
                    trial.user_attrs.get("best_epoch"), trial.user_attrs.get("run_dir"), curve,
                    trial.user_attrs.get("repeats"))


def finished_rows(study) -> list[TrialRow]:
    """Every finished trial (complete, pruned, failed), best val R@1 first."""
    rows = [trial_row(t) for t in study.get_trials(deepcopy=False) if t.state.is_finished()]
    return sorted(rows, key=lambda r: (-(r.best_val_r1 if not math.isnan(r.best_val_r1)
                                         else -math.inf), r.number))


def write_trials_csv(study, out_dir: Path) -> Path:
    """``trials.csv``: trial, state, epochs, best_val_r1, seconds, then one column per searched
    option (empty where a trial's head has no such option), in trial order."""
    axes = SweepPlan.from_json(study.user_attrs[PLAN_ATTR]).axes
    rows = sorted(finished_rows(study), key=lambda r: r.number)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / TRIALS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*TRIALS_COLUMNS, *(axis.name for axis in axes)])
        for row in rows:
            writer.writerow([row.number, row.state, row.epochs, f"{row.best_val_r1:.4f}",
                             f"{row.seconds:.3f}", *(row.options.get(a.name, "") for a in axes)])
    tmp.replace(path)  # several workers may write it; a reader never sees half a file
    return path


def write_plots(study, out_dir: Path) -> list[Path]:
    """``val_r1.png`` (val R@1 per epoch of every trial; a pruned one ends in a cross) and
    ``importances.png`` (Optuna's parameter importances, PED-ANOVA: it needs no scikit-learn),
    the latter once two trials have completed with different options."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = sorted(finished_rows(study), key=lambda r: r.number)
    figure, axes = plt.subplots(figsize=(8, 5))
    for row in rows:
        if row.repeats is not None:
            continue  # its curve is the repeated trial's line
        epochs = range(1, len(row.curve) + 1)
        style = {"pruned": dict(ls="--", alpha=0.6), "failed": dict(ls=":", alpha=0.4)}
        line, = axes.plot(epochs, row.curve, lw=1.2, **style.get(row.state, {}))
        if row.state == "pruned" and row.curve:
            axes.plot(len(row.curve), row.curve[-1], "x", color=line.get_color(), ms=8)
    axes.set(xlabel="epoch", ylabel="val t2v R@1 (%)", title=f"{study.study_name}: "
             f"{len(rows)} trials (x: pruned)")
    axes.grid(alpha=0.3)
    paths = [out_dir / CURVES_PLOT]
    figure.savefig(paths[0], dpi=120, bbox_inches="tight")
    plt.close(figure)
    complete = [r for r in rows if r.state == "complete"]
    if len({json.dumps(r.options, sort_keys=True) for r in complete}) >= 2:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
            plot = optuna.visualization.matplotlib.plot_param_importances(
                study, evaluator=optuna.importance.PedAnovaImportanceEvaluator())
        paths.append(out_dir / IMPORTANCES_PLOT)
        plot.figure.savefig(paths[1], dpi=120, bbox_inches="tight")
        plt.close(plot.figure)
    return paths


def drop_weights_of_others(study) -> None:
    """Delete the weights of every finished trial but the best (logs and configs stay)."""
    rows = [r for r in finished_rows(study) if r.run_dir]
    best = next((r for r in rows if r.state == "complete"), None)
    for row in rows:
        if row is not best:
            for path in Path(row.run_dir).glob("*.safetensors"):
                path.unlink(missing_ok=True)
