"""`avr extract` on dask.distributed: two worker processes on loopback write the same store
as one process, survive a killed worker, and record failures the same way."""

from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pytest

distributed = pytest.importorskip("distributed")

from avr.errors import AvrError  # noqa: E402
from avr.errors import StoreLockedError  # noqa: E402
from avr.extract.demo_data import generate_demo  # noqa: E402
from avr.extract.distributed import extract_on_dask, local_cluster  # noqa: E402
from avr.extract.pipeline import ExtractConfig, extract  # noqa: E402
from avr.store import schema  # noqa: E402
from avr.store.group import open_store
from avr.store.lock import LockRecord, StoreLock  # noqa: E402
from support import media  # noqa: E402
from support.store_checks import assert_same_store, demo_extract_config, read_store  # noqa: E402

CHUNK = 2


def config_for(root: Path, out: Path | str, **overrides) -> ExtractConfig:
    return demo_extract_config(root, out, overrides.pop("chunk_rows", CHUNK), **overrides)


@pytest.fixture(scope="module")
def client():
    with local_cluster(2) as cluster, distributed.Client(cluster) as client:
        yield client


def test_the_local_cluster_leaves_the_dashboard_port_alone():
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 8787))  # as another cluster's dashboard would
    except OSError:
        pass  # something already holds it: the same situation
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            with local_cluster(1) as cluster:
                port = cluster.scheduler.http_server.port
        assert port != 8787
        assert not [w for w in caught if "8787" in str(w.message)]
    finally:
        holder.close()


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return generate_demo(tmp_path_factory.mktemp("demo") / "data", seed=0, num_looks=2)


