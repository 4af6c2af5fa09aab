"""Load on `avr serve`: CLIENTS concurrent clients query a run's service on the loopback for
SECONDS (and at most MAX_REQUESTS requests), each waiting for its answer before the next.

    python benchmarks/serve_load.py --run avr-demo/runs/tefal
    python benchmarks/serve_load.py --run runs/xpool-100k --clients 32 --seconds 30

Starts `avr serve` on a free 127.0.0.1 port (nothing leaves the machine), asks it the store's own
captions (a different one per request) with k = 10, and prints requests/s, p50 and p99 latency,
errors (any answer but 200) and the service's resident memory at start (loaded, before the first
request) and at the end. Figures go to BENCHMARKS.md with the command, machine and load.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.service import free_port  # noqa: E402

MAX_REQUESTS = 200_000
QUERY_COUNT = 2_000


def store_captions(run: Path) -> list[str]:
    """Up to QUERY_COUNT captions of the run's store, spread over it."""
    from avr.fuse.checkpoint import read_config
    from avr.store import schema
    from avr.store.group import open_store
    from avr.store.read import read_rows

    group, _ = open_store(read_config(run)["cache"]["path"])
    total = group[schema.CAPTION_TEXT].shape[0]
    rows = np.unique(np.linspace(0, total - 1, min(QUERY_COUNT, total)).astype(int))
    return [str(t) for t in read_rows(group[schema.CAPTION_TEXT], rows)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--split", default="all")
    parser.add_argument("--threads", type=int, help="avr serve --threads (default: its own)")
    args = parser.parse_args()

    queries = store_captions(args.run)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([str(Path(sys.executable).with_name("avr")), "serve", "--run",
                               str(args.run), "--port", str(port), "--split", args.split,
                               "--device", "cpu",
                               *(["--threads", str(args.threads)] if args.threads else [])],
                              stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ})
    try:
        load_started = time.perf_counter()
        while True:
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except OSError:
                if server.poll() is not None or time.perf_counter() - load_started > 1800:
                    raise SystemExit("avr serve did not start")
                time.sleep(0.5)
        startup = time.perf_counter() - load_started
        process = psutil.Process(server.pid)
        rss_start = process.memory_info().rss
        latencies: list[float] = []
        errors = []
        counter = itertools.count()
        lock = threading.Lock()
        deadline = time.perf_counter() + args.seconds

        def client():
            while time.perf_counter() < deadline:
                n = next(counter)
                if n >= MAX_REQUESTS:
                    return
                url = (f"{base}/search?k={args.k}&q="
                       + urllib.parse.quote(queries[n % len(queries)]))
                tick = time.perf_counter()
                error = None
                try:
                    with urllib.request.urlopen(url, timeout=120) as answer:
                        if not json.loads(answer.read())["results"]:
                            error = "no results"
                except (OSError, ValueError) as failure:  # HTTPError (non-200) is an OSError
                    error = repr(failure)
                with lock:
                    latencies.append(time.perf_counter() - tick)
                    if error is not None:
                        errors.append(error)

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
        rss_end = process.memory_info().rss
    finally:
        server.terminate()
        server.wait(timeout=60)
    lat = np.asarray(latencies) * 1000
    print(f"run {args.run}: threads {args.threads or 'default'}, {args.clients} clients, "
          f"{elapsed:.1f} s, {len(lat)} requests, "
          f"{len(lat) / elapsed:.1f} requests/s, p50 {np.percentile(lat, 50):.1f} ms, "
          f"p99 {np.percentile(lat, 99):.1f} ms, errors {len(errors)}, "
          f"RSS {rss_start / 2**20:.0f} MB at start, {rss_end / 2**20:.0f} MB at the end "
          f"(service ready in {startup:.1f} s); load average {os.getloadavg()[0]:.2f}")
    if errors:
        print("first errors:", errors[:3])


if __name__ == "__main__":
    main()
