"""Where a sweep's study lives: its Optuna database (SQLite under ``runs/sweeps/<name>/`` unless
``--storage URL``: a PostgreSQL or MySQL server for workers on several machines), opened with
heartbeats, created or joined with the sweep's plan, and the lock that keeps its workers apart.

- ``StudyLock`` is held while a worker reads, creates or joins the study, while it takes its
  next trials and while the pruner decides on a trial: two workers never create one study
  twice, never take one grid point, and each pruning decision sees every report made before
  it. A file lock beside a SQLite file; a PostgreSQL advisory lock on a server, so it holds
  across machines and frees itself when its holder's connection ends. It gives up after
  ``timeout_s`` with one line naming the holder.
- A server that goes away is waited for, up to ``timeout_s`` on each connection, then the
  worker stops with one line; the finished trials are in the database, and the same command
  started again resumes the sweep.
- Every way a URL can fail to open (no file named, an in-memory database, a folder, a damaged
  file, a missing driver) is one line naming the URL.
- Optuna is imported on first use (``optuna_module``): ``import avr.fuse.sweep`` works on an
  install without the ``[sweep]`` extra, and ``avr sweep`` names the extra to install.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path

from avr.errors import AvrError, StudyLockedError, StudyStorageError
from avr.extras import require
from avr.fuse.sweep.plan import (GRACE_HEARTBEATS, HEARTBEAT_S, METRIC, SweepPlan, check_plan,
                                 plan_differences)
from avr.fuse.sweep.runs import SWEEPS_DIR

STUDY_FILE = "study.db"
PLAN_ATTR = "avr_sweep"  # the study's user attribute holding the sweep's definition
# A study made by this version records a grid's numbers as numeric distributions (plan.suggest);
# one made before keeps its categorical ones (Optuna refuses two kinds for one parameter).
NUMERIC_GRID_ATTR = "avr_numeric_grid"
STUDY_TIMEOUT_S = 120.0  # how long a worker waits for the study's lock, or for its server
CONNECT_TIMEOUT_S = 10  # one attempt to reach a database server
# Hyperband over epochs: brackets of successive halving from 1 epoch up to all of them, keeping
# the best third at each rung (Li et al. 2018's eta = 3, Optuna's default); BENCHMARKS.md
# (*Sweeps*) has the replays behind this choice.
PRUNER_SETTINGS = dict(min_resource=1, reduction_factor=3)
SQLITE = "sqlite:///"
DAMAGED_MARKS = ("database disk image is malformed", "file is not a database")


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
    """The study's database: ``storage`` as given, or the SQLite file under the sweep's
    folder."""
    return storage or f"{SQLITE}{(sweep_dir(name, sweeps_dir) / STUDY_FILE).resolve()}"


def database_url(url: str) -> str:
    """``url`` as SQLAlchemy opens it: ``postgresql://`` means psycopg 3, the driver of the
    ``[postgres]`` extra (SQLAlchemy's own default is psycopg2)."""
    scheme, _, rest = url.partition("://")
    return f"postgresql+psycopg://{rest}" if scheme in ("postgresql", "postgres") else url


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for a server database); refuses a SQLite URL that names
    no file a worker can share."""
    if not url.startswith("sqlite"):
        return None
    path = url.removeprefix(SQLITE).split("?", 1)[0] if url.startswith(SQLITE) else ""
    if path in ("", ":memory:"):
        raise StudyStorageError(f"--storage {url}: names no database file (an in-memory SQLite "
                                f"database is lost when its process ends); give one: "
                                f"sqlite:///path/to/study.db")
    if Path(path).is_dir():
        raise StudyStorageError(f"--storage {url}: {path} is a folder; name a file in it: "
                                f"sqlite:///{Path(path) / STUDY_FILE}")
    return Path(path)


def _is_postgres(url: str) -> bool:
    return url.startswith(("postgresql", "postgres:"))


def error_text(error: BaseException) -> str:
    """The cause of a database error in one line: the driver's message, without SQLAlchemy's
    "Background on this error" link or Optuna's generic wrapper."""
    while error.__cause__ is not None and "optuna" in type(error).__module__:
        error = error.__cause__
    text = str(getattr(error, "orig", None) or error)
    return " ".join(line.strip() for line in text.splitlines()
                    if line.strip() and not line.lstrip().startswith("(Background on this"))


def storage_errors() -> tuple[type[BaseException], ...]:
    """What a call to the study's database raises when the database fails."""
    from sqlalchemy.exc import SQLAlchemyError

    return optuna_module().exceptions.StorageInternalError, SQLAlchemyError


# ---- reaching a database server --------------------------------------------------------------

