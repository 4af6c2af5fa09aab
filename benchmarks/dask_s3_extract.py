"""A dask extract into S3 against one process: the demo set (tiny backbones, CPU) extracted by
`avr extract` into an S3 store, once in one process and once through a `dask scheduler` with N
`dask worker` processes (one thread each, working folders of their own), timing each end to end
(clips per second of the whole command, process start included).

    python benchmarks/dask_s3_extract.py [--looks 8] [--workers 2]

S3 is moto's server on the loopback (`pip install 'moto[server]' s3fs`), so the figures measure
the work and the protocol, not a network. Prints one line per run and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from avr.extract.demo_data import generate_demo  # noqa: E402
from support.s3 import BUCKET, moto_endpoint  # noqa: E402

BIN = Path(sys.executable).parent


def extract(root: Path, out: str, *extra: str) -> float:
    started = time.perf_counter()
    subprocess.run([str(BIN / "avr"), "extract", "--dataset", "demo", "--root", str(root),
                    "--out", out, "--backbones", "tiny", "--device", "cpu", "--chunk-rows", "4",
                    *extra], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(REPO)})
    return time.perf_counter() - started


def cluster(folder: Path, workers: int) -> tuple[str, list[subprocess.Popen]]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    scheduler_file = folder / "scheduler.json"
    processes = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                   "--port", "0", "--no-dashboard", "--scheduler-file",
                                   str(scheduler_file)], cwd=folder, env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    while not scheduler_file.exists():
        time.sleep(0.2)
    for i in range(workers):
        own = folder / f"worker-{i}"
        own.mkdir()
        processes.append(subprocess.Popen(
            [str(BIN / "dask"), "worker", "--scheduler-file", str(scheduler_file), "--nworkers",
             "1", "--nthreads", "1", "--no-dashboard", "--local-directory", str(own)], cwd=own,
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return json.loads(scheduler_file.read_text())["address"], processes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--looks", type=int, default=8, help="demo looks (6 clips each)")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch, moto_endpoint():
        folder = Path(scratch)
        root = generate_demo(folder / "data", seed=0, num_looks=args.looks)
        clips = 6 * args.looks
        seconds = extract(root, f"s3://{BUCKET}/one-process", "--workers", "1")
        print(f"one process (1 decode worker): {clips} clips in {seconds:.1f} s, "
              f"{clips / seconds:.2f} clips/s")
        address, processes = cluster(folder, args.workers)
        try:
            time.sleep(5)  # the workers connect
            seconds = extract(root, f"s3://{BUCKET}/dask", "--scheduler", address)
            print(f"dask, {args.workers} workers: {clips} clips in {seconds:.1f} s, "
                  f"{clips / seconds:.2f} clips/s")
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait()
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())}, "
          f"{os.cpu_count()} cores")


if __name__ == "__main__":
    main()
