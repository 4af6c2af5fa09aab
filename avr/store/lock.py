"""One writer per store: the lock file ``avr.lock`` at the store's root.

A writer (`avr extract`, its dask parent, `avr cache verify --repair`) holds the lock for its
whole run and releases it at the end. The lock file records who holds it: a random token, the
pid, the host name, this machine's identity (boot id and pid namespace, where the OS has them),
the process's start time, the command line, when the lock was taken and the last heartbeat.

Taking the lock
    The file is created exclusively: it fails when the file exists, so of two runs started
    together exactly one gets it. The other reads the record and, when the holder is alive,
    refuses at once with who holds it and how to proceed (``StoreLockedError``).

Alive or stale
    On the same machine (same host name, boot id and pid namespace), the holder is alive while
    its pid runs the same process (same start time): a killed run's lock is stale at once.
    On another machine, the holder is alive while its heartbeat is younger than ``LEASE_S``: a
    thread of the holder rewrites the heartbeat every ``HEARTBEAT_S``, so a lock left by a
    machine that died expires one lease after its last heartbeat (this assumes the machines'
    clocks agree to well within the lease, as NTP keeps them). ``break_lock``
    (`avr cache break-lock`) removes the lock of a holder that is known to be gone.

Taking over a stale lock
    The taker first creates ``avr.lock.<stale token>.takeover`` exclusively, so of several runs
    that found the same stale lock one proceeds; it checks that the lock still holds the stale
    token and only then replaces it with its own record. Every heartbeat also re-reads the
    record: a holder whose record was replaced (or that could not refresh it for a lease) has
    lost the lock, and its next write stops with ``LockLostError``.

What each kind of store guarantees
    Local paths and ``file://`` URLs: the record is written to a temporary file and linked into
    place (atomic, exclusive; on NFS too). ``memory://``: exclusive within the one process that
    can see the store. Object stores (``s3://``, ``gs://``, ``az://``): exclusive where fsspec's
    backend implements exclusive create (mode ``"xb"``: s3fs from 2025.7 with S3 conditional
    writes, gcsfs and adlfs from 2024.12); on a backend without it, two runs started within the
    same moment can both write the record, and the one whose record was overwritten sees it on
    its first read-back or heartbeat and stops.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from avr.errors import AvrError, LockLostError, StoreLockedError
from avr.store import schema
from avr.store.location import store_filesystem, store_location

HEARTBEAT_S = 15.0  # the holder rewrites its heartbeat this often
LEASE_S = 90.0  # a holder on another machine is gone once its heartbeat is this old
TAKEOVER_TIMEOUT_S = 30.0  # a takeover claim older than this was left by a killed taker
UNREADABLE_GRACE_S = 10.0  # a record still unreadable after this was not being written


@dataclass(frozen=True)
class LockRecord:
    token: str
    pid: int
    pid_started: float  # the process's start time: a reused pid is another process
    host: str
    machine: str  # host name, boot id and pid namespace: where ``pid`` means this process
    command: str
    since: float  # epoch seconds
    heartbeat: float  # epoch seconds

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def decode(cls, data: bytes) -> LockRecord | None:
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(self.since))
        return (f"pid {self.pid} on host {self.host} (since {since}, last heartbeat "
                f"{_age(time.time() - self.heartbeat)} ago; command: {self.command})")

    def is_alive(self, *, lease_s: float = LEASE_S) -> bool:
        if self.machine == machine_identity():
            return _process_runs(self.pid, self.pid_started)
        return time.time() - self.heartbeat < lease_s


def _age(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def machine_identity() -> str:
    """What makes a pid meaningful: the host name, plus on Linux the boot id (a reboot reuses
    pids) and the pid namespace (containers on one host see different pids)."""
    parts = [socket.gethostname()]
    for source in ("/proc/sys/kernel/random/boot_id", "/proc/self/ns/pid"):
        try:
            parts.append(os.readlink(source) if source.endswith("/pid")
                         else Path(source).read_text().strip())
        except OSError:
            pass
    return " ".join(parts)


def _process_runs(pid: int, started: float) -> bool:
    import psutil

    try:
        return abs(psutil.Process(pid).create_time() - started) < 1.0
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def _own_record() -> LockRecord:
    import psutil

    now = time.time()
    return LockRecord(token=uuid.uuid4().hex, pid=os.getpid(),
                      pid_started=psutil.Process().create_time(), host=socket.gethostname(),
                      machine=machine_identity(), command=" ".join(_command_line()), since=now,
                      heartbeat=now)


def _command_line() -> list[str]:
    argv = list(sys.argv)
    if argv and argv[0].endswith(("__main__.py", "/avr")):
        argv[0] = "avr"
    return argv


# ---- the lock file on any filesystem ---------------------------------------------------------

class _LockFiles:
    """Reads, creates and replaces the lock's small files on the store's filesystem."""

    def __init__(self, location: str | Path):
        from fsspec.implementations.local import LocalFileSystem

        self.location = store_location(location)
        self.fs, self.root = store_filesystem(self.location)
        self.local = isinstance(self.fs, LocalFileSystem)
        self.path = f"{self.root}/{schema.LOCK_FILE}"

    def read(self, path: str | None = None) -> LockRecord | None | bool:
        """The record at ``path`` (default: the lock); None when absent; False when unreadable."""
        try:
            data = self.fs.cat_file(path or self.path)
        except FileNotFoundError:
            return None
        return LockRecord.decode(data) or False

    def create(self, record: LockRecord, path: str | None = None) -> bool:
        """Create ``path`` holding ``record`` only if it does not exist; True when created."""
        path = path or self.path
        data = record.encode()
        if self.local:
            # A record linked into place is never seen half-written, even after a kill.
            tmp = f"{path}.{record.token}.tmp"
            Path(tmp).write_bytes(data)
            try:
                os.link(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                Path(tmp).unlink(missing_ok=True)
        try:
            with self.fs.open(path, "xb") as handle:
                handle.write(data)
        except FileExistsError:
            return False
        written = self.read(path)  # a backend without exclusive create: the last writer wins
        return isinstance(written, LockRecord) and written.token == record.token

    def replace(self, record: LockRecord) -> None:
        data = record.encode()
        if self.local:
            tmp = Path(f"{self.path}.{record.token}.tmp")
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        else:
            self.fs.pipe_file(self.path, data)

    def age(self) -> float:
        """Seconds since the lock file was last written (infinite when the backend cannot
        tell)."""
        try:
            modified = self.fs.modified(self.path)
        except (NotImplementedError, OSError):
            return float("inf")
        return time.time() - modified.timestamp()

    def remove(self, path: str | None = None) -> None:
        try:
            self.fs.rm_file(path or self.path)
        except FileNotFoundError:
            pass

    def claim_path(self, stale: LockRecord | bool) -> str:
        token = stale.token if isinstance(stale, LockRecord) else "unreadable"
        return f"{self.path}.{token}.takeover"


# ---- holding the lock ------------------------------------------------------------------------

class StoreLock:
    """The writer's lock on one store (or on any folder avr writes as a whole: ``what`` names
    it in messages, e.g. a run folder), held from ``acquire`` to ``release`` (or a ``with``
    block). ``check()`` raises LockLostError once the lock is no longer this process's."""

    def __init__(self, location: str | Path, *, heartbeat_s: float = HEARTBEAT_S,
                 lease_s: float = LEASE_S, what: str = "store"):
        self.files = _LockFiles(location)
        self.what = what
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self.record: LockRecord | None = None
        self.took_over: LockRecord | None = None  # the stale holder this lock replaced
        self._made_root = False
        self._lost: str | None = None
        self._stop = threading.Event()
        self._beat_thread: threading.Thread | None = None

    @property
    def location(self) -> str | Path:
        return self.files.location

    @property
    def token(self) -> str:
        assert self.record is not None, "the lock is not held"
        return self.record.token

    def __enter__(self) -> StoreLock:
        if self.record is None:
            self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> StoreLock:
        files = self.files
        if files.local and not Path(files.root).exists():
            try:
                Path(files.root).mkdir(parents=True)
                self._made_root = True
            except FileExistsError:  # another run made it just now
                pass
        record = _own_record()
        while True:
            try:
                created = files.create(record)
            except OSError as error:  # a read-only or unreachable store
                self._remove_made_root()
                raise AvrError(f"{self.location}: cannot create the {self.what}'s lock file "
                               f"{schema.LOCK_FILE} ({error})") from None
            if created:
                break
            holder = files.read()
            if holder is None:  # released between our attempt and the read
                continue
            if holder is False and files.age() < UNREADABLE_GRACE_S:  # being written
                time.sleep(0.1)
                continue
            if isinstance(holder, LockRecord) and holder.is_alive(lease_s=self.lease_s):
                self._remove_made_root()
                raise StoreLockedError(
                    f"{self.location} is locked by another avr process: {holder.describe()}. "
                    f"Wait for it to finish or stop it; a lock left by a process that is gone "
                    f"is taken over by the next run (on another machine "
                    f"{self.lease_s:.0f} s after its last heartbeat), or remove it now with "
                    f"`avr cache break-lock {self.location}`")
            if self._take_over(holder, record):
                self.took_over = holder if isinstance(holder, LockRecord) else None
                break
        self.record = record
        self._start_heartbeat()
        return self

    def _take_over(self, stale: LockRecord | bool, record: LockRecord) -> bool:
        """Replace the stale lock with ``record``; False when another run is taking it over
        or the lock changed meanwhile (the caller then looks again)."""
        files = self.files
        claim = files.claim_path(stale)
        if not files.create(record, claim):
            claimant = files.read(claim)
            if not isinstance(claimant, LockRecord) or (
                    time.time() - claimant.since > TAKEOVER_TIMEOUT_S
                    or not claimant.is_alive(lease_s=self.lease_s)):
                files.remove(claim)  # left by a taker that was killed midway
            else:
                time.sleep(0.2)
            return False
        try:
            current = files.read()
            unchanged = (current == stale if isinstance(stale, LockRecord)
                         else current is False)
            if not unchanged:
                return False
            files.replace(record)
            return True
        finally:
            files.remove(claim)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._beat_thread = threading.Thread(target=self._beat, name="avr-lock-heartbeat",
                                             daemon=True)
        self._beat_thread.start()

    def _beat(self) -> None:
        last_refresh = time.time()
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self.files.read()
                if not isinstance(current, LockRecord) or current.token != self.token:
                    self._lost = (f"taken by {current.describe()}"
                                  if isinstance(current, LockRecord) else "removed")
                    return
                self.record = LockRecord(**{**asdict(self.record), "heartbeat": time.time()})
                self.files.replace(self.record)
                last_refresh = time.time()
            except OSError as error:  # the store is unreachable for a while
                if time.time() - last_refresh > self.lease_s:
                    self._lost = f"not refreshed for {self.lease_s:.0f} s ({error})"
                    return

    def check(self) -> None:
        """Raise LockLostError when the lock is no longer this process's (seen by the
        heartbeat): called before every write."""
        if self._lost is not None:
            raise LockLostError(f"{self.location}: this run lost the {self.what}'s lock "
                                f"({self._lost}) and stopped before writing more; what it "
                                f"finished is kept. Run it again once the other writer is done")

    def release(self) -> None:
        if self.record is None:
            return
        self._stop.set()
        if self._beat_thread is not None:
            self._beat_thread.join()
        current = self.files.read()
        if isinstance(current, LockRecord) and current.token == self.record.token:
            self.files.remove()
        self.record = None
        self._remove_made_root()

    def _remove_made_root(self) -> None:
        """Leave no empty directory behind a run that created it only to hold the lock."""
        if self._made_root:
            try:
                Path(self.files.root).rmdir()
            except OSError:  # the store was written, or another run's lock is there now
                pass
            self._made_root = False