@pytest.fixture(scope="module")
def straight(demo_root, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "cache"
    extract(config_for(demo_root, out))
    return out


def loaded_backbones() -> int:
    from avr.extract import distributed as dask_extract

    return len(dask_extract._BACKBONES)


def test_two_workers_write_the_same_store_as_one_process(client, demo_root, straight, tmp_path):
    out = tmp_path / "cache"
    summary = extract_on_dask(config_for(demo_root, out), client)
    assert summary.done == summary.videos == 12 and summary.done_now == 12
    assert_same_store(straight, out)


def test_each_worker_loads_its_backbones_once(client, demo_root, tmp_path):
    extract_on_dask(config_for(demo_root, tmp_path / "cache"), client)
    assert set(client.run(loaded_backbones).values()) == {1}


def test_a_file_url_names_the_same_store(client, demo_root, straight, tmp_path):
    out = tmp_path / "cache"
    extract_on_dask(config_for(demo_root, out.as_uri()), client)
    assert_same_store(straight, out)


def test_a_finished_store_submits_no_work(client, demo_root, straight):
    summary = extract_on_dask(config_for(demo_root, straight), client)
    assert summary.done_now == 0 and summary.done == summary.videos


def test_a_killed_worker_loses_only_its_chunk(demo_root, straight, tmp_path):
    out = tmp_path / "cache"
    killed: list[int] = []
    with local_cluster(2) as cluster, distributed.Client(cluster) as client:

        def kill_a_busy_worker(start, stop):
            if killed:
                return
            busy = [address for address, keys in client.processing().items() if keys]
            if busy:
                pid = client.run(os.getpid, workers=busy[:1])[busy[0]]
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        extract_on_dask(config_for(demo_root, out), client, on_chunk=kill_a_busy_worker)
        assert killed, "no worker was busy after the first chunk"
        assert killed[0] not in client.run(os.getpid).values()
        extract_on_dask(config_for(demo_root, out), client)  # the rerun redoes what is left
    assert read_store(out)[schema.VIDEO_DONE].all()
    assert_same_store(straight, out)


@pytest.fixture()
def broken_root(tmp_path) -> Path:
    root = tmp_path / "generic"
    videos = root / "videos"
    videos.mkdir(parents=True)
    media.write_clip(videos / "good1.mp4", seconds=1.0)
    media.write_clip(videos / "good2.mp4", seconds=1.0, audio="none")
    media.write_zero_byte(videos / "empty.mp4")
    media.write_garbage(videos / "garbage.mp4")
    ids = ["good1", "empty", "good2", "garbage", "absent"]
    with (root / "captions.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["video_id", "caption", "split"])
        for i, video_id in enumerate(ids):
            writer.writerow([video_id, f"a caption of {video_id}", ["train", "val", "test"][i % 3]])
    return root


def test_failures_are_recorded_as_by_one_process(client, broken_root, tmp_path):
    one, many = tmp_path / "one", tmp_path / "many"
    single = extract(config_for(broken_root, one, dataset="generic"))
    summary = extract_on_dask(config_for(broken_root, many, dataset="generic"), client)
    assert {f.video_id for f in summary.failures} == {"empty", "garbage", "absent"}
    assert summary.failures == single.failures
    assert ((many / schema.FAILURES_FILE).read_text()
            == (one / schema.FAILURES_FILE).read_text())
    assert (open_store(many)[0].attrs[schema.ATTR_FAILURES]
            == open_store(one)[0].attrs[schema.ATTR_FAILURES])
    assert_same_store(one, many)


def test_the_cli_runs_on_a_scheduler(client, demo_root, straight, tmp_path):
    from typer.testing import CliRunner

    from avr.cli import app

    out = tmp_path / "cache"
    result = CliRunner().invoke(app, [
        "extract", "--dataset", "demo", "--root", str(demo_root), "--out", out.as_uri(),
        "--backbones", "tiny", "--chunk-rows", str(CHUNK), "--device", "cpu",
        "--scheduler", client.scheduler.address])
    assert result.exit_code == 0, result.output
    assert "12/12 videos done" in " ".join(result.output.split())
    assert_same_store(straight, out)


def test_the_parent_holds_the_store_lock_while_workers_write(client, demo_root, straight,
                                                             tmp_path):
    out = tmp_path / "cache"
    refusals = []

    def try_a_second_writer(start, stop):
        try:
            StoreLock(out).acquire()
        except StoreLockedError as refused:
            refusals.append(str(refused))

    extract_on_dask(config_for(demo_root, out), client, on_chunk=try_a_second_writer)
    assert len(refusals) == 6 and f"pid {os.getpid()}" in refusals[0]
    assert not (out / schema.LOCK_FILE).exists()
    assert_same_store(straight, out)


def test_tasks_of_an_extract_that_lost_its_lock_write_nothing(client, demo_root, straight,
                                                              tmp_path):
    """Another run took the lock (the parent's record was replaced): the tasks still to
    commit fail without writing, and the next run finishes the store."""
    out = tmp_path / "cache"
    lock_file = out / schema.LOCK_FILE

    def take_the_lock_away(start, stop):
        record = LockRecord.decode(lock_file.read_bytes())
        if record.pid == os.getpid():
            gone = subprocess.Popen([sys.executable, "-c", "pass"])
            gone.wait()
            lock_file.write_bytes(replace(record, token="other", pid=gone.pid).encode())

    with pytest.raises(AvrError, match="chunk task"):
        extract_on_dask(config_for(demo_root, out), client, on_chunk=take_the_lock_away)
    done = read_store(out)[schema.VIDEO_DONE]
    assert 0 < done.sum() < len(done)
    summary = extract(config_for(demo_root, out))  # takes over the stale lock
    assert summary.done == summary.videos
    assert_same_store(straight, out)


@pytest.mark.slow
def test_a_killed_dask_extract_resumes_to_the_same_store(demo_root, straight, tmp_path):
    out = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    command = [sys.executable, "-m", "avr", "extract", "--dataset", "demo", "--root",
               str(demo_root), "--out", str(out), "--backbones", "tiny", "--chunk-rows",
               str(CHUNK), "--device", "cpu"]
    parent = subprocess.Popen([*command, "--dask-workers", "2"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    deadline = time.time() + 300
    done_rows = 0
    while time.time() < deadline and parent.poll() is None and done_rows < 2:
        try:
            done_rows = int(open_store(out)[0][schema.VIDEO_DONE][:].sum())
        except Exception:  # not created yet, or being created
            pass
        time.sleep(0.05)
    os.killpg(parent.pid, signal.SIGKILL)  # the parent and its local cluster
    parent.wait()
    assert done_rows >= 2
    rerun = subprocess.run([*command, "--workers", "0"], capture_output=True, text=True, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert_same_store(straight, out)
