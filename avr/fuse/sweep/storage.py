"""Where a sweep's study lives: its Optuna database (SQLite under ``runs/sweeps/<name>/`` unless
``--storage URL``), opened with heartbeats, created or joined with the sweep's plan.

- ``opening`` is held while a worker reads, creates or joins the study and while it takes its
  next trials, so that two workers never create one study twice nor take one grid point.
- A joined study must hold the same plan; ``open_study`` names what differs otherwise.
- Optuna is imported on first use (``optuna_module``): ``import avr.fuse.sweep`` works on an
  install without the ``[sweep]`` extra, and ``avr sweep`` names the extra to install.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import time
import warnings
from pathlib import Path

from avr.errors import AvrError
from avr.extras import require
from avr.fuse import checkpoint
from avr.fuse.sweep.plan import SweepPlan, check_plan, plan_differences

SWEEPS_DIR = checkpoint.DEFAULT_RUNS_DIR / "sweeps"
STUDY_FILE = "study.db"
PLAN_ATTR = "avr_sweep"  # the study's user attribute holding the sweep's definition
HEARTBEAT_S = 20  # a running trial's heartbeat in the study
GRACE_S = 120  # a trial of another machine without a heartbeat this long is taken as dead
# Hyperband over epochs: brackets of successive halving from 1 epoch up to all of them, keeping
# the best third at each rung (Li et al. 2018's eta = 3, Optuna's default); BENCHMARKS.md
# (*Sweeps*) has the replays behind this choice.
PRUNER_SETTINGS = dict(min_resource=1, reduction_factor=3)


def optuna_module():
    """Optuna, or one line naming the extra that installs it."""
    return require("optuna", "avr sweep")


def quiet_optuna() -> None:
    """Optuna's log lines and experimental-feature warnings stay out of avr's output; avr's
    own progress bar and table say what happens."""
    optuna = optuna_module()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we beat without optimize


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


def open_storage(url: str):
    """The Optuna database at ``url``, with heartbeats (a SQLite file and its folder are made)."""
    optuna = optuna_module()
    from sqlalchemy.exc import SQLAlchemyError

    quiet_optuna()
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    # SQLite serialises writers; a worker waits for another's write rather than failing.
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)

    def connect():
        return optuna.storages.RDBStorage(
            url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
            heartbeat_stale_trial_callback=retry)

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
    optuna = optuna_module()
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
    from avr.fuse.trainer import schedule_for_store

    optuna = optuna_module()
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


def make_sampler(plan: SweepPlan, trials_before: int):
    """The sampler of a worker that joins the study when it holds ``trials_before`` trials.
    Every worker's grid is in one order (the grid's seed shuffles it: a grid id names the same
    point everywhere); random and tpe draw from the seed plus ``trials_before``, so a worker
    joining a study does not repeat the draws of the one that started it."""
    optuna = optuna_module()
    seed = plan.base.seed
    if plan.search == "grid":
        space = {axis.name: list(axis.values) for axis in plan.axes}
        return _grid_sampler_class()(space, seed=seed)
    if plan.search == "random":
        return optuna.samplers.RandomSampler(seed=seed + trials_before)
    # The constant liar counts running trials as bad ones: workers and --parallel asks spread.
    return optuna.samplers.TPESampler(seed=seed + trials_before, constant_liar=True)


@functools.cache
def _grid_sampler_class() -> type:
    """Optuna's GridSampler, asked and told outside ``Study.optimize``: the worker loop, not the
    sampler, decides when the grid is done (``work_left``)."""
    optuna = optuna_module()

    class GridSampler(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            return None

    return GridSampler