@dataclass(frozen=True)
class WriterToken:
    """A process writing under another process's lock (a dask worker under its parent's):
    ``check()`` reads the lock and fails when it no longer carries ``token``."""

    location: str
    token: str

    def check(self) -> None:
        current = _LockFiles(self.location).read()
        if not isinstance(current, LockRecord) or current.token != self.token:
            holder = current.describe() if isinstance(current, LockRecord) else "nobody"
            raise LockLostError(f"{self.location}: the extract this task belongs to no longer "
                                f"holds the store's lock (now: {holder}); the task writes "
                                f"nothing")


def lock_holder(location: str | Path) -> LockRecord | None:
    """The live holder of the store's lock, if any."""
    holder = _LockFiles(location).read()
    return holder if isinstance(holder, LockRecord) and holder.is_alive() else None


def break_lock(location: str | Path) -> LockRecord | None:
    """Remove the store's lock (and any takeover claims) and return the record it held.
    Refuses when the holder is a process still running on this machine."""
    files = _LockFiles(location)
    holder = files.read()
    if holder is None:
        return None
    if (isinstance(holder, LockRecord) and holder.machine == machine_identity()
            and holder.is_alive()):
        raise StoreLockedError(f"{files.location}: {holder.describe()} is still running on this "
                               f"machine; stop it instead of breaking its lock")
    files.remove()
    for path in files.fs.glob(f"{files.path}.*.takeover"):
        files.remove(path)
    return holder if isinstance(holder, LockRecord) else None