def _unreachable(error: BaseException) -> bool:
    """Whether a driver's connection error says the server is not there (yet): refused, timed
    out, shutting down or starting up, as opposed to a wrong password or database name."""
    state = getattr(error, "sqlstate", None)
    return state is None or state.startswith("08") or state in ("57P01", "57P02", "57P03")


def wait_for_server(engine, timeout_s: float) -> None:
    """Make every new connection of ``engine`` wait for a server that is not there, retrying
    with backoff for up to ``timeout_s``, so that a restart between two calls costs only the
    wait; pooled connections are checked before use (``pool_pre_ping``)."""
    from sqlalchemy import event

    @event.listens_for(engine, "do_connect")
    def connect(dialect, connection_record, cargs, cparams):
        cparams.setdefault("connect_timeout", CONNECT_TIMEOUT_S)
        deadline, delay = time.monotonic() + timeout_s, 0.2
        while True:
            try:
                return dialect.connect(*cargs, **cparams)
            except dialect.loaded_dbapi.OperationalError as error:
                if not _unreachable(error) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, 5.0)


def _server_engine(url: str, timeout_s: float, **options):
    """A SQLAlchemy engine for a database server that waits for it (``wait_for_server``)."""
    from sqlalchemy import create_engine

    if url.startswith("postgresql+psycopg://"):
        require("psycopg", f"--storage {url}")
    engine = create_engine(url, pool_pre_ping=True, **options)
    wait_for_server(engine, timeout_s)
    return engine


# ---- the study's lock ------------------------------------------------------------------------

def _holder_record() -> dict:
    import psutil

    from avr.store.lock import machine_identity

    argv = ["avr", *sys.argv[1:]] if sys.argv[0].endswith(("avr", "__main__.py")) else sys.argv
    return {"pid": os.getpid(), "host": socket.gethostname(), "machine": machine_identity(),
            "pid_started": psutil.Process().create_time(), "command": " ".join(argv),
            "since": time.time()}


def _describe_holder(record: dict | None) -> str:
    if not record:
        return "a process that left no record"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record["since"]))
    return (f"pid {record['pid']} on host {record['host']} since {since} (command: "
            f"{record['command']})")


class StudyLock:
    """One worker at a time opens the study ``name`` at ``url`` or takes trials from it (see
    the module's docstring); re-entered as often as the worker needs it."""

    def __init__(self, url: str, name: str, timeout_s: float = STUDY_TIMEOUT_S):
        self.url, self.name, self.timeout_s = url, name, timeout_s
        self._file_lock = self._engine = self._connection = None
        self._key = int.from_bytes(hashlib.sha256(f"avr sweep {name}".encode()).digest()[:8],
                                   "big", signed=True)

    def __enter__(self) -> StudyLock:
        if (path := sqlite_path(self.url)) is not None:
            self._lock_file(path)
        elif _is_postgres(self.url):
            self._lock_server()
        return self

    def __exit__(self, *exc) -> None:
        if self._file_lock is not None:
            self._file_lock.release()
        elif self._connection is not None:
            from sqlalchemy import text
            from sqlalchemy.exc import OperationalError

            try:
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"),
                                         {"key": self._key})
            except OperationalError:
                pass  # the server ended the session (a restart): its lock went with it
            finally:
                self._connection.close()
                self._connection = None

    def _lock_file(self, path: Path) -> None:
        from filelock import FileLock, Timeout

        path.parent.mkdir(parents=True, exist_ok=True)
        if self._file_lock is None:
            self._file_lock = FileLock(str(path.with_name(path.name + ".open-lock")))
        holder = path.with_name(path.name + ".open-lock.holder")
        try:
            self._file_lock.acquire(timeout=self.timeout_s)
        except Timeout:
            try:
                record = json.loads(holder.read_text())
            except (OSError, ValueError):
                record = None
            raise self._locked(_describe_holder(record)) from None
        scratch = holder.with_name(f"{holder.name}.{os.getpid()}")
        scratch.write_text(json.dumps(_holder_record()))
        scratch.replace(holder)

    def _lock_server(self) -> None:
        from sqlalchemy import text
        from sqlalchemy.exc import OperationalError

        if self._engine is None:
            who = f"avr sweep pid {os.getpid()} on {socket.gethostname()}"[:63]
            self._engine = _server_engine(database_url(self.url), self.timeout_s, pool_size=1,
                                          connect_args={"application_name": who})
        connection = self._engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        try:
            connection.exec_driver_sql(f"SET lock_timeout = {int(self.timeout_s * 1000)}")
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": self._key})
        except OperationalError as error:
            holder = self._server_holder(connection) if "lock timeout" in str(error) else None
            connection.close()
            if holder is None:
                raise
            raise self._locked(holder) from None
        self._connection = connection

    def _server_holder(self, connection) -> str:
        from sqlalchemy import text

        row = connection.execute(text(
            "SELECT a.application_name, a.client_addr::text, a.backend_start FROM pg_locks l "
            "JOIN pg_stat_activity a ON a.pid = l.pid WHERE l.locktype = 'advisory' AND "
            "l.granted AND l.classid::bigint = :high AND l.objid::bigint = :low"),
            {"high": (self._key >> 32) & 0xFFFFFFFF, "low": self._key & 0xFFFFFFFF}).first()
        if row is None:
            return "a connection that has since ended"
        name, address, since = row
        return (f"{name or 'a client without a name'} (from {address or 'a local socket'}, "
                f"connected since {since:%Y-%m-%d %H:%M:%S})")

    def _locked(self, holder: str) -> StudyLockedError:
        return StudyLockedError(
            f"sweep {self.name!r}: its study ({self.url}) has been locked for {self.timeout_s:g} "
            f"s by {holder}; wait for it, or stop that process, or give --study-timeout more "
            f"seconds")


