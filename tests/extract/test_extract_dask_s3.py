"""Extraction across machines as a user runs it: a `dask scheduler` and two `dask worker`
processes, each in a working folder of its own, and `avr extract --scheduler` writing into an
S3 store (moto's server on the loopback). One worker is SIGKILLed midway through writing a
chunk; it loses only that chunk, and the store equals a single-process extract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from avr.extract.demo_data import generate_demo
from avr.extract.pipeline import extract
from support.console import ok, run_avr
from support.paths import REPO, SUPPORT
from support.s3 import BUCKET, moto_endpoint
from support.store_checks import assert_same_store, demo_extract_config

CHUNK = 2
DASK = str(Path(sys.executable).with_name("dask"))


@pytest.fixture()
def cluster(tmp_path):
    """A scheduler and two workers (one thread each), started by the `dask` command; yields the
    scheduler's address and the marker a worker claims when it kills itself mid-chunk."""
    with moto_endpoint():
        env = {**os.environ, "PYTHONPATH": str(REPO), "AVR_KILL_MARKER": str(tmp_path / "killed")}
        scheduler_file = tmp_path / "scheduler.json"
        processes = [subprocess.Popen(
            [DASK, "scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
             "--scheduler-file", str(scheduler_file)], cwd=tmp_path, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        try:
            deadline = time.time() + 60
            while not scheduler_file.exists() and time.time() < deadline:
                time.sleep(0.2)
            for name in ("worker-a", "worker-b"):
                folder = tmp_path / name
                folder.mkdir()
                processes.append(subprocess.Popen(
                    [DASK, "worker", "--scheduler-file", str(scheduler_file), "--nworkers", "1",
                     "--nthreads", "1", "--no-dashboard", "--local-directory", str(folder),
                     "--preload", str(SUPPORT / "kill_in_chunk.py")], cwd=folder, env=env,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            yield json.loads(scheduler_file.read_text())["address"], tmp_path / "killed"
        finally:
            for process in reversed(processes):
                process.terminate()
            for process in processes:
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()


def test_dask_workers_write_an_s3_store_equal_to_one_process(cluster, tmp_path):
    address, killed = cluster
    root = generate_demo(tmp_path / "data", seed=0, num_looks=1)
    url = f"s3://{BUCKET}/dask-cache"
    done = ok(run_avr("extract", "--dataset", "demo", "--root", root, "--out", url,
                      "--scheduler", address, "--backbones", "tiny", "--device", "cpu",
                      "--chunk-rows", CHUNK, timeout=600))
    assert "6/6 videos done (6 now, 0 failed)" in " ".join(done.stdout.split())
    assert killed.exists(), "no worker was killed mid-chunk"
    reference = tmp_path / "reference"
    extract(demo_extract_config(root, reference, CHUNK))
    assert_same_store(reference, url)
