"""One writer per store: the lock file, its refusal, stale locks (killed process, dead
machine), takeover races between real processes, heartbeats and lost locks."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import fsspec
import pytest

from avr.errors import LockLostError, StoreLockedError
from avr.store import lock as store_lock
from avr.store import schema
from avr.store.lock import LockRecord, StoreLock, break_lock


def lock_path(store: Path) -> Path:
    return store / schema.LOCK_FILE


def record_of(store: Path) -> LockRecord:
    return LockRecord.decode(lock_path(store).read_bytes())


def dead_pid() -> int:
    """The pid of a process that has exited."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def plant_lock(store: Path, **changes) -> LockRecord:
    """A lock file as another process would have left it."""
    store.mkdir(parents=True, exist_ok=True)
    record = replace(store_lock._own_record(), **changes)
    lock_path(store).write_bytes(record.encode())
    return record


def test_the_lock_records_who_holds_it_and_goes_away_on_release(tmp_path):
    store = tmp_path / "cache"
    with StoreLock(store) as lock:
        record = record_of(store)
        assert record.pid == os.getpid() and record.token == lock.token
        assert record.host and record.command
    assert not lock_path(store).exists()


def test_a_second_writer_is_refused_with_the_holder_and_the_way_out(tmp_path):
    store = tmp_path / "cache"
    with StoreLock(store):
        with pytest.raises(StoreLockedError) as refused:
            StoreLock(store).acquire()
    message = str(refused.value)
    assert f"pid {os.getpid()}" in message and "since" in message
    assert "avr cache break-lock" in message


def test_a_lock_left_by_a_killed_process_on_this_machine_is_taken_over(tmp_path):
    store = tmp_path / "cache"
    stale = plant_lock(store, pid=dead_pid())
    with StoreLock(store) as lock:
        assert lock.took_over == stale
        assert record_of(store).token == lock.token


def test_a_reused_pid_is_not_the_holder(tmp_path):
    store = tmp_path / "cache"
    stale = plant_lock(store, pid_started=store_lock._own_record().pid_started - 3600)
    with StoreLock(store) as lock:
        assert lock.took_over == stale


def test_another_machine_holds_the_lock_while_its_heartbeat_is_fresh(tmp_path):
    store = tmp_path / "cache"
    plant_lock(store, machine="elsewhere", host="node7", heartbeat=time.time() - 10)
    with pytest.raises(StoreLockedError, match="node7"):
        StoreLock(store, lease_s=60).acquire()


def test_a_lock_of_another_machine_expires_one_lease_after_its_last_heartbeat(tmp_path):
    store = tmp_path / "cache"
    stale = plant_lock(store, machine="elsewhere", heartbeat=time.time() - 120)
    with StoreLock(store, lease_s=60) as lock:
        assert lock.took_over == stale


def test_an_unreadable_lock_file_is_taken_over_once_it_is_old(tmp_path):
    store = tmp_path / "cache"
    store.mkdir()
    lock_path(store).write_bytes(b"{not json")
    old = time.time() - 60
    os.utime(lock_path(store), (old, old))
    with StoreLock(store) as lock:
        assert record_of(store).token == lock.token


def test_the_heartbeat_keeps_the_record_fresh(tmp_path):
    store = tmp_path / "cache"
    with StoreLock(store, heartbeat_s=0.05):
        first = record_of(store).heartbeat
        time.sleep(0.3)
        assert record_of(store).heartbeat > first


def test_a_holder_whose_lock_was_taken_stops_before_its_next_write(tmp_path):
    store = tmp_path / "cache"
    with StoreLock(store, heartbeat_s=0.05) as lock:
        lock.check()
        intruder = replace(record_of(store), token="other", pid=12345)
        lock_path(store).write_bytes(intruder.encode())
        time.sleep(0.3)
        with pytest.raises(LockLostError, match="lost the store's lock"):
            lock.check()
    assert record_of(store).token == "other"  # release leaves the new holder's lock alone


def test_break_lock_removes_a_lock_of_another_machine(tmp_path):
    store = tmp_path / "cache"
    planted = plant_lock(store, machine="elsewhere", heartbeat=time.time())
    assert break_lock(store) == planted
    assert not lock_path(store).exists()
    assert break_lock(store) is None


def test_break_lock_refuses_a_holder_running_on_this_machine(tmp_path):
    store = tmp_path / "cache"
    with StoreLock(store):
        with pytest.raises(StoreLockedError, match="still running"):
            break_lock(store)


def test_the_cli_breaks_a_lock(tmp_path):
    from support.store_checks import avr_env  # here: the racing processes import this module

    store = tmp_path / "cache"
    plant_lock(store, machine="elsewhere", host="node7", heartbeat=time.time())
    result = subprocess.run([sys.executable, "-m", "avr", "cache", "break-lock", str(store)],
                            capture_output=True, text=True, env=avr_env())
    assert result.returncode == 0, result.stderr
    assert "node7" in result.stdout and not lock_path(store).exists()


def test_a_run_that_fails_before_writing_leaves_no_directory(tmp_path):
    store = tmp_path / "cache"
    with pytest.raises(RuntimeError):
        with StoreLock(store):
            raise RuntimeError("the dataset is missing")
    assert not store.exists()


def test_a_store_at_a_memory_url_has_one_writer():
    url = "memory://avr-lock-test/cache"
    try:
        with StoreLock(url):
            with pytest.raises(StoreLockedError):
                StoreLock(url).acquire()
        with StoreLock(url):
            pass
    finally:
        memory = fsspec.filesystem("memory")
        if memory.exists("/avr-lock-test"):
            memory.rm("/avr-lock-test", recursive=True)


def _try_to_take(store: str, start, everyone_answered, results) -> None:
    start.wait()
    try:
        with StoreLock(store):
            results.put("took")
            everyone_answered.wait(60)  # hold it until every racer has tried
    except StoreLockedError:
        results.put("refused")


def _race(store: Path, racers: int) -> list[str]:
    context = multiprocessing.get_context("spawn")
    start, everyone_answered, results = context.Event(), context.Event(), context.Queue()
    processes = [context.Process(target=_try_to_take,
                                 args=(str(store), start, everyone_answered, results))
                 for _ in range(racers)]
    for process in processes:
        process.start()
    time.sleep(1.0)  # most racers imported and waiting: they start together
    start.set()
    outcomes = [results.get(timeout=120) for _ in processes]
    everyone_answered.set()
    for process in processes:
        process.join()
    return sorted(outcomes)


def test_processes_racing_for_a_new_store_get_one_lock(tmp_path):
    assert _race(tmp_path / "cache", 4) == ["refused"] * 3 + ["took"]


def test_processes_racing_for_a_stale_lock_get_one_lock(tmp_path):
    store = tmp_path / "cache"
    plant_lock(store, pid=dead_pid())
    assert _race(store, 4) == ["refused"] * 3 + ["took"]



def test_lock_records_round_trip():
    record = store_lock._own_record()
    assert LockRecord.decode(record.encode()) == record
    assert LockRecord.decode(b"[]") is None
    assert json.loads(record.encode()) == asdict(record)