# ---- opening the study -----------------------------------------------------------------------

def open_storage(url: str, timeout_s: float = STUDY_TIMEOUT_S, heartbeat_s: int = HEARTBEAT_S):
    """The Optuna database at ``url``, with a heartbeat every ``heartbeat_s`` (a SQLite file
    and its folder are made; a server is waited for up to ``timeout_s``)."""
    optuna = optuna_module()
    from sqlalchemy.exc import SQLAlchemyError

    quiet_optuna()
    if (path := sqlite_path(url)) is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite serialises writers; a worker waits for another's write rather than failing.
        engine = {"connect_args": {"timeout": timeout_s}}
    else:
        engine = {"pool_pre_ping": True}
        if database_url(url).startswith("postgresql+psycopg://"):
            require("psycopg", f"--storage {url}")
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=None)

    def connect():
        return optuna.storages.RDBStorage(
            database_url(url), engine_kwargs=engine, heartbeat_interval=heartbeat_s,
            grace_period=GRACE_HEARTBEATS * heartbeat_s, heartbeat_stale_trial_callback=retry)

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            storage = connect()
            break
        except SQLAlchemyError as error:
            if "already exists" in str(error):
                time.sleep(1.0)  # another worker was creating the tables: they are there now
                continue
            if (not _unreachable(getattr(error, "orig", error)) or path is not None
                    or time.monotonic() > deadline):
                raise _cannot_open(url, error) from None
            time.sleep(2.0)
        except (optuna.exceptions.StorageInternalError, ValueError, ImportError,
                RuntimeError) as error:
            raise _cannot_open(url, error) from None
    if path is None:
        wait_for_server(storage.engine, timeout_s)
    return storage


def _cannot_open(url: str, error: BaseException) -> StudyStorageError:
    return storage_failure(url, error, "cannot open it as an Optuna database: {cause}")


def storage_failure(url: str, error: BaseException, message: str) -> StudyStorageError:
    """The one line for a database that failed: ``message`` with the driver's ``{cause}``, or,
    for a damaged SQLite file, what to do about it."""
    cause = error_text(error)
    if any(mark in cause for mark in DAMAGED_MARKS):
        return StudyStorageError(f"--storage {url}: a damaged database, or not one ({cause}); "
                                 f"restore it from a copy, or start the sweep again under "
                                 f"another --name")
    return StudyStorageError(f"--storage {url}: " + message.format(cause=cause))


def stored_plan(name: str, url: str, timeout_s: float = STUDY_TIMEOUT_S) -> SweepPlan | None:
    """The definition of the study ``name`` at ``url``, or None when there is no such study
    (a default SQLite file that does not exist is not made)."""
    optuna = optuna_module()
    path = sqlite_path(url)
    if path is not None and not path.exists():
        return None
    storage = open_storage(url, timeout_s)
    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return None
    except storage_errors() as error:
        raise _cannot_open(url, error) from None
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
    if study.metric_names is None:
        study.set_metric_names([METRIC])
    if stored is None:
        study.set_user_attr(NUMERIC_GRID_ATTR, True)
        study.set_user_attr(PLAN_ATTR, plan.to_json())
    elif differences := plan_differences(SweepPlan.from_json(stored), plan):
        raise AvrError(f"sweep {name!r} exists with another definition ({differences}): join "
                       f"it with `avr sweep --name {name}` alone, or choose another --name")
    return study


def make_sampler(plan: SweepPlan, trials_before: int):
    """The sampler of the study's next trial when it holds ``trials_before`` trials. Every
    worker's grid is in one order (the grid's seed shuffles it: a grid id names the same point
    everywhere); random and tpe draw from the seed plus ``trials_before``, so that a trial's
    draw depends on the study alone, never on which worker asks for it."""
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
